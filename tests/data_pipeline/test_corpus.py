"""Near-duplicate sketches, record filters and split units of shards, the offline corpus builder
(real .deb and wheel packages built here), data statistics, and their CLI commands."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import dedup
from data_pipeline.corpus import (
    COLUMNS,
    OFFLINE_CORPUS_TSV,
    build_corpus,
    read_corpus_tsv,
)
from data_pipeline.dedup import (
    SketchOptions,
    canonical_kmer_hashes,
    cluster_sketches,
    near_duplicate_fraction,
    sketch,
)
from data_pipeline.readers import read_sequences
from data_pipeline.shards import (
    REFSEQ_KINGDOMS,
    ShardOptions,
    SourceFile,
    build_shards,
    check_sources,
    read_sources_tsv,
    write_sources_tsv,
)
from data_pipeline.stats import entropy_bits, kingdom_stats, kmer_counts, report
from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from tests.conftest import sample_file

QUIET = {"log": lambda _: None}
LAMBDA = "viral/lambda.fasta.gz"
LACTOCOCCUS = "viral/lactococcus_phages.fasta.bz2"  # NC_021852 P680, NC_008371 jj50, NC_028900 SL4
UNRELATED = ("viral/NC_045512.2.fasta", "viral/NC_001802.fna.gz", "viral/NC_001422.gbk.gz")
M64 = (1 << 64) - 1
# Substitutions of the "near-duplicate" copies: k=21 Jaccard ~0.92 (0.2% kills ~4% of the
# k-mers), so the 128-permutation estimate (+-0.03) clears the 0.8 threshold for any seed; at
# 0.5% the true Jaccard is ~0.82 and a quarter of the draws would fall below it.
MUTATION = 0.002


# ----------------------------------------------------------------------------- helpers


def _seq(relative: str) -> bytes:
    return bytes(next(read_sequences(sample_file(relative))).seq)


def _mutate(seq: bytes, rate: float, seed: int) -> bytes:
    """``seq`` with ``rate`` of its positions substituted by another base."""
    rng = random.Random(seed)
    out = bytearray(seq)
    for i in rng.sample(range(len(out)), int(rate * len(out))):
        out[i] = rng.choice([b for b in b"ACGT" if b != out[i]])
    return bytes(out)


def _fasta(path: Path, name: str, seq: bytes) -> Path:
    path.write_bytes(b">" + name.encode() + b" test record\n" + seq + b"\n")
    return path


def _splitmix64(x: int) -> int:
    """Pure-Python splitmix64 finaliser (the reference for ``dedup._mix``)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _naive_hashes(seq: bytes, k: int, scale: int = 1) -> list[int]:
    """Canonical k-mer hashes, one k-mer at a time: min(forward, reverse complement) 2-bit code,
    mixed; k-mers with a non-ACGT base skipped; kept when <= 2^64 // scale - 1."""
    code = {ord(b): i for i, b in enumerate("ACGT")}
    limit = (1 << 64) // scale - 1
    out = []
    for i in range(len(seq) - k + 1):
        kmer = seq[i : i + k]
        if any(b not in code for b in kmer):
            continue
        fwd = rev = 0
        for b in kmer:
            fwd = fwd * 4 + code[b]
        for b in reversed(kmer):
            rev = rev * 4 + 3 - code[b]
        h = _splitmix64(min(fwd, rev))
        if h <= limit:
            out.append(h)
    return out


def _random_dna(rng: random.Random, n: int, n_rate: float = 0.03) -> bytes:
    return bytes(ord("N") if rng.random() < n_rate else rng.choice(b"ACGT") for _ in range(n))


# ----------------------------------------------------------------------------- dedup


def test_mix_is_splitmix64():
    values = [0, 1, 2, 3, 0xFFFF, 1 << 40, (1 << 62) - 1, M64, 0x0123456789ABCDEF]
    with np.errstate(over="ignore"):
        got = dedup._mix(np.array(values, dtype=np.uint64)).tolist()
    assert got == [_splitmix64(v) for v in values]


@pytest.mark.parametrize("k", [4, 7, 16, 21, 31])
def test_canonical_hashes_match_a_naive_reference(k):
    rng = random.Random(k)
    for n in (k - 1, k, k + 1, 300):
        seq = _random_dna(rng, n)
        assert canonical_kmer_hashes(seq, k).tolist() == _naive_hashes(seq, k), n
    seq = _random_dna(rng, 400)
    assert canonical_kmer_hashes(bytearray(seq), k).tolist() == _naive_hashes(seq, k)
    rc = reverse_complement_bytes(seq)
    assert sorted(canonical_kmer_hashes(rc, k).tolist()) == sorted(_naive_hashes(seq, k))
    for scale in (2, 7, 100):
        assert canonical_kmer_hashes(seq, k, scale).tolist() == _naive_hashes(seq, k, scale)


