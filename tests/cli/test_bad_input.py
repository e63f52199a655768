"""A catalogue of user mistakes, driven through the CLI: each ends in one line,
``nucleo: error: <file or flag>: <what> (<what would be valid>)``, exit code 2, and nothing
written or deleted. Warnings (a likely typo, a record with nothing to score, mostly-N input)
are one line on stderr and the command goes on.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import BadShardError, tar_samples
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model
from tests.conftest import ROOT, sample_file

LAMBDA = sample_file("viral/lambda.fasta.gz")


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


@pytest.fixture
def export_dir(tmp_path) -> Path:
    sets = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"]
    cfg = load_config(arch="transformer", overrides=sets)
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, CharTokenizer())
    return export_model(model.state_dict(), cfg, CharTokenizer(), tmp_path / "export")


def _variant(export_dir: Path, name: str, change) -> Path:
    copy = Path(shutil.copytree(export_dir, export_dir.parent / name))
    change(copy)
    return copy


def _edit_config(copy: Path, edit) -> None:
    meta = json.loads((copy / "config.json").read_text())
    edit(meta)
    (copy / "config.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CASES = {
    # name: (argv built from (tmp_path, export_dir), what the line must say)
    "sources is a folder": (
        lambda t, e: ["data", "build", "--sources", str(t), "--out", str(t / "o")],
        "is a directory (give a file, not a folder)",
    ),
    "truncated safetensors": (
        lambda t, e: ["score", str(_variant(e, "trunc", lambda c: _truncate(
            c / "model.safetensors"))), str(LAMBDA), "--out", str(t / "s.tsv")],
        "trunc/model.safetensors: cannot be read as this export's weights",
    ),
    "config.json of another architecture": (
        lambda t, e: ["score", str(_variant(e, "other", lambda c: _edit_config(
            c, lambda m: m.update(arch="hyena")))), str(LAMBDA), "--out", str(t / "s.tsv")],
        "other/config.json: model.n_heads: unknown key",
    ),
    "invalid JSON": (
        lambda t, e: ["score", str(_variant(e, "badjson", lambda c: (c / "config.json").write_text(
            "{not json"))), str(LAMBDA), "--out", str(t / "s.tsv")],
        "badjson/config.json: not valid JSON",
    ),
    "config.json without arch": (
        lambda t, e: ["embed", str(_variant(e, "noarch", lambda c: _edit_config(
            c, lambda m: m.pop("arch")))), str(LAMBDA), "--out", str(t / "e.npy")],
        "noarch/config.json: no 'arch' entry",
    ),
    "broken nucleo_tokenizer.json": (
        lambda t, e: ["score", str(_variant(e, "badtok", lambda c: (
            c / "nucleo_tokenizer.json").write_text("[1, 2]"))), str(LAMBDA), "--out",
            str(t / "s.tsv")],
        "badtok/nucleo_tokenizer.json: no tokenizer 'type'",
    ),
    "window 0": (
        lambda t, e: ["score", str(e), str(LAMBDA), "--window", "0", "--out", str(t / "s.tsv")],
        "argument --window: 0 is not valid (a whole number >= 2)",
    ),
    "layer in full fine-tuning": (
        lambda t, e: ["finetune", str(t), "--export", str(e), "--layer", "1"],
        "--layer 1: probes only (--mode probe)",
    ),
    "top-p 0": (
        lambda t, e: ["generate", str(e), "--out", str(t / "g.fa"), "--top-p", "0"],
        "argument --top-p: 0 is not valid (a number in (0, 1])",
    ),
    "temperature nan": (
        lambda t, e: ["generate", str(e), "--out", str(t / "g.fa"), "--temperature", "nan"],
        "argument --temperature: nan is not valid",
    ),
    "lr inf": (
        lambda t, e: ["config", "--set", "train.lr=inf"],
        "train.lr: expected a finite number, got 'inf'",
    ),
    "include regex matching nothing": (
        lambda t, e: ["data", "build", "--sources", str(_tsv(t, "viral", "plasmid_only")),
                      "--out", str(t / "o")],
        "kept none of its records; its records begin: NC_001416.1",
    ),
    "an export that is not one": (
        lambda t, e: ["score", str(t), str(LAMBDA), "--out", str(t / "s.tsv")],
        "config.json: not found; is",
    ),
}  # fmt: skip


def _tsv(tmp_path: Path, kingdom: str, include: str) -> Path:
    tsv = tmp_path / "sources.tsv"
    tsv.write_text(f"path\tkingdom\tinclude\n{LAMBDA}\t{kingdom}\t{include}\n")
    return tsv


@pytest.mark.skipif(torch.cuda.is_available(), reason="the device case needs a CPU machine")
def test_cuda_on_a_cpu_machine(tmp_path, export_dir, capsys):
    _one_line_error(
        ["score", str(export_dir), str(LAMBDA), "--device", "cuda", "--out", str(tmp_path / "s")],
        "--device: cuda asked for, but PyTorch sees no CUDA GPU", tmp_path, capsys,
    )  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistake_is_one_line_and_changes_nothing(case, tmp_path, export_dir, capsys):
    build, expected = CASES[case]
    argv = build(tmp_path, export_dir)
    _one_line_error(argv, expected, tmp_path, capsys)


def _one_line_error(argv: list[str], expected: str, tmp_path: Path, capsys) -> None:
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # argparse's errors exit; the others return
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("nucleo: "), err
    assert expected in lines[0], lines[0]
    assert _tree(tmp_path) == before  # nothing written, nothing deleted


def test_a_kingdom_typo_is_named(tmp_path, capsys):
    tsv = _tsv(tmp_path, "viarl", "")
    assert main(["data", "build", "--sources", str(tsv), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "kingdom 'viarl'" in out and "did you mean 'viral'?" in out


def test_nothing_scored_and_mostly_n_input_are_said(tmp_path, export_dir, capsys):
    fasta = tmp_path / "odd.fa"
    fasta.write_text(">one\nA\n>gaps\n" + "N" * 40 + "\n>fine\nACGTACGTAC\n")
    out = tmp_path / "s.tsv"
    assert main(["score", str(export_dir), str(fasta), "--out", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert rows[0][0] == "one" and rows[0][2] == "0" and rows[0][4] == "NA"
    assert rows[2][4] != "NA" and float(rows[2][4]) > 0
    err = capsys.readouterr().err
    assert "warning: one: nothing scored (1 base(s)" in err
    assert "warning: gaps: 100% N: its score says little" in err and "fine" not in err


def test_a_bad_validation_shard_does_not_suggest_skipping(tmp_path):
    bad = tmp_path / "val-000000.tar"
    bad.write_bytes(b"not a tar at all" * 10)
    with pytest.raises(BadShardError) as err:
        list(tar_samples(str(bad), on_bad="strict"))
    assert "unreadable" in str(err.value) and "on_bad_shard" not in str(err.value)


def test_a_full_disk_is_one_line_and_leaves_nothing_partial(tmp_path, small_disk):
    """Shards onto a 1 MB tmpfs (a real ENOSPC) where the machine allows a mount, else under a
    file-size limit (EFBIG): one line naming the file, exit 2, no partial folder left."""
    disk = small_disk("1m")
    mounted = disk is not None
    if disk is None:
        disk = tmp_path / "disk"
        disk.mkdir()
    genome = sample_file("bacteria/E_coli_536.fna.xz")
    cmd = [sys.executable, "-m", "nucleo", "data", "build", "--input", f"bacteria={genome}",
           "--out", str(disk / "s")]  # fmt: skip

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=None if mounted else limit)  # fmt: skip
    lines = [x for x in out.stderr.splitlines() if x.startswith("nucleo:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    want = "no space left on device (free some space" if mounted else "file too large"
    assert str(disk) in lines[0] and want in lines[0], lines[0]
    assert list(disk.iterdir()) == []  # no shard set, partial or not, and no work folder
