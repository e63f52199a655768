"""nucleo score-variants: VCF reading, reference checks, and scores that equal the model called
by hand (random weights: the arithmetic, not the quality)."""

from __future__ import annotations

import gzip
import random
from collections import Counter

import pytest
import torch

from data_pipeline.tokenizers import CharTokenizer, KmerTokenizer
from data_pipeline.vcf import VcfFormatError, read_header, read_variants
from nucleo.cli.main import main
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.downstream.variants import (
    CHROM,
    EDGE,
    INDEL,
    REF,
    SCORED,
    SYMBOLIC,
    Reference,
    score_variants,
    too_long,
)
from nucleo.studies.precision import TINY
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model

random.seed(20)
SEQ = "".join(random.choice("ACGT") for _ in range(300)).encode()
OTHER = {"A": "C", "C": "G", "G": "T", "T": "A"}
WINDOW = 64


def base(pos: int) -> str:
    """The reference base at 1-based ``pos`` of chrA."""
    return chr(SEQ[pos - 1])


def _model(causal: bool):
    extra = [] if causal else ["model.causal=false"]
    cfg = load_config(arch="transformer", overrides=[*TINY["transformer"], *extra])
    torch.manual_seed(0)
    return build_model(cfg.arch, cfg.model, CharTokenizer()).eval(), cfg


@pytest.fixture(scope="module")
def causal():
    return _model(True)


@pytest.fixture(scope="module")
def bidirectional():
    return _model(False)


@pytest.fixture
def files(tmp_path):
    """A two-record reference and a VCF on it: SNV, multi-allelic, deletion, insertion,
    symbolic ALTs, a too-long allele and a variant at the first base (no left context)."""
    ref = tmp_path / "ref.fa"
    ref.write_text(f">chrA desc\n{SEQ.decode()}\n>chrB\n{SEQ[:200].decode()}\n")
    snv_alt = OTHER[base(100)]
    lines = [
        "##fileformat=VCFv4.2",
        "##contig=<ID=chrA,length=300>",
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO",
        f"chrA\t100\trs1\t{base(100)}\t{snv_alt}\t50\tPASS\tDP=10",
        f"chrA\t120\t.\t{base(120)}\t{OTHER[base(120)]},{OTHER[OTHER[base(120)]]},*\t.\t.\t.",
        f"chrA\t150\tdel\t{SEQ[149:152].decode()}\t{base(150)}\t.\t.\t.",
        f"chrB\t50\tins\t{base(50)}\t{base(50)}TTG\t.\t.\t.",
        f"chrA\t200\tsv\t{base(200)}\t<DEL>,.\t.\t.\tSVTYPE=DEL",
        f"chrA\t210\tlong\t{SEQ[209:215].decode()}\t{base(210)}\t.\t.\t.",
        f"chrA\t1\tfirst\t{base(1)}\t{OTHER[base(1)]}\t.\t.\t.",
    ]
    vcf = tmp_path / "calls.vcf"
    vcf.write_text("\n".join(lines) + "\n")
    vcf_gz = tmp_path / "calls.vcf.gz"
    vcf_gz.write_bytes(gzip.compress(vcf.read_bytes()))
    return ref, vcf, vcf_gz


def _nats(model, window: bytes) -> float:
    """log P(window) by hand: sum of log p(token | tokens before it), the first not scored."""
    ids = torch.from_numpy(CharTokenizer().encode(window))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(logp.gather(-1, ids[0, 1:, None]).sum())


def _llr(model, left: bytes, ref: bytes, alt: bytes, right: bytes) -> tuple[float, float]:
    fwd = _nats(model, left + alt + right) - _nats(model, left + ref + right)
    rc = reverse_complement_bytes
    rev = _nats(model, rc(left + alt + right)) - _nats(model, rc(left + ref + right))
    return fwd, rev


def test_the_vcf_reader_reads_plain_and_gzip_one_variant_per_alt(files):
    _ref, vcf, vcf_gz = files
    plain, packed = list(read_variants(vcf)), list(read_variants(vcf_gz))
    assert [(v.chrom, v.pos, v.ref, v.alt, v.allele, v.line) for v in plain] == [
        (v.chrom, v.pos, v.ref, v.alt, v.allele, v.line) for v in packed
    ]
    assert len(plain) == 10 and [v.allele for v in plain[1:4]] == [1, 2, 3]
    assert [v.symbolic for v in plain].count(True) == 3  # *, <DEL>, .
    assert plain[0].where == f"{vcf}:4" and read_header(vcf_gz)[-1].startswith("#CHROM")


