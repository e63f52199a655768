"""nucleo evaluate: reading frames across CDS parts, region classes, and bits per base per class
that equal the per-base likelihoods computed by hand (random weights: the arithmetic, not the
quality)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from data_pipeline.annotations import CodingPart, coding_parts, gff3_coding_part, gff3_rows
from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream import region_classes, regions
from nucleo.downstream.inference import log_likelihood
from nucleo.studies.precision import TINY
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model
from tests.conftest import sample_file

CPU = torch.device("cpu")
WINDOW = 64


def _positions(parts: list[CodingPart], length: int) -> str:
    """Codon positions of ``parts`` over ``length`` bases as text ('.' outside)."""
    out = ["."] * length
    for part in parts:
        for i, p in enumerate(part.codon_positions()):
            out[part.start + i] = str(p)
    return "".join(out)


# ----------------------------------------------------------------------------- reading frames


def test_codon_phase_follows_the_parts_in_transcription_order():
    # complement(join(...)): read 30..20 first (11 bases), then 10..1 continues mid-codon
    parts = coding_parts("complement(join(1..10,20..30))")
    assert parts == [CodingPart(19, 30, "-", 0), CodingPart(0, 10, "-", 1)]
    # read right to left: 29 is a codon's first base, 19 a second; 9 then ends that codon
    assert _positions(parts, 30) == "3213213213" + "." * 9 + "21321321321"
    # /codon_start=2: the first base of the first part ends a codon of the previous frame
    assert _positions(coding_parts("join(1..4,10..15)", codon_start=2), 15) == (
        "3123" + "....." + "123123"
    )
    # a remote part's bases count; a trans-spliced join keeps each part's strand
    assert coding_parts("join(J00194.1:1..4,10..15)") == [CodingPart(9, 15, "+", 2)]
    assert coding_parts("join(complement(20..25),1..6)") == [
        CodingPart(19, 25, "-", 0),
        CodingPart(0, 6, "+", 0),
    ]
    with pytest.raises(ValueError, match="codon_start"):
        coding_parts("1..9", codon_start=4)


def test_gff3_phase_gives_the_frame_of_each_cds_line(tmp_path):
    path = tmp_path / "x.gff3"
    path.write_text(
        "chr1\tsrc\tCDS\t11\t20\t.\t-\t2\tID=c\nchr1\tsrc\tCDS\t31\t36\t.\t+\t1\tID=d\n"
    )
    parts = [gff3_coding_part(f, phase) for _, f, phase, _ in gff3_rows(path)]
    # '-': from base 19 down, skip 2 bases, then 1 2 3; '+': from base 30, skip 1
    assert _positions(parts, 36) == "." * 10 + "2132132132" + "." * 10 + "312312"
    with pytest.raises(ValueError, match="phase must be 0, 1 or 2"):
        gff3_coding_part(next(gff3_rows(path))[1], ".")


def test_genbank_codons_hold_no_stop_but_the_last():
    """On a real GenBank file: every CDS read in the frames found has no internal stop."""
    path = sample_file("plasmid/NC_005816.gb.gz")
    (record,) = read_sequences(path)
    seq = bytes(record.seq)
    notes = region_classes.genbank_annotations(path)[record.id]
    assert len(notes.coding) >= 5
    stops = {b"TAA", b"TAG", b"TGA"}
    for part in notes.coding:
        text = seq[part.start : part.end]
        text = reverse_complement_bytes(text) if part.strand == "-" else text
        codons = [text[i : i + 3] for i in range(part.phase, len(text) - 2, 3)]
        assert not stops & set(codons[:-1]) and codons[-1] in stops


# ----------------------------------------------------------------------------- classes

GENBANK = """LOCUS       TOY1                 100 bp    DNA     linear   UNK
FEATURES             Location/Qualifiers
     source          1..100
     gene            5..60
     mRNA            join(10..20,30..50)
     CDS             join(15..20,30..45)
                     /codon_start=1
                     /note="a note
                     on two lines"
     CDS             complement(40..45)
     tRNA            70..75
     rRNA            72..80
     ncRNA           85..88
     repeat_region   90..92
ORIGIN
        1 {seq}