def test_hashes_are_strand_independent_and_scale_keeps_the_low_hashes():
    seq = _seq(LAMBDA)
    seq = seq[:20000] + b"NNNN" + seq[20000:]
    full = canonical_kmer_hashes(seq, 21)
    assert len(full) == len(seq) - 21 + 1 - (4 + 20)  # 24 k-mers overlap the Ns
    rc = canonical_kmer_hashes(reverse_complement_bytes(seq), 21)
    assert np.array_equal(np.sort(full), np.sort(rc))  # as a multiset
    for scale in (2, 10, 100):
        kept = canonical_kmer_hashes(seq, 21, scale)
        limit = np.uint64((1 << 64) // scale - 1)
        assert np.array_equal(kept, full[full <= limit])
        assert 0 < len(kept) < len(full)
        assert abs(len(kept) / len(full) - 1 / scale) < 0.25 / scale  # hashes are uniform
    assert np.array_equal(canonical_kmer_hashes(seq, 21, 1), full)


def test_hashes_do_not_depend_on_the_1mb_blocks():
    seq = _seq("invertebrate/Dmel_chr4.fna.xz")[:1_200_000]  # two blocks of the hashing loop
    k = 21
    assert len(seq) > dedup._BLOCK + k
    cut = 600_000  # neither piece crosses a block boundary of its own
    pieces = np.concatenate(
        [canonical_kmer_hashes(seq[: cut + k - 1], k), canonical_kmer_hashes(seq[cut:], k)]
    )
    assert np.array_equal(canonical_kmer_hashes(seq, k), pieces)


def test_sketch_jaccard_and_clusters_on_real_genomes():
    options = SketchOptions()
    lam = _seq(LAMBDA)
    mutant = _mutate(lam, MUTATION, seed=1) + _seq("viral/NC_001422.gbk.gz")[:100]  # longer
    yeast = _seq("fungi/ScerR64_I.fna.gz")[50_000 : 50_000 + len(lam)]  # unrelated, same size
    sketches = {"a_lambda": sketch(lam, options), "b_mutant": sketch(mutant, options)}
    sketches["c_yeast"] = sketch(yeast, options)
    assert sketches["a_lambda"].jaccard(sketches["b_mutant"]) >= 0.8
    assert sketches["a_lambda"].jaccard(sketches["c_yeast"]) < 0.2
    assert sketches["b_mutant"].jaccard(sketches["c_yeast"]) < 0.2
    # The sketch of the reverse complement is the same sketch.
    rc = sketch(reverse_complement_bytes(lam), options)
    assert rc.jaccard(sketches["a_lambda"]) == 1.0
    lengths = {"a_lambda": len(lam), "b_mutant": len(mutant), "c_yeast": len(yeast)}

    clusters = cluster_sketches(sketches, lengths, options.threshold)
    assert [c.members for c in clusters] == [["b_mutant", "a_lambda"], ["c_yeast"]]
    pair = clusters[0]
    assert pair.similarity["b_mutant"] == 1.0  # the representative: the longest, not the first
    assert 0.8 <= pair.similarity["a_lambda"] < 1.0
    assert near_duplicate_fraction(clusters) == pytest.approx(1 / 3)

    singletons = cluster_sketches(sketches, lengths, 0.0)
    assert sorted(c.members for c in singletons) == [["a_lambda"], ["b_mutant"], ["c_yeast"]]
    assert near_duplicate_fraction(singletons) == 0.0
    assert near_duplicate_fraction([]) == 0.0


def test_sketch_options_are_checked():
    for bad in ({"k": 3}, {"k": 32}, {"threshold": 1.5}, {"threshold": -0.1}, {"scale": 0}):
        with pytest.raises(ValueError, match=r"minhash|threshold"):
            SketchOptions(**bad)
    with pytest.raises(ValueError, match="near-duplicate threshold"):
        ShardOptions(near_dup_threshold=1.5)
    with pytest.raises(ValueError, match="minhash k"):
        ShardOptions(minhash_k=32)
    SketchOptions(k=4, threshold=0.0)
    SketchOptions(k=31, threshold=1.0)


# ----------------------------------------------------------------------------- shards


@pytest.fixture
def lambda_family(tmp_path: Path) -> list[SourceFile]:
    """Lambda, a 0.2%-mutated copy (another id, another file), its exact reverse complement,
    and three unrelated real viral genomes; all viral."""
    lam = _seq(LAMBDA)
    mutant = _fasta(tmp_path / "mutant.fa", "lambda_mutant", _mutate(lam, MUTATION, seed=2))
    rc = _fasta(tmp_path / "rc.fa", "lambda_rc", reverse_complement_bytes(lam))
    return [
        SourceFile(sample_file(LAMBDA), "viral", package="pkg-lambda"),
        SourceFile(mutant, "viral"),
        SourceFile(rc, "viral"),
        *(SourceFile(sample_file(f), "viral") for f in UNRELATED),
    ]


RECORD_FIELDS = {"cluster", "near_duplicate_of", "similarity", "unit", "input", "package"}


def test_near_duplicates_share_a_split_and_exact_copies_are_dropped(tmp_path, lambda_family):
    cluster_splits = set()
    for salt in ("s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"):
        options = ShardOptions(chunk_len=8192, min_shards=1, val_fraction=0.5, split_salt=salt)
        manifest = build_shards(lambda_family, tmp_path / salt, options, **QUIET)
        assert manifest["duplicates"] == 1 and manifest["near_duplicates"] == 1
        assert set(manifest["kingdoms"]["viral"]) == {"train", "val"}
        by_key = {r["key"]: r for r in manifest["records"]}
        assert len(by_key) == 6 and all(set(r) >= RECORD_FIELDS for r in by_key.values())
        assert [r["input"] for r in manifest["records"]] == list(range(6))
        lam, mutant, rc = by_key["NC_001416.1"], by_key["lambda_mutant"], by_key["lambda_rc"]
        assert lam["package"] == "pkg-lambda" and mutant["package"] == ""
        assert rc["duplicate_of"] == "NC_001416.1" and rc["split"] == "dropped"
        assert lam["cluster"] == mutant["cluster"] == "NC_001416.1"
        assert lam["near_duplicate_of"] is None and mutant["near_duplicate_of"] == "NC_001416.1"
        assert lam["similarity"] == 1.0 and 0.8 <= mutant["similarity"] < 1.0
        assert lam["unit"] == mutant["unit"] != ""
        assert lam["split"] == mutant["split"], salt
        cluster_splits.add(lam["split"])
        for key in ("NC_045512.2", "NC_001802.1", "NC_001422.1"):
            assert by_key[key]["cluster"] == key and by_key[key]["unit"] == ""
            assert by_key[key]["near_duplicate_of"] is None
        kept = [r for r in manifest["records"] if r["duplicate_of"] is None]
        for split, entry in manifest["kingdoms"]["viral"].items():
            assert entry["records"] == sum(1 for r in kept if r["split"] == split)
    assert cluster_splits == {"train", "val"}  # so a straddling cluster would have been seen


def test_threshold_zero_turns_clustering_off(tmp_path, lambda_family):
    options = ShardOptions(chunk_len=8192, min_shards=1, near_dup_threshold=0.0)
    manifest = build_shards(lambda_family, tmp_path / "off", options, **QUIET)
    assert manifest["near_duplicates"] == 0 and manifest["duplicates"] == 1
    assert manifest["options"]["near_dup_threshold"] == 0.0
    for r in manifest["records"]:
        assert r["cluster"] == "" and r["near_duplicate_of"] is None and r["unit"] == ""


def test_a_cluster_across_kingdoms_stays_in_one_split(tmp_path):
    mutant = _fasta(tmp_path / "mutant.fa", "lambda_mutant", _mutate(_seq(LAMBDA), MUTATION, 3))
    sources = [
        SourceFile(sample_file(LAMBDA), "viral"),
        SourceFile(sample_file("viral/NC_045512.2.fasta"), "viral"),
        SourceFile(mutant, "plasmid"),
        SourceFile(sample_file("plasmid/NC_005816.gb.gz"), "plasmid"),
    ]
    for salt in ("a", "b", "c", "d", "e", "f"):
        options = ShardOptions(chunk_len=8192, min_shards=1, val_fraction=0.5, split_salt=salt)
        manifest = build_shards(sources, tmp_path / salt, options, **QUIET)
        split = {r["key"]: r["split"] for r in manifest["records"]}
        assert manifest["near_duplicates"] == 1
        # salt "a": NC_001416.1 -> val (viral), lambda_mutant -> train (plasmid)
        assert split["NC_001416.1"] == split["lambda_mutant"], salt


def test_include_and_exclude_filter_records_by_header(tmp_path):
    path = sample_file(LACTOCOCCUS)

    def ids(**filters: str) -> list[str]:
        return [r.id for r in SourceFile(path, "viral", **filters).records()]

    assert ids() == ["NC_021852", "NC_008371", "NC_028900"]
    assert ids(include="jj50|SL4") == ["NC_008371", "NC_028900"]  # searched in the description
    assert ids(include="^NC_02") == ["NC_021852", "NC_028900"]  # ... and in the id
    assert ids(exclude="SL4") == ["NC_021852", "NC_008371"]
    assert ids(include="phage", exclude="P680") == ["NC_008371", "NC_028900"]
    assert ids(include="no such phage") == []
    # The same file twice with complementary filters, in two kingdoms: every record once.
    sources = [SourceFile(path, "viral", include="SL4"), SourceFile(path, "plasmid", exclude="SL4")]
    options = ShardOptions(chunk_len=8192, min_shards=1, val_fraction=0.0)
    manifest = build_shards(sources, tmp_path / "f", options, **QUIET)
    kingdom = {r["id"]: r["kingdom"] for r in manifest["records"]}
    assert kingdom == {"NC_028900": "viral", "NC_021852": "plasmid", "NC_008371": "plasmid"}
    assert manifest["duplicates"] == 0
    assert [(i["include"], i["exclude"]) for i in manifest["inputs"]] == [("SL4", ""), ("", "SL4")]


def test_sources_tsv_round_trip_with_every_column(tmp_path):
    folder = tmp_path / "m"
    (folder / "g").mkdir(parents=True)
    inside = shutil.copy(sample_file(LACTOCOCCUS), folder / "g" / "phages.fa.bz2")
    outside = sample_file("plasmid/NC_005816.gb.gz")
    sources = [
        SourceFile(Path(inside), "viral", "phages", r"^NC_0(08|28)", "", None, "mcl-doc"),
        SourceFile(Path(inside), "plasmid", "", "", r"jj50|SL4", "fasta", "mcl-doc"),
        SourceFile(outside, "plasmid", fmt="genbank", package="biopython", matched=True),
    ]
    tsv = write_sources_tsv(sources, folder / "sources.tsv")
    lines = tsv.read_text().splitlines()
    assert lines[0] == "path\tkingdom\tgroup\tinclude\texclude\tformat\tpackage\tmatched"
    assert lines[1].startswith("g/phages.fa.bz2\t")  # relative below the TSV's folder
    assert lines[3].startswith(str(outside.resolve()) + "\t")  # absolute elsewhere
    back = read_sources_tsv(tsv)
    assert back == [replace(s, path=s.path.resolve()) for s in sources]
    assert check_sources(back) == back  # the same file twice, with different filters


def test_sources_tsv_with_some_columns_in_any_order(tmp_path):
    tsv = tmp_path / "s.tsv"
    tsv.write_text(
        "path\tkingdom\tpackage\texclude\n"
        "# a comment\n"
        "\n"
        f"{sample_file(LACTOCOCCUS)}\tviral\tmcl-doc\tP680\n"
        f"{sample_file(LAMBDA)}\tviral\n"
    )
    first, second = read_sources_tsv(tsv)
    assert (first.package, first.exclude, first.include, first.group) == ("mcl-doc", "P680", "", "")
    assert [r.id for r in first.records()] == ["NC_008371", "NC_028900"]
    assert second == SourceFile(sample_file(LAMBDA), "viral")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("path\tkingdom\tcolour\nx.fa\tviral\tred\n", 1, "colour"),
        ("kingdom\tpath\nviral\tx.fa\n", 1, "path<TAB>kingdom"),
        ("path\tkingdom\tgroup\tgroup\nx.fa\tviral\ta\tb\n", 1, "once each"),
        ("path\tkingdom\tinclude\n# c\nx.fa\tviral\t(unclosed\n", 3, "include is not a valid"),
        ("path\tkingdom\texclude\nx.fa\tviral\t[a-\n", 2, "exclude is not a valid"),
        ("path\tkingdom\tformat\nx.fa\tviral\tembl\n", 2, "format 'embl'"),
        ("path\tkingdom\nx.fa\tviral\textra\n", 2, "expected"),
    ],
)
def test_sources_tsv_errors_name_the_file_and_line(tmp_path, text, where, message):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tsv}:{where}:") + ".*" + re.escape(message)):
        read_sources_tsv(tsv)


