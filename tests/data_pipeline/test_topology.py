"""Topology across species (data_pipeline/topology.py, ``nucleo data stats --topology``): the
fast paths against their references, the group matrices, the noise floor, and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gudhi.hera import wasserstein_distance as hera

from data_pipeline.shards import ShardOptions, SourceFile, build_shards
from data_pipeline.topology import (
    END,
    START,
    TopologyOptions,
    Window,
    analyse,
    cgr_cloud,
    excess,
    group_matrix,
    h0_wasserstein,
    persistence,
    species_label,
    topology,
    wasserstein,
)
from nucleo.cli.main import main
from nucleo.core import representations as rep

QUIET = {"log": lambda _: None}
FAST = {"permutations": 49, "bootstrap": 50}


def _random(length: int, seed: int) -> bytes:
    return bytes(np.random.default_rng(seed).choice(list(b"ACGT"), length).astype(np.uint8))


def _periodic(length: int) -> bytes:
    return (b"AACGTTGCATGA" * (length // 12 + 1))[:length]


def test_fast_paths_match_their_references():
    rng = np.random.default_rng(0)
    seq = bytes(rng.choice(list(b"ACGTNacgt"), 700).astype(np.uint8))  # soft-masked and N
    tokens = torch.tensor(["ACGT".find(chr(b)) if chr(b) in "ACGT" else 4 for b in seq.upper()])
    valid = rep.base_mask(tokens)
    corner = rep.corners("tetrahedron", torch.float64)
    trajectory = rep.cgr_points(rep.onehot(tokens, torch.float64), valid, corner)[valid].numpy()
    index = np.linspace(0, len(trajectory) - 1, 40).round().astype(int)
    cloud = cgr_cloud(seq, 40)
    assert np.abs(cloud - trajectory[index]).max() < 1e-12
    assert np.array_equal(cgr_cloud(seq.lower(), 40), cloud)
    h0, h1 = persistence(cloud)
    ref0, ref1 = rep.diagrams(torch.from_numpy(cloud))
    assert np.allclose(h0, np.sort(ref0[:, 1].numpy())) and len(h1) == len(ref1) > 0
    assert np.allclose(np.sort(h1, 0), np.sort(ref1.numpy(), 0))
    diagrams = [persistence(cgr_cloud(_random(600, s), 24 + 4 * s)) for s in range(3)]
    diagrams.append(persistence(cgr_cloud(_periodic(600), 30)))
    for (a0, a1), (b0, b1) in itertools.pairwise(diagrams):
        exact = rep.wasserstein(*(torch.from_numpy(np.c_[np.zeros(len(x)), x]) for x in (a0, b0)))
        width = max(len(a0), len(b0))  # zero-padded rows, as distance_matrices pads them
        pad = [np.r_[np.zeros(width - len(x)), x][None] for x in (a0, b0)]
        assert h0_wasserstein(*pad)[0] == pytest.approx(float(exact), abs=1e-9)
        assert wasserstein(a1, b1) == pytest.approx(
            float(rep.wasserstein(*map(torch.from_numpy, (a1, b1))))
        )
        assert wasserstein(a1, b1) == pytest.approx(
            hera(a1, b1, order=1.0, internal_p=np.inf, delta=1e-6), rel=1e-5
        )


def test_group_matrix_symmetric_zero_diagonal_and_spread():
    rng = np.random.default_rng(1)
    points = rng.random((9, 2))
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    labels = list("aaabbbbcc")
    names, matrix, spread = group_matrix(d, labels)
    assert names == ["a", "b", "c"]
    assert np.array_equal(matrix, matrix.T) and not np.diag(matrix).any()
    a, b = np.arange(3), np.arange(3, 7)
    assert matrix[0, 1] == pytest.approx(d[np.ix_(a, b)].mean())
    assert spread[0] == pytest.approx(d[np.ix_(a, a)].sum() / 6)  # distinct pairs only
    extra = excess(matrix, spread)
    assert np.array_equal(extra, extra.T) and not np.diag(extra).any()
    assert extra[0, 1] == pytest.approx(matrix[0, 1] - (spread[0] + spread[1]) / 2)


def _windows(key: str, seq: bytes, count: int, length: int) -> list[Window]:
    return [Window(key, i * length, seq[i * length : (i + 1) * length]) for i in range(count)]


def test_same_genome_sits_at_its_floor_and_different_genomes_above_it():
    length, count = 512, 6
    genome = _random(2 * count * length, 2)
    windows = (
        _windows("rand_a", genome[: count * length], count, length)  # one genome, two samples
        + _windows("rand_b", genome[count * length :], count, length)
        + _windows("periodic", _periodic(count * length), count, length)
    )
    records = [
        {"key": "rand_a", "kingdom": "viral", "organism": "Randomus uniformis"},
        {"key": "rand_b", "kingdom": "viral", "organism": "Randomus uniformis"},
        {"key": "periodic", "kingdom": "plasmid", "organism": "Periodicus repetitus"},
    ]
    options = TopologyOptions(windows=count, length=length, points=48, **FAST)
    result = analyse(windows, records, options, **QUIET)
    m = result["matrices"]["record"]
    assert m["names"] == ["periodic", "rand_a", "rand_b"]
    floor = {r["key"]: r["floor"] for r in result["records"]}
    assert np.array_equal(m["spread"], [floor[k] for k in m["names"]])
    # Two samples of one genome: as far apart as the windows of either (the floor).
    assert 0.8 < m["ratio"][1, 2] < 1.25
    assert abs(m["excess"][1, 2]) < 0.25 * floor["rand_a"]
    # A periodic repeat vs random sequence: far above both floors.
    assert m["matrix"][0, 1] > 3 * max(floor.values()) and m["ratio"][0, 2] > 3
    levels = result["levels"]
    assert levels["record"]["ratio"] == 1 and levels["species"]["ratio"] < 1.25
    assert levels["between"]["ratio"] > 3 and levels["between"]["pairs"] == 2
    kingdom = result["matrices"]["kingdom"]
    assert kingdom["names"] == ["plasmid", "viral"] and kingdom["excess"][0, 1] > 0
    assert result["tests"]["records"]["p"] <= 0.05


def test_species_labels():
    def label(**fields):
        return species_label({"key": "x", "organism": "", "description": "", **fields})

    assert label(organism="Escherichia coli K12") == "Escherichia coli"
    assert label(description="Klebsiella pneumoniae subsp. pneumoniae 1084") == (
        "Klebsiella pneumoniae"
    )
    assert label(description="Lactococcus lactis phage p2, complete genome") == (
        "Lactococcus lactis phage p2"
    )
    assert label(description="Middle East respiratory syndrome coronavirus isolate Al-Hasa_1") == (
        "Middle East respiratory syndrome coronavirus"
    )
    assert label(description="gi|111|ref|NC_007087.2| Dictyostelium discoideum AX4") == (
        "Dictyostelium discoideum"
    )
    assert label(key="chr6", description="149454308 149994826 +", source="g/monDom5.fa") == (
        "monDom5"
    )


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """viral: two random genomes; plasmid: a periodic repeat (12 kb each, one shard each)."""
    tmp = tmp_path_factory.mktemp("topology")
    sources = []
    for name, kingdom, seq in (
        ("rand1", "viral", _random(12_000, 3)),
        ("rand2", "viral", _random(12_000, 4).lower()),  # soft-masked: bases all the same
        ("rep", "plasmid", _periodic(12_000)),
    ):
        path = tmp / f"{name}.fa"
        path.write_bytes(b">" + name.encode() + b" Testus " + name.encode() + b"\n" + seq + b"\n")
        sources.append(SourceFile(path, kingdom))
    out = tmp / "shards"
    build_shards(sources, out, ShardOptions(min_shards=1, val_fraction=0.0), **QUIET)
    return out


def test_topology_is_a_function_of_the_seed(tiny_shards):
    def run(seed: int) -> dict:
        options = TopologyOptions(windows=3, length=1000, points=32, seed=seed, **FAST)
        return topology(tiny_shards, options, **QUIET)

    first, again, other = run(0), run(0), run(1)
    offsets = [r["offsets"] for r in first["records"]]
    assert offsets == [r["offsets"] for r in again["records"]]
    assert np.array_equal(
        first["matrices"]["record"]["matrix"], again["matrices"]["record"]["matrix"]
    )
    assert offsets != [r["offsets"] for r in other["records"]]
    assert all(len(o) == 3 and len(set(o)) == 3 for o in offsets)


def test_cli_data_stats_topology_writes_its_files(tmp_path, tiny_shards, capsys):
    out = tmp_path / "r" / "stats.md"
    flags = ["--topology-windows", "3", "--topology-len", "1000", "--topology-points", "32"]
    base = ["data", "stats", "--shards", str(tiny_shards), "--out", str(out), "--k", "3"]
    assert main([*base, "--topology", *flags]) == 0
    printed = capsys.readouterr().out
    assert "topology: 9 diagrams" in printed and "H1 distances" in printed
    text = out.read_text()
    assert text.startswith("# Data statistics") and text.count(START) == text.count(END) == 1
    assert "| the same record (noise floor) |" in text and "| plasmid |" in text
    folder = out.parent
    for name in ("heatmap", "dendrogram"):
        png = folder / f"stats_topology_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png.name})" in text
    lines = (folder / "stats_topology_kingdom.csv").read_text().splitlines()
    assert lines[0] == "name,spread,noise_floor,plasmid,viral" and len(lines) == 3
    saved = json.loads((folder / "stats_topology.json").read_text())
    assert saved["matrices"]["record"]["names"] == ["rand1", "rand2", "rep"]
    # --topology-only: the section is replaced in place, the rest of the report kept.
    table = text.split(START)[0]
    assert main([*base, "--topology-only", *flags, "--seed", "5"]) == 0
    again = out.read_text()
    assert again.startswith(table) and again.count(START) == 1 and "--seed 5" in again


def test_cli_topology_bad_window_length_is_one_line(tiny_shards, tmp_path, capsys):
    args = ["data", "stats", "--shards", str(tiny_shards), "--out", str(tmp_path / "r.md")]
    assert main([*args, "--topology-only", "--topology-len", "20000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--topology-len" in err and "longer than every record" in err and "12,000" in err
    assert not (tmp_path / "r.md").exists()