//
"""


def test_each_base_gets_the_class_that_takes_precedence(tmp_path):
    path = tmp_path / "toy.gb"
    path.write_text(GENBANK.format(seq="a" * 100))
    note = region_classes.genbank_annotations(path)["TOY1"]
    letters = {"cds1": "1", "cds2": "2", "cds3": "3", "cds_frames": "X", "utr": "U",
               "intron": "I", "rrna": "R", "trna": "T", "ncrna": "N", "other": "O",
               "intergenic": "."}  # fmt: skip
    got = "".join(letters[region_classes.CLASSES[c]] for c in region_classes.classify(100, note))
    expected = (
        "...." + "OOOOO" + "UUUUU" + "123123" + "IIIIIIIII"  # 0-28: gene, UTR exon, CDS, intron
        + "1231231231" + "XX1XX1" + "UUUUU"  # 29-49: CDS (frames clash with the - CDS), UTR
        + "OOOOOOOOOO" + "........." + "TT" + "RRRRRRRRR"  # 50-79: gene, tRNA under rRNA
        + "...." + "NNNN" + "." + "OOO" + "........"  # 80-99
    )  # fmt: skip
    assert got == expected
    # a record with UTR features: only they are UTR, other exon bases stay "other feature"
    with_utr = GENBANK.replace("     tRNA ", "     5'UTR           10..12\n     tRNA ")
    path.write_text(with_utr.format(seq="a" * 100))
    got = region_classes.classify(100, region_classes.genbank_annotations(path)["TOY1"])
    assert [region_classes.CLASSES[c] for c in got[9:15]] == ["utr"] * 3 + ["other"] * 2 + ["cds1"]


# ----------------------------------------------------------------------------- scoring


class Previous:
    """A stand-in for data_pipeline.markov.MarkovModel: 1 nat when a base repeats the one
    before it, 2 nats otherwise, NaN without context or at N."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def nats(self, seq: bytes, order: int) -> np.ndarray:
        assert order == 1
        self.calls.append(len(seq))
        arr = np.frombuffer(seq, np.uint8)
        out = np.where(arr[1:] == arr[:-1], 1.0, 2.0)
        out = np.concatenate([[np.nan], out])
        out[arr == ord("N")] = np.nan
        return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    cfg = load_config(arch="transformer", overrides=TINY["transformer"])
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, CharTokenizer()).eval()
    out = tmp_path_factory.mktemp("regions") / "run-a" / "export"
    export_model(model.state_dict(), cfg, CharTokenizer(), out)
    return out, model


@pytest.fixture
def genome(tmp_path):
    """A GFF3 and its soft-masked FASTA beside it (names as NCBI ships them)."""
    rng = random.Random(3)
    seq = "".join(rng.choice("ACGT") for _ in range(300))
    seq = seq[:100] + seq[100:150].lower() + seq[150:260] + "NNNN" + seq[264:]
    (tmp_path / "toy_GCF_1_genomic.fna").write_text(f">chr1 toy\n{seq[:150]}\n{seq[150:]}\n")
    rows = [
        ("region", 1, 300, "+", "."), ("gene", 21, 200, "+", "."), ("mRNA", 21, 200, "+", "."),
        ("exon", 21, 60, "+", "."), ("exon", 101, 200, "+", "."), ("CDS", 41, 60, "+", "0"),
        ("CDS", 101, 180, "+", "1"), ("tRNA", 230, 260, "-", "."),
    ]  # fmt: skip
    gff = tmp_path / "toy.gff"
    gff.write_text(
        "".join(f"chr1\tsrc\t{t}\t{a}\t{b}\t.\t{s}\t{p}\tID=x\n" for t, a, b, s, p in rows)
    )
    return gff, seq


def _by_hand(model, seq: bytes) -> np.ndarray:
    """[len(seq)] nats of each base given the bases before it in its window of WINDOW
    (consecutive windows; NaN at each window's first base and at N)."""
    ids = torch.from_numpy(CharTokenizer().encode(seq)).long()
    out = np.full(len(seq), np.nan)
    for start in range(0, len(seq), WINDOW):
        piece = ids[start : start + WINDOW]
        with torch.no_grad():
            logp = torch.log_softmax(model(piece[None]).logits[0, :-1].float(), -1)
        out[start + 1 : start + len(piece)] = -logp.gather(-1, piece[1:, None])[:, 0].numpy()
    out[np.frombuffer(seq, np.uint8) == ord("N")] = np.nan
    return out


def test_bits_per_class_are_the_mean_of_the_per_base_likelihoods(export, genome):
    path, model = export
    gff, text = genome
    net = regions.load_network(f"A={path.parent}", CPU, window=WINDOW)
    assert (net.name, net.window, net.path) == ("A", WINDOW, path)
    targets = region_classes.targets_from_files([gff], "fungi")
    floor = Previous()
    report = regions.evaluate([net], targets, CPU, 10**6, 3, (floor, 1, "prev"), log=lambda _: 0)
    tally, low = report.tallies[0], report.floors[0]

    seq = text.upper().encode()
    nats = _by_hand(model, seq)
    classes = region_classes.classify(len(seq), targets[0].annotation)
    repeat = np.array([c.islower() for c in text])
    whole = floor.nats(seq, 1)
    for klass in region_classes.CLASSES:
        where = (classes == region_classes.CODE[klass]) & np.isfinite(nats)
        bases, got = tally.cell("fungi", klass, "all")
        assert bases == where.sum()
        if bases:
            assert got / bases == pytest.approx(nats[where].mean(), rel=1e-5)
            assert low.cell("fungi", klass, "all")[1] / bases == pytest.approx(whole[where].mean())
    assert {"cds1", "cds3", "utr", "intron", "trna", "intergenic"} <= {
        k for k in region_classes.CLASSES if tally.cell("fungi", k, "all")[0]
    }
    # the repeat flag: the soft-masked bases, across classes
    assert tally.cell("all", "all", "repeat")[0] == (repeat & np.isfinite(nats)).sum() > 0
    assert tally.cell("all", "all", "all")[0] == np.isfinite(nats).sum() == 300 - 5 - 4
    # without N, the bases are nucleo score's, consecutive or strided windows alike
    clean = seq.replace(b"N", b"A")
    for stride in (None, 40):
        net.stride = stride
        per_base, _ = regions.base_nats(net, clean, 3, CPU)
        total, scored, _ = log_likelihood(model, CharTokenizer(), clean, WINDOW, 3, CPU, stride)
        assert np.isfinite(per_base).sum() == scored == (295 if stride is None else 299)
        assert np.nansum(per_base) == pytest.approx(-total, rel=1e-5)