def test_check_sources_refuses_a_file_twice_with_the_same_filters():
    path = sample_file(LACTOCOCCUS)
    ok = [SourceFile(path, "viral", include="SL4"), SourceFile(path, "plasmid", exclude="SL4")]
    assert check_sources(ok) == ok
    assert len(check_sources([SourceFile(path, "viral"), SourceFile(path, "viral", "g", "x")])) == 2
    with pytest.raises(ValueError, match=r"listed twice.*same filters"):
        check_sources([*ok, SourceFile(path, "fungi", include="SL4")])
    with pytest.raises(ValueError, match="listed twice"):
        check_sources([SourceFile(path, "viral"), SourceFile(path, "plasmid")])


def test_sources_tsv_round_trip_of_a_regex_starting_with_a_quote(tmp_path):
    source = SourceFile(sample_file(LACTOCOCCUS), "viral", include='"P680"|SL4')
    (back,) = read_sources_tsv(write_sources_tsv([source], tmp_path / "s.tsv"))
    assert back.include == source.include  # read back as 'P680|SL4'
    # ('"?phage"?' even comes back as '?phage"?', an invalid regex: the read raises)


# ----------------------------------------------------------------------------- corpus


def _control(package: str, version: str) -> str:
    return (
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: genomes for the corpus tests\n"
    )