def test_malformed_lines_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.vcf"
    bad.write_text("#CHROM\tPOS\tID\tREF\tALT\nchrA\tten\t.\tA\tC\n")
    with pytest.raises(VcfFormatError, match=r"bad.vcf:2: POS 'ten'"):
        list(read_variants(bad))
    bad.write_text("chrA\t5\t.\tA\tQ\n")
    with pytest.raises(VcfFormatError, match=r"bad.vcf:1: ALT 'Q' is not bases"):
        list(read_variants(bad))


def test_causal_scores_are_log_likelihood_ratios_of_windows_with_the_same_flanks(causal, files):
    model, _cfg = causal
    ref, vcf, _ = files
    counts: Counter[str] = Counter()
    scores = list(
        score_variants(
            model, CharTokenizer(), read_variants(vcf), Reference(ref), window=WINDOW, batch=3,
            max_allele_length=5, counts=counts,
        )
    )  # fmt: skip
    by = {(s.variant.pos, s.variant.alt): s for s in scores}
    # SNV at 100: 63 flanking bases, 31 left and 32 right of it
    s = by[(100, OTHER[base(100)])]
    fwd, rev = _llr(model, SEQ[68:99], SEQ[99:100], OTHER[base(100)].encode(), SEQ[100:132])
    assert s.forward == pytest.approx(fwd, abs=1e-5) and s.reverse == pytest.approx(rev, abs=1e-5)
    assert s.score == pytest.approx((fwd + rev) / 2, abs=1e-5) and s.skipped == ""
    # multi-allelic: each ALT against the same reference window
    for alt in (OTHER[base(120)], OTHER[OTHER[base(120)]]):
        fwd, rev = _llr(model, SEQ[88:119], SEQ[119:120], alt.encode(), SEQ[120:152])
        assert by[(120, alt)].score == pytest.approx((fwd + rev) / 2, abs=1e-5)
    # deletion of 2 bases: flanks of 64 - 3 = 61 bases (30 left, 31 right), windows 64 and 62
    fwd, rev = _llr(model, SEQ[119:149], SEQ[149:152], SEQ[149:150], SEQ[152:183])
    assert by[(150, base(150))].score == pytest.approx((fwd + rev) / 2, abs=1e-5)
    # insertion near the end of chrB (200 bases): 60 flanking bases, 30 + 30
    fwd, rev = _llr(model, SEQ[19:49], SEQ[49:50], SEQ[49:50] + b"TTG", SEQ[50:80])
    assert by[(50, base(50) + "TTG")].score == pytest.approx((fwd + rev) / 2, abs=1e-5)
    assert by[(1, OTHER[base(1)])].skipped == EDGE and by[(210, base(210))].skipped == too_long(5)
    assert counts == {SCORED: 5, SYMBOLIC: 3, EDGE: 1, too_long(5): 1}
    # forward strand only, a window shifted inward at the record's end (pos 299 of 300)
    near_end = tmp_vcf(vcf.parent, [f"chrA\t299\t.\t{base(299)}\t{OTHER[base(299)]}"])
    (end,) = score_variants(
        model, CharTokenizer(), read_variants(near_end), Reference(ref), window=WINDOW,
        strands="forward",
    )  # fmt: skip
    fwd, _ = _llr(model, SEQ[236:298], SEQ[298:299], OTHER[base(299)].encode(), SEQ[299:300])
    assert end.score == pytest.approx(fwd, abs=1e-5) and end.reverse != end.reverse  # NaN


def tmp_vcf(folder, rows: list[str]):
    path = folder / "more.vcf"
    path.write_text("".join(row + "\t.\t.\t.\n" for row in rows))
    return path