def test_the_python_api_gives_the_commands_numbers(export, genome):
    import nucleo

    path, _ = export
    gff, _ = genome
    lm = nucleo.load(path.parent, device="cpu")
    report = lm.evaluate_regions(annotations=[gff], kingdom="fungi", window=WINDOW, log=print)
    net = regions.load_network(path, CPU, window=WINDOW)
    again = regions.evaluate([net], region_classes.targets_from_files([gff], "fungi"), CPU)
    assert report.networks[0]["name"] == "run-a" and report.kingdoms == ["fungi"]
    assert np.array_equal(report.tallies[0].bases, again.tallies[0].bases)
    assert np.allclose(report.tallies[0].nats, again.tallies[0].nats)


def test_a_budget_scores_evenly_spaced_whole_windows():
    spans = regions.chosen_windows(1000, 100, None, 300)
    assert [s[0] for s in spans] == [0, 300, 600, 900]
    assert regions.chosen_windows(1000, 100, None, 10**9) == regions.windows(1000, 100)


def test_evaluate_command_writes_table_json_and_plot(export, genome, tmp_path):
    from data_pipeline.markov import MarkovModel

    path, _ = export
    gff, text = genome
    floor = MarkovModel.fit([text.encode()], max_order=2).save(tmp_path / "m.npz")
    out = tmp_path / "res" / "regions.md"
    argv = ["evaluate", "--model", f"a={path}", "--model", f"b={path.parent}"]
    argv += ["--annotations", str(gff), "--kingdom", "fungi", "--window", "32"]
    argv += ["--markov", str(floor), "--markov-order", "2", "--max-bases-per-kingdom", "200"]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert "## a (transformer, window 32)" in text and "## b " in text
    assert "### markov order 2 on the same bases" in text and "| CDS codon position 1 |" in text
    assert (
        "## Side by side (all kingdoms)\n\n| class | a | markov order 2 (a's bases) | b |" in text
    )
    data = json.loads(out.with_suffix(".json").read_text())
    assert [m["name"] for m in data["models"]] == ["a", "b"]
    rows = {(r["kingdom"], r["class"], r["repeat"]): r for r in data["models"][0]["rows"]}
    first = rows[("fungi", "all", "all")]
    assert 150 <= first["bases"] <= 260  # about the budget, in whole windows of 32
    assert first["bits_per_base"] == pytest.approx(first["nats"] / first["bases"] / math.log(2))
    low = {(r["kingdom"], r["class"], r["repeat"]): r for r in data["models"][0]["floor_rows"]}
    assert low[("fungi", "all", "all")]["bases"] == first["bases"]
    assert 0.5 < low[("fungi", "all", "all")]["bits_per_base"] < 2.5  # fit on these bases
    assert data["settings"]["command"].startswith("nucleo evaluate --model a=")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_one_line_errors(export, genome, tmp_path, capsys):
    cfg = load_config(arch="transformer", overrides=[*TINY["transformer"], "model.causal=false"])
    bidir = export_model(build_model(cfg.arch, cfg.model, CharTokenizer()).state_dict(), cfg,
                         CharTokenizer(), tmp_path / "bidir")  # fmt: skip
    gff, _ = genome
    lonely = tmp_path / "other" / "lonely.gff"
    lonely.parent.mkdir()
    lonely.write_text(gff.read_text())
    cases = [
        (["--model", str(bidir), "--annotations", str(gff)], "bidirectionally"),
        (["--model", str(export[0]), "--annotations", str(lonely)], "no genome FASTA"),
        (["--model", str(tmp_path / "nothing"), "--annotations", str(gff)], "not an export"),
    ]
    for argv, words in cases:
        assert main(["evaluate", *argv, "--out", str(tmp_path / "x.md")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err and err.startswith("nucleo: error: ")
        assert argv[1] in err or argv[3] in err