def _build_deb(work: Path, folder: Path, package: str, version: str, files: dict[str, str]) -> Path:
    tree = work / f"{package}_{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(_control(package, version))
    for inside, sample in files.items():
        (tree / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_file(sample), tree / inside)
    deb = folder / f"{package}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


PKGA_FILES = {
    "usr/share/doc/pkga/genomes/lambda.fna.gz": LAMBDA,
    "usr/share/doc/pkga/genomes/hiv.fna.gz": "viral/NC_001802.fna.gz",
    "usr/share/doc/pkga/genomes/README": "PROVENANCE.tsv",  # not matched by the glob
    "usr/share/pkga/phages.fa.bz2": LACTOCOCCUS,
    "usr/share/pkga/gb/NC_005816.gb.gz": "plasmid/NC_005816.gb.gz",
}
CORPUS_ROWS = [
    # kingdom, source, package, version, glob, format, include, exclude
    ("viral", "deb", "pkga", "1.0", "usr/share/doc/pkga/genomes/*.fna.gz", "fasta", "", ""),
    ("viral", "deb", "pkga", "1.0", "usr/share/pkga/phages.fa.bz2", "fasta", "jj50|SL4", ""),
    ("plasmid", "deb", "pkga", "1.0", "usr/share/pkga/phages.fa.bz2", "fasta", "", "jj50|SL4"),
    ("plasmid", "deb", "pkga", "1.0", "usr/share/pkga/gb/*.gb.gz", "genbank", "", ""),
    ("mitochondrion", "wheel", "pkgb", "0.1", "pkgb/data/*.fna.gz", "fasta", "", ""),
]  # fmt: skip
EXPECTED_IDS = {
    "viral": {"NC_001416.1", "gi|9629357|ref|NC_001802.1|", "NC_008371", "NC_028900"},
    "plasmid": {"NC_021852", "NC_005816.1"},
    "mitochondrion": {"gi|251831106|ref|NC_012920.1|"},
}