def test_bidirectional_scores_are_masked_marginals_and_skip_indels(bidirectional, files):
    model, _cfg = bidirectional
    ref, vcf, _ = files
    tok = CharTokenizer()
    scores = list(score_variants(model, tok, read_variants(vcf), Reference(ref), window=WINDOW))
    by = {(s.variant.pos, s.variant.alt): s for s in scores}
    window = SEQ[68:132]  # 63 flanking bases around position 100 (index 31 of the window)

    def marginal(win: bytes, at: int, ref_base: str, alt_base: str) -> float:
        ids = torch.from_numpy(tok.encode(win))
        ids[at] = tok.mask_id
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0, at].float(), -1)
        code = {b: i for i, b in enumerate("ACGT")}
        return float(logp[code[alt_base]] - logp[code[ref_base]])

    alt = OTHER[base(100)]
    fwd = marginal(window, 31, base(100), alt)
    comp = {"A": "T", "C": "G", "G": "C", "T": "A"}
    rev = marginal(reverse_complement_bytes(window), 32, comp[base(100)], comp[alt])
    s = by[(100, alt)]
    assert s.forward == pytest.approx(fwd, abs=1e-5) and s.reverse == pytest.approx(rev, abs=1e-5)
    assert s.score == pytest.approx((fwd + rev) / 2, abs=1e-5)
    assert by[(150, base(150))].skipped == INDEL and by[(50, base(50) + "TTG")].skipped == INDEL
    assert by[(1, OTHER[base(1)])].skipped == ""  # masked at the window's edge: still scored
    with pytest.raises(ValueError, match="one token per base"):
        score_variants(model, KmerTokenizer(), [], Reference(ref))


def test_mismatched_chromosomes_and_ref_alleles_stop_or_are_skipped(causal, files, tmp_path):
    model, _cfg = causal
    ref, _vcf, _ = files
    rows = ["A\t10\t.\tA\tC", f"chrA\t20\t.\t{OTHER[base(20)]}\tA", f"chrA\t30\t.\t{base(30)}\tG"]
    vcf = tmp_vcf(tmp_path, rows)
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"more.vcf:1: CHROM 'A' .* the reference has 'chrA'"):
        list(score_variants(model, tok, read_variants(vcf), Reference(ref), window=WINDOW))
    vcf = tmp_vcf(tmp_path, rows[1:])
    with pytest.raises(ValueError, match=rf"more.vcf:1: REF '{OTHER[base(20)]}' at chrA:20"):
        list(score_variants(model, tok, read_variants(vcf), Reference(ref), window=WINDOW))
    vcf = tmp_vcf(tmp_path, rows)
    counts: Counter[str] = Counter()
    scores = list(
        score_variants(
            model, tok, read_variants(vcf), Reference(ref), window=WINDOW, skip_mismatches=True,
            counts=counts,
        )
    )  # fmt: skip
    assert [s.skipped for s in scores] == [CHROM, REF, ""]
    assert counts == {CHROM: 1, REF: 1, SCORED: 1}


def test_the_command_writes_an_annotated_bgzf_vcf_and_errors_in_one_line(
    causal, files, tmp_path, capsys
):
    model, cfg = causal
    ref, vcf, vcf_gz = files
    export = export_model(model.state_dict(), cfg, CharTokenizer(), tmp_path / "export")
    out = tmp_path / "scored.vcf.gz"
    argv = ["score-variants", str(export), "--vcf", str(vcf_gz), "--reference", str(ref)]
    assert main([*argv, "--out", str(out), "--window", str(WINDOW), "--batch-size", "4"]) == 0
    said = capsys.readouterr().out
    assert "scored 6 of 10 ALT allele(s); skipped 4: 3 symbolic" in said
    raw = out.read_bytes()
    eof = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
    assert raw[12:16] == b"BC\x02\x00" and raw.endswith(eof)  # BGZF blocks, its EOF marker
    text = gzip.decompress(raw).decode().splitlines()
    assert len(list(read_variants(out))) == 10  # read back, block by block
    info = [h for h in text if h.startswith("##INFO=<ID=NUCLEO_LLR,Number=A,Type=Float")]
    assert len(info) == 1 and text.index(info[0]) < text.index(
        next(h for h in text if h[:2] == "#C")
    )
    data = [line.split("\t") for line in text if not line.startswith("#")]
    assert len(data) == 7 and data[0][7].startswith("DP=10;NUCLEO_LLR=")
    expected = list(score_variants(model, CharTokenizer(), read_variants(vcf), Reference(ref),
                                   window=WINDOW))  # fmt: skip
    got = [v for row in data for v in row[7].split("NUCLEO_LLR=")[1].split(",")]
    want = ["." if s.skipped else s.score for s in expected]
    assert len(got) == len(want) == 10
    for g, w in zip(got, want, strict=True):
        assert g == w if w == "." else float(g) == pytest.approx(w, abs=1e-3)
    assert data[4][7].endswith("NUCLEO_LLR=.,.")  # <DEL>,.

    wrong = tmp_vcf(tmp_path, [f"chrA\t20\t.\t{OTHER[base(20)]}\tA"])
    argv = ["score-variants", str(export), "--vcf", str(wrong), "--reference", str(ref)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nucleo: error: {wrong}:1: REF") and "\n" not in err