def _corpus_tsv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = COLUMNS) -> Path:
    lines = ["\t".join(header)]
    lines += ["\t".join([*row, "test genomes", "GPL-3"]) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with pkga_1.0_all.deb (built by dpkg-deb) and pkgb-0.1-py3-none-any.whl."""
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        pytest.skip("dpkg-deb/dpkg are not installed")
    work = tmp_path_factory.mktemp("pkgwork")
    folder = tmp_path_factory.mktemp("packages")
    _build_deb(work, folder, "pkga", "1.0", PKGA_FILES)
    with zipfile.ZipFile(folder / "pkgb-0.1-py3-none-any.whl", "w") as whl:
        whl.write(sample_file("mitochondrion/rCRS.fasta.gz"), "pkgb/data/x.fna.gz")
        whl.writestr("pkgb/__init__.py", "")
        whl.writestr("pkgb-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: pkgb\n")
    return folder


CORPUS_OPTIONS = {"min_shards": 1, "chunk_len": 4096, "val_fraction": 0.0}


def test_build_corpus_from_local_packages(tmp_path, packages):
    tsv = _corpus_tsv(tmp_path / "corpus.tsv", CORPUS_ROWS)
    out = tmp_path / "offline"
    result = build_corpus(
        out, tsv=tsv, packages_from=packages, options=ShardOptions(**CORPUS_OPTIONS), **QUIET
    )
    assert sorted(p.name for p in (out / "packages").iterdir()) == [
        "pkga_1.0_all.deb",
        "pkgb-0.1-py3-none-any.whl",
    ]
    # Manifests per kingdom and all.tsv, readable as sources.
    manifests = out / "manifests"
    assert sorted(p.name for p in manifests.iterdir()) == [
        "all.tsv",
        "mitochondrion.tsv",
        "plasmid.tsv",
        "viral.tsv",
    ]
    sources = result["sources"]
    resolved = [replace(s, path=s.path.resolve()) for s in sources]
    assert read_sources_tsv(manifests / "all.tsv") == resolved
    for kingdom in EXPECTED_IDS:
        mine = read_sources_tsv(manifests / f"{kingdom}.tsv")
        assert mine == [s for s in resolved if s.kingdom == kingdom]
    assert len(sources) == 6  # the glob of genomes/ matches 2 files, README excluded
    root = out / "root" / "deb" / "pkga"
    assert sources[0].path == root / "usr/share/doc/pkga/genomes/hiv.fna.gz"
    phages = [s for s in sources if s.path.name == "phages.fa.bz2"]
    assert [(s.kingdom, s.include, s.exclude) for s in phages] == [
        ("viral", "jj50|SL4", ""),
        ("plasmid", "", "jj50|SL4"),
    ]
    assert {s.package for s in sources if s.kingdom == "mitochondrion"} == {"pkgb"}
    assert {s.fmt for s in sources if s.path.name.endswith(".gb.gz")} == {"genbank"}
    # The shards: every kingdom with its records, the package of each.
    manifest = result["manifest"]
    assert result["shards"] == out / "shards"
    assert (
        json.loads((out / "shards" / "manifest.json").read_text())["records"]
        == (manifest["records"])
    )
    assert set(manifest["kingdoms"]) == set(EXPECTED_IDS)
    for kingdom, ids in EXPECTED_IDS.items():
        assert {r["id"] for r in manifest["records"] if r["kingdom"] == kingdom} == ids
        assert set(manifest["kingdoms"][kingdom]) == {"train"}
    package = {r["id"]: r["package"] for r in manifest["records"]}
    assert package["NC_021852"] == "pkga" and package["gi|251831106|ref|NC_012920.1|"] == "pkgb"

    # A second build reuses the unpacked packages: no re-extraction.
    stamp = root / ".unpacked-from"
    assert stamp.read_text() == "pkga_1.0_all.deb"
    wheel_root = out / "root" / "wheel" / "pkgb"
    assert (wheel_root / ".unpacked-from").read_text() == "pkgb-0.1-py3-none-any.whl"
    for folder in (root, wheel_root):
        (folder / "marker").write_text("removed if the package is unpacked again")
    stamp_mtime = stamp.stat().st_mtime_ns
    again = build_corpus(
        out,
        tsv=tsv,
        packages_from=packages,
        options=ShardOptions(**CORPUS_OPTIONS),
        overwrite=True,
        **QUIET,
    )
    assert (root / "marker").is_file() and (wheel_root / "marker").is_file()
    assert stamp.stat().st_mtime_ns == stamp_mtime
    assert [r["key"] for r in again["manifest"]["records"]] == [
        r["key"] for r in manifest["records"]
    ]
    # ... and unpacks again when the stamp names another package file.
    stamp.write_text("pkga_0.9_all.deb")
    build_corpus(out, tsv=tsv, packages_from=packages, shards=False, **QUIET)
    assert not (root / "marker").exists() and stamp.read_text() == "pkga_1.0_all.deb"
    assert (wheel_root / "marker").is_file()


def test_build_corpus_kingdom_selection(tmp_path, packages):
    tsv = _corpus_tsv(tmp_path / "corpus.tsv", CORPUS_ROWS)
    out = tmp_path / "viral"
    result = build_corpus(
        out, tsv=tsv, kingdoms=["viral"], packages_from=packages, shards=False, **QUIET
    )
    assert result["shards"] is None and result["manifest"] is None
    assert {s.kingdom for s in result["sources"]} == {"viral"}
    assert sorted(p.name for p in (out / "manifests").iterdir()) == ["all.tsv", "viral.tsv"]
    assert not (out / "root" / "wheel").exists()  # pkgb is not needed for viral
    with pytest.raises(ValueError, match=r"\['fungi'\] are not in"):
        build_corpus(tmp_path / "f", tsv=tsv, kingdoms=["fungi"], packages_from=packages, **QUIET)


def test_corpus_errors_name_the_line_and_the_package(tmp_path, packages):
    rows = [
        *CORPUS_ROWS[:2],
        ("viral", "deb", "pkga", "1.0", "usr/share/nothing/*.fa", "fasta", "", ""),
    ]
    tsv = _corpus_tsv(tmp_path / "glob.tsv", rows)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tsv}:4: no file matches") + ".*pkga"):
        build_corpus(tmp_path / "o1", tsv=tsv, packages_from=packages, shards=False, **QUIET)

    rows = [CORPUS_ROWS[0], ("viral", "deb", "pkgc", "2.0", "*.fa", "fasta", "", "")]
    tsv = _corpus_tsv(tmp_path / "missing.tsv", rows)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{packages}: no package file for pkgc")):
        build_corpus(tmp_path / "o2", tsv=tsv, packages_from=packages, **QUIET)
    rows = [("mitochondrion", "wheel", "pkgb", "0.2", "pkgb/data/*.fna.gz", "fasta", "", "")]
    tsv = _corpus_tsv(tmp_path / "version.tsv", rows)
    with pytest.raises(FileNotFoundError, match=re.escape("pkgb==0.2")):  # wheels are pinned
        build_corpus(tmp_path / "o3", tsv=tsv, packages_from=packages, **QUIET)


@pytest.mark.parametrize(
    ("row", "where", "message"),
    [
        (("viruses", "deb", "p", "1", "*.fa", "fasta", "", ""), 3, "kingdom 'viruses'"),
        (("viral", "rpm", "p", "1", "*.fa", "fasta", "", ""), 3, "source 'rpm'"),
        (("viral", "deb", "p", "1", "*.fa", "embl", "", ""), 3, "format 'embl'"),
        (("viral", "deb", "p", "1", "*.fa", "fasta", "(x", ""), 3, "include_regex is not a"),
        (("viral", "deb", "p", "1", "*.fa", "fasta", "", "x)"), 3, "exclude_regex is not a"),
        (("viral", "deb", "p", "1", "*.fa", "fasta", ""), 3, "expected 10 columns, got 9"),
    ],
)
def test_corpus_tsv_errors_name_the_line(tmp_path, row, where, message):
    tsv = _corpus_tsv(tmp_path / "c.tsv", [CORPUS_ROWS[0], row])
    with pytest.raises(ValueError, match=re.escape(f"{tsv}:{where}: {message}")):
        read_corpus_tsv(tsv)


def test_corpus_tsv_header_and_empty_table(tmp_path):
    tsv = _corpus_tsv(tmp_path / "h.tsv", CORPUS_ROWS, header=(*COLUMNS[:-1], "license"))
    with pytest.raises(ValueError, match=re.escape(f"{tsv}:1: the header must be kingdom<TAB>")):
        read_corpus_tsv(tsv)
    tsv = _corpus_tsv(tmp_path / "e.tsv", [])
    with pytest.raises(ValueError, match="no corpus entries"):
        read_corpus_tsv(tsv)
    entries = read_corpus_tsv(_corpus_tsv(tmp_path / "ok.tsv", CORPUS_ROWS))
    assert [e.line for e in entries] == [2, 3, 4, 5, 6]
    assert (entries[2].kingdom, entries[2].exclude, entries[4].version) == (
        "plasmid",
        "jj50|SL4",
        "0.1",
    )


def test_the_offline_corpus_table_covers_every_refseq_kingdom():
    entries = read_corpus_tsv()
    assert entries == read_corpus_tsv(OFFLINE_CORPUS_TSV)
    assert {e.kingdom for e in entries} == set(REFSEQ_KINGDOMS)
    wheels = [e for e in entries if e.source == "wheel"]
    assert wheels and all(re.fullmatch(r"\d+(\.\d+)+", e.version) for e in wheels)
    assert all(e.package and e.path_glob and e.organisms for e in entries)
    klebsiella = [e for e in entries if e.package == "kleborate-examples"]
    assert {(e.kingdom, e.include, e.exclude) for e in klebsiella} == {
        ("bacteria", "", "plasmid"),
        ("plasmid", "plasmid", ""),
    }
    assert len({e.path_glob for e in klebsiella}) == 1
    # No two rows name the same files with the same filters (check_sources would refuse them).
    keys = [(e.package, e.path_glob, e.include, e.exclude) for e in entries]
    assert len(keys) == len(set(keys))


# ----------------------------------------------------------------------------- stats


def test_kmer_counts_match_a_naive_count():
    seq = b"ACGTNACGGTACCANTTTACG"
    naive = np.zeros(64, dtype=np.int64)
    code = {ord(b): i for i, b in enumerate("ACGT")}
    for i in range(len(seq) - 2):
        if all(b in code for b in seq[i : i + 3]):
            naive[code[seq[i]] * 16 + code[seq[i + 1]] * 4 + code[seq[i + 2]]] += 1
    counts = kmer_counts(seq, 3)
    assert counts.shape == (64,) and np.array_equal(counts, naive)
    assert counts.sum() == 13  # 19 3-mers, 6 of them with an N
    assert counts[0b00_01_10] == 3  # ACG at 0, 5 and 18
    assert not kmer_counts(b"AC", 3).any() and kmer_counts(b"AC", 3).shape == (64,)


def test_entropy_bits():
    for n in (1, 2, 4, 64, 4096, 10):
        assert entropy_bits(np.full(n, 7)) == pytest.approx(math.log2(n))
    assert entropy_bits(np.array([3, 0, 0, 1])) == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )
    assert math.isnan(entropy_bits(np.zeros(16, dtype=np.int64)))


@pytest.fixture(scope="module")
def stats_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """viral: lambda, a mutated copy, its reverse complement, phiX174 (4 records, 3 kept,
    1 near-duplicate); mitochondrion: rCRS, its copy, gorilla (3 records, 2 kept)."""
    tmp = tmp_path_factory.mktemp("stats")
    lam = _seq(LAMBDA)
    sources = [
        SourceFile(sample_file(LAMBDA), "viral"),
        SourceFile(_fasta(tmp / "mutant.fa", "lambda_mutant", _mutate(lam, MUTATION, 4)), "viral"),
        SourceFile(_fasta(tmp / "rc.fa", "lambda_rc", reverse_complement_bytes(lam)), "viral"),
        SourceFile(sample_file("viral/NC_001422.gbk.gz"), "viral"),
        SourceFile(sample_file("mitochondrion/rCRS.fasta.gz"), "mitochondrion"),
        SourceFile(sample_file("mitochondrion/rCRS_copy.fasta"), "mitochondrion"),
        SourceFile(sample_file("mitochondrion/gorilla.fasta.gz"), "mitochondrion"),
    ]
    out = tmp / "shards"
    build_shards(sources, out, ShardOptions(chunk_len=4096, min_shards=2), **QUIET)
    return out


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("viral", "mitochondrion", "plasmid"):
            rows[cells[0]] = cells
    return rows


def test_kingdom_stats_counts_and_gc(stats_shards):
    manifest = json.loads((stats_shards / "manifest.json").read_text())
    stats = kingdom_stats(stats_shards, k=4, **QUIET)
    assert list(stats) == ["mitochondrion", "viral"]
    viral, mito = stats["viral"], stats["mitochondrion"]
    assert (viral["records"], viral["kept"], viral["clusters"]) == (4, 3, 2)
    assert (mito["records"], mito["kept"], mito["clusters"]) == (3, 2, 2)
    assert viral["duplicate_records"] == 0.25 and mito["duplicate_records"] == pytest.approx(1 / 3)
    assert viral["near_duplicate_records"] == pytest.approx(1 / 3)
    assert mito["near_duplicate_records"] == 0.0
    lam, phix = 48502, 5386
    assert viral["bases"] == 3 * lam + phix and viral["kept_bases"] == 2 * lam + phix
    assert viral["near_duplicate_bases"] == pytest.approx(lam / (2 * lam + phix))
    assert viral["train_bases"] + viral["val_bases"] == viral["kept_bases"]
    # GC of each kingdom, base-weighted over its kept records, from the sequences themselves.
    for name, entry in stats.items():
        gc = acgt = 0
        for r in manifest["records"]:
            if r["kingdom"] == name and r["duplicate_of"] is None:
                (seq,) = [s.seq for s in read_sequences(r["source"]) if s.id == r["id"]]
                gc += seq.count(b"G") + seq.count(b"C")
                acgt += len(seq) - seq.count(b"N")
        assert entry["gc"] == pytest.approx(gc / acgt, abs=1e-4)
        shard_bases = sum(
            s["bases"] for split in manifest["kingdoms"][name].values() for s in split["shards"]
        )
        assert entry["kmer_bases"] == shard_bases
        assert 7.0 < entry["kmer_entropy"] <= 8.0  # k=4: at most 2k bits
    limited = kingdom_stats(stats_shards, k=4, max_bases=5000, **QUIET)
    assert 5000 <= limited["viral"]["kmer_bases"] < 5000 + 4096


def test_kingdom_stats_of_a_kingdom_with_only_duplicates(tmp_path):
    rc = _fasta(tmp_path / "rc.fa", "lambda_rc", reverse_complement_bytes(_seq(LAMBDA)))
    sources = [
        SourceFile(sample_file(LAMBDA), "viral"),
        SourceFile(sample_file("viral/NC_001422.gbk.gz"), "viral"),
        SourceFile(rc, "plasmid"),  # dropped: the same bases as the viral lambda
    ]
    options = ShardOptions(chunk_len=4096, min_shards=1, val_fraction=0.0)
    build_shards(sources, tmp_path / "s", options, **QUIET)
    stats = kingdom_stats(tmp_path / "s", k=4, **QUIET)
    plasmid = stats["plasmid"]
    assert (plasmid["records"], plasmid["kept"], plasmid["bases"]) == (1, 0, 48502)
    assert plasmid["duplicate_records"] == 1.0 and plasmid["duplicate_bases"] == 1.0
    assert plasmid["kmer_bases"] == 0 and math.isnan(plasmid["kmer_entropy"])
    assert stats["viral"]["kept"] == 2 and stats["viral"]["duplicate_records"] == 0.0


def test_report_writes_the_table_and_three_plots(tmp_path, stats_shards):
    out = report(stats_shards, tmp_path / "r" / "stats.md", k=4, **QUIET)
    assert out == tmp_path / "r" / "stats.md"
    text = out.read_text()
    rows = _table_rows(text)
    assert set(rows) == {"viral", "mitochondrion"}
    assert rows["viral"][1:4] == ["4", "3", f"{3 * 48502 + 5386:,}"]
    assert rows["viral"][7] == "25.0%" and rows["viral"][9] == "33.3%" and rows["viral"][11] == "2"
    assert rows["mitochondrion"][1:3] == ["3", "2"] and rows["mitochondrion"][7] == "33.3%"
    assert rows["mitochondrion"][9] == "0.0%"
    assert "totals: 7 records (5 kept)" in text and "near-duplicate threshold 0.8" in text
    for name in ("lengths", "gc", "redundancy"):
        png = tmp_path / "r" / f"stats_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"({png.name})" in text


def test_cli_data_stats(tmp_path, stats_shards, capsys):
    out = tmp_path / "cli" / "data.md"
    args = ["data", "stats", "--shards", str(stats_shards), "--out", str(out), "--k", "4"]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    expected = report(stats_shards, tmp_path / "api.md", k=4, **QUIET).read_text()
    assert _table_rows(out.read_text()) == _table_rows(expected)
    assert f"nucleo data stats --shards {stats_shards} --out {out} --k 4" in out.read_text()
    assert sorted(p.name for p in out.parent.glob("*.png")) == [
        "data_gc.png",
        "data_lengths.png",
        "data_redundancy.png",
    ]
    assert main(["data", "stats", "--shards", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no shard manifest" in capsys.readouterr().err


# ----------------------------------------------------------------------------- CLI


def test_cli_data_corpus_from_local_packages(tmp_path, packages, capsys):
    tsv = _corpus_tsv(tmp_path / "corpus.tsv", CORPUS_ROWS)
    out = tmp_path / "corpus"
    args = [
        "data",
        "corpus",
        "--out",
        str(out),
        "--tsv",
        str(tsv),
        "--packages-from",
        str(packages),
    ]
    shard_args = ["--min-shards", "1", "--chunk-len", "4096", "--val-fraction", "0"]
    assert main([*args, *shard_args, "--near-dup-threshold", "0"]) == 0
    assert f"wrote {out / 'shards'}/manifest.json" in capsys.readouterr().out
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert set(manifest["kingdoms"]) == set(EXPECTED_IDS)
    assert manifest["options"]["near_dup_threshold"] == 0.0
    assert len(manifest["records"]) == sum(len(ids) for ids in EXPECTED_IDS.values())
    assert main([*args, *shard_args]) == 0  # again: the output is replaced
    capsys.readouterr()

    rows = [*CORPUS_ROWS, ("fungi", "deb", "pkg-missing", "1", "*.fa", "fasta", "", "")]
    bad = _corpus_tsv(tmp_path / "bad.tsv", rows)
    code = main(
        [
            "data",
            "corpus",
            "--out",
            str(tmp_path / "o"),
            "--tsv",
            str(bad),
            "--packages-from",
            str(packages),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("nucleo: error: ") and "no package file for pkg-missing" in err
