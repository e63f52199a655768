"""Variant-effect scores: how much a model prefers each ALT allele of a VCF to the reference.

    nucleo score-variants EXPORT --vcf calls.vcf.gz --reference genome.fa [--out scores.tsv]

Causal models: the log-likelihood ratio ``log P(alt window) - log P(ref window)`` in nats. The
two windows share their flanks, cut from the reference around the variant: ref = left + REF +
right, alt = left + ALT + right. The flanks hold a window's worth of bases minus the longer
allele (``window`` tokens: ``window`` bases for ``char``, ``window * k`` for ``kmer``), split
evenly, shifted inward near the ends of a record (never wrapped around a circular one). For an
indel the windows differ in length by len(ALT) - len(REF): the ratio compares the same flanks
with one middle or the other, the right flank scored in both given what precedes it. A
window's log P is ``window_scores``'s: the sum of log p(token | the tokens before it), the
first token being context, so a variant needs one token of left context (and of right context
for the reverse strand), else it is skipped. Strand ``both`` averages the ratio with that of
the reverse-complemented windows.

Bidirectional models (the masked marginal of Meier et al. 2021, as GPN scores variants): the
bases of REF are masked in the reference window and one forward pass gives ``log p(ALT) - log
p(REF)`` at those positions, summed over them (SNVs and equal-length substitutions; the
softmax's normaliser cancels, so this is the same over the vocabulary or over A/C/G/T). Indels
are skipped and counted. Tokenizers whose tokens are not single bases (kmer, bpe) are refused:
a masked k-mer has no per-base probability.

Negative scores: the model finds the ALT allele less likely than the reference allele. The
reference is held in memory (about a byte per base: bacterial, organellar and plasmid genomes,
a chromosome; a human genome would take ~3 GB).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from data_pipeline.readers import read_sequences
from data_pipeline.vcf import Variant, read_variants
from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.device import resolve as resolve_device
from nucleo.downstream.classifier import pad
from nucleo.downstream.inference import window_scores

STRANDS = ("both", "forward")
SCORED = "scored"
# why an allele was not scored (keys of the counts, the TSV's ``skipped`` column)
SYMBOLIC = "symbolic or missing ALT (<...>, *, ., breakend)"
CHROM = "CHROM not in the reference"
REF = "REF differs from the reference"
INDEL = "indel (a bidirectional model scores substitutions only)"
EDGE = "no context (at the end of its record)"


def too_long(limit: int) -> str:
    return f"allele longer than {limit} bases"


@dataclass
class VariantScore:
    """One ALT allele's score in nats (NaN where skipped: ``skipped`` says why); ``forward`` and
    ``reverse`` are the strands' scores (``reverse`` NaN with strands ``forward``)."""

    variant: Variant
    score: float
    forward: float
    reverse: float
    skipped: str = ""


class Reference:
    """Every record of a FASTA or GenBank file (compressed or not) in memory, by id; a record
    is also found by its accession when that differs from its id."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.seqs: dict[str, bytes] = {}
        self.aliases: dict[str, str] = {}
        for record in read_sequences(path):
            self.seqs[record.id] = bytes(record.seq)
            if record.accession and record.accession != record.id:
                self.aliases.setdefault(record.accession, record.id)
        if not self.seqs:
            raise ValueError(f"{path}: no sequence records in the reference")

    def get(self, name: str) -> bytes | None:
        return self.seqs.get(name) or self.seqs.get(self.aliases.get(name, ""))

    def hint(self, name: str) -> str:
        """What the user may have meant: the 'chr' prefix, an accession's version, or a list."""
        names = list(self.seqs)
        stem = name.split(".")[0]
        close = [
            n for n in names
            if n == f"chr{name}" or (name.lower().startswith("chr") and n == name[3:])
            or n.split(".")[0] == stem
        ]  # fmt: skip
        if close:
            return (
                f"; the reference has {close[0]!r}: rename the VCF's chromosomes to match "
                "(e.g. bcftools annotate --rename-chrs) or the reference's records"
            )
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"; its records are {shown}"


def check(
    variant: Variant,
    reference: Reference,
    max_allele_length: int,
    causal: bool,
    skip_mismatches: bool = False,
) -> str:
    """Why ``variant`` cannot be scored ("" when it can). A CHROM missing from the reference or
    a REF that differs from it raises ValueError naming the line, unless ``skip_mismatches``."""
    seq = reference.get(variant.chrom)
    if seq is None:
        if skip_mismatches:
            return CHROM
        raise ValueError(
            f"{variant.where}: CHROM {variant.chrom!r} is not a record of {reference.path}"
            f"{reference.hint(variant.chrom)} (--skip-mismatches skips such lines)"
        )
    start = variant.pos - 1
    found = seq[start : start + len(variant.ref)].decode()
    if found != variant.ref:
        if skip_mismatches:
            return REF
        there = (
            f"where the reference has {found!r}"
            if len(found) == len(variant.ref)
            else f"past the end of {variant.chrom} ({len(seq)} bases)"
        )
        raise ValueError(
            f"{variant.where}: REF {variant.ref!r} at {variant.chrom}:{variant.pos} {there}; "
            "is the VCF on another assembly? (--skip-mismatches skips such lines)"
        )
    if variant.symbolic:
        return SYMBOLIC
    if max(len(variant.ref), len(variant.alt)) > max_allele_length:
        return too_long(max_allele_length)
    if not causal and len(variant.ref) != len(variant.alt):
        return INDEL
    return ""


def window_span(length: int, start: int, ref_len: int, alt_len: int, bases: int) -> tuple[int, int]:
    """[lo, hi) of a record of ``length`` bases around REF at [start, start + ref_len): up to
    ``bases - max(ref_len, alt_len)`` flanking bases, half on each side, shifted inward where
    one side reaches the record's end."""
    flank = max(bases - max(ref_len, alt_len), 0)
    left = min(flank // 2, start)
    right = min(flank - left, length - start - ref_len)
    left = min(flank - right, start)
    return start - left, start + ref_len + right


def window_bases(tokenizer: Any, window: int, sample: bytes) -> int:
    """Bases in a window of ``window`` tokens: ``window`` (char), ``window * k`` (kmer), or
    ``window`` times the bases per token of ``sample`` (bpe, rounded down)."""
    name = getattr(tokenizer, "name", "char")
    if name == "char":
        return window
    if name == "kmer":
        return window * int(tokenizer.k)
    ids = tokenizer.encode(sample)
    return window * max(1, len(sample) // max(len(ids), 1))


class _Scorer:
    """Scores alleles a chunk at a time: each distinct window (or masked window) runs once,
    ``batch`` windows per forward pass, shortest first."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, bases: int, strands: str, batch: int
    ) -> None:
        self.model, self.tokenizer, self.bases, self.batch = model, tokenizer, bases, batch
        self.causal = bool(getattr(model, "causal", True))
        self.both = strands == "both"
        self.context = int(getattr(tokenizer, "max_bases_per_token", 1))
        self.device = next(model.parameters()).device
        self.ids = {b: int(tokenizer.encode(bytes([b]))[0]) for b in b"ACGTN"}

    def _run(self, jobs: list[Any]) -> list[Any]:
        """Per job: a window's nats (causal: bytes), or the [r, V] log-probabilities at its
        masked positions (bidirectional: (bytes, start, r))."""
        tok = self.tokenizer
        if self.causal:
            ids = [tok.encode(w) for w in jobs]
        else:
            ids = []
            for w, s, r in jobs:
                row = tok.encode(w)
                row[s : s + r] = tok.mask_id
                ids.append(row)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[Any] = [None] * len(jobs)
        for first in range(0, len(order), self.batch):
            rows = order[first : first + self.batch]
            tokens, mask = pad(ids, rows, tok.pad_id)  # type: ignore[arg-type]
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            if self.causal:
                scored = window_scores(self.model, tok, tokens, mask)
                for r, (nats, _n, _b) in zip(rows, scored, strict=True):
                    out[r] = nats
                continue
            with torch.no_grad():
                logp = torch.log_softmax(self.model(tokens, attention_mask=mask).logits.float(), -1)
            for i, r in enumerate(rows):
                _w, s, n = jobs[r]
                out[r] = logp[i, s : s + n].cpu()
        return out

    def _marginal(self, logp: torch.Tensor, ref: bytes, alt: bytes) -> float:
        return sum(
            float(logp[j, self.ids[a]] - logp[j, self.ids[b]])
            for j, (a, b) in enumerate(zip(alt, ref, strict=True))
        )

    def chunk(
        self, variants: list[Variant], reference: Reference, reasons: list[str]
    ) -> list[VariantScore]:
        """Scores of ``variants`` (``reasons[i]``: why variant i is skipped, or "")."""
        jobs: dict[Any, int] = {}

        def job(key: Any) -> int:
            return jobs.setdefault(key, len(jobs))

        plans: list[Any] = []
        for v, reason in zip(variants, reasons, strict=True):
            seq = reference.get(v.chrom) if not reason else None
            if seq is None:
                plans.append(reason)
                continue
            start, r = v.pos - 1, len(v.ref)
            lo, hi = window_span(len(seq), start, r, len(v.alt), self.bases)
            left, right = seq[lo:start], seq[start + r : hi]
            if self.causal and (
                len(left) < self.context or (self.both and len(right) < self.context)
            ):
                plans.append(EDGE)
                continue
            ref_w, alt_w = left + v.ref.encode(), left + v.alt.encode()
            ref_w, alt_w = ref_w + right, alt_w + right
            if self.causal:
                strands = [(job(alt_w), job(ref_w))]
                if self.both:
                    rc = reverse_complement_bytes
                    strands.append((job(rc(alt_w)), job(rc(ref_w))))
            else:
                strands = [(job((ref_w, len(left), r)), v.ref.encode(), v.alt.encode())]
                if self.both:
                    rc_w = reverse_complement_bytes(ref_w)
                    rc_ref = reverse_complement_bytes(v.ref.encode())
                    rc_alt = reverse_complement_bytes(v.alt.encode())
                    strands.append((job((rc_w, len(right), r)), rc_ref, rc_alt))
            plans.append(strands)
        results = self._run(list(jobs))
        out = []
        nan = math.nan
        for v, plan in zip(variants, plans, strict=True):
            if isinstance(plan, str):
                out.append(VariantScore(v, nan, nan, nan, plan))
                continue
            if self.causal:
                per = [results[a] - results[b] for a, b in plan]
            else:
                per = [self._marginal(results[j], ref, alt) for j, ref, alt in plan]
            out.append(VariantScore(v, sum(per) / len(per), per[0], per[1] if self.both else nan))
        return out


def score_variants(
    model: nn.Module,
    tokenizer: Any,
    variants: Iterable[Variant],
    reference: Reference,
    window: int = 1024,
    strands: str = "both",
    batch: int = 8,
    max_allele_length: int = 50,
    skip_mismatches: bool = False,
    counts: Counter[str] | None = None,
) -> Iterator[VariantScore]:
    """A VariantScore per ALT allele of ``variants``, in order (skipped ones included, NaN with
    their reason); ``counts`` (when given) is filled as they are read: ``scored`` and each
    reason. Arguments are checked before this returns; mismatches raise as they are met."""
    causal = bool(getattr(model, "causal", True))
    if strands not in STRANDS:
        raise ValueError(f"strands {strands!r}: choose one of {', '.join(STRANDS)}")
    if batch < 1 or max_allele_length < 1:
        raise ValueError(
            f"batch and max_allele_length must be >= 1, got {batch}, {max_allele_length}"
        )
    if not causal and getattr(tokenizer, "name", "") != "char":
        raise ValueError(
            f"a bidirectional model with the {tokenizer.name!r} tokenizer: masked-marginal "
            "scores need one token per base (the 'char' tokenizer)"
        )
    sample = next(iter(reference.seqs.values()))[:100_000]
    bases = window_bases(tokenizer, window, sample)
    context = int(getattr(tokenizer, "max_bases_per_token", 1))
    if bases < max_allele_length + 2 * context:
        raise ValueError(
            f"window {window} tokens holds {bases} bases: too few for alleles of up to "
            f"{max_allele_length} bases and their context; use a window of at least "
            f"{max_allele_length + 2 * context} bases"
        )
    scorer = _Scorer(model, tokenizer, bases, strands, batch)
    tally: Counter[str] = Counter() if counts is None else counts

    def run() -> Iterator[VariantScore]:
        chunk: list[Variant] = []
        reasons: list[str] = []
        for variant in variants:
            chunk.append(variant)
            reasons.append(check(variant, reference, max_allele_length, causal, skip_mismatches))
            if len(chunk) >= 8 * batch:
                yield from _counted(scorer.chunk(chunk, reference, reasons), tally)
                chunk, reasons = [], []
        if chunk:
            yield from _counted(scorer.chunk(chunk, reference, reasons), tally)

    return run()


def _counted(scores: list[VariantScore], tally: Counter[str]) -> list[VariantScore]:
    for s in scores:
        tally[s.skipped or SCORED] += 1
    return scores


def summary(counts: Counter[str]) -> str:
    """``scored 120 of 130 alleles; skipped 10: 6 symbolic or missing ALT, 4 ...``."""
    total = sum(counts.values())
    line = f"scored {counts[SCORED]} of {total} ALT allele(s)"
    skipped = [(n, why) for why, n in counts.most_common() if why != SCORED]
    if skipped:
        line += f"; skipped {sum(n for n, _ in skipped)}: " + ", ".join(
            f"{n} {why}" for n, why in skipped
        )
    return line


def score_vcf(
    export: str | Path,
    vcf: str | Path,
    reference: str | Path,
    window: int = 1024,
    strands: str = "both",
    batch: int = 8,
    device: str = "auto",
    max_allele_length: int = 50,
    skip_mismatches: bool = False,
    say: Callable[[str], Any] | None = None,
) -> tuple[Iterator[VariantScore], Counter[str], dict[str, Any]]:
    """(scores of every ALT allele of ``vcf`` in file order, counts filled as they are read,
    the export's config). The export and reference are loaded and every line of the VCF is
    checked first (a malformed line or a mismatch raises before anything is scored). ``say``:
    a progress line every 10 s."""
    from nucleo.train.export import load_exported

    dev = resolve_device(device)
    model, tokenizer, meta = load_exported(export, dev)
    ref = Reference(reference)
    counts: Counter[str] = Counter()
    scores = score_variants(  # checks its arguments now, scores when read
        model, tokenizer, read_variants(vcf), ref, window, strands, batch, max_allele_length,
        skip_mismatches, counts,
    )  # fmt: skip
    causal = bool(meta.get("causal", True))
    total = 0
    for variant in read_variants(vcf):
        check(variant, ref, max_allele_length, causal, skip_mismatches)
        total += 1
    return (_progress(scores, total, say) if say else scores), counts, meta


def _progress(scores: Iterator[VariantScore], total: int, say: Callable[[str], Any]) -> Iterator:
    from nucleo.core.progress import duration

    started = last = time.perf_counter()
    for done, score in enumerate(scores, 1):
        yield score
        now = time.perf_counter()
        if now - last >= 10:
            last, elapsed = now, now - started
            say(
                f"scored {done}/{total} alleles ({100 * done / max(total, 1):.0f}%) | "
                f"{done / max(elapsed, 1e-9):.1f} alleles/s | elapsed {duration(elapsed)} | "
                f"eta {duration(elapsed / done * (total - done))}"
            )


# ----------------------------------------------------------------------------- writing

TSV_COLUMNS = ("chrom", "pos", "id", "ref", "alt", "score", "score_forward", "score_reverse",
               "skipped")  # fmt: skip


def _number(x: float) -> str:
    return "NA" if math.isnan(x) else f"{x:.6f}"


def write_tsv(scores: Iterable[VariantScore], out: IO[str]) -> int:
    """One row per ALT allele (TSV_COLUMNS; NA where skipped); the rows written."""
    out.write("\t".join(TSV_COLUMNS) + "\n")
    rows = 0
    for s in scores:
        v = s.variant
        numbers = (_number(s.score), _number(s.forward), _number(s.reverse))
        out.write("\t".join((v.chrom, str(v.pos), v.id, v.ref, v.alt, *numbers, s.skipped)) + "\n")
        rows += 1
    return rows


INFO_KEY = "NUCLEO_LLR"


def write_vcf(
    vcf: str | Path, scores: Iterable[VariantScore], out: str | Path, description: str
) -> int:
    """``vcf`` again with ``NUCLEO_LLR=<score per ALT>`` (``.`` where skipped) in INFO and its
    ``##INFO`` header line; BGZF when ``out`` ends in .gz. The data lines written."""
    from data_pipeline.vcf import BgzfWriter, annotate_header, read_header, read_lines, with_info

    text = description.replace('"', "'")
    info = f'##INFO=<ID={INFO_KEY},Number=A,Type=Float,Description="{text}">'
    header = annotate_header(read_header(vcf), [info], INFO_KEY)
    stream = iter(scores)
    path = Path(out)
    fh: Any = BgzfWriter(path) if path.name.endswith(".gz") else path.open("w")
    lines = 0
    with fh:
        fh.write("\n".join(header) + "\n")
        for _line, fields in read_lines(vcf):
            values = []
            for _alt in fields[4].split(","):
                s = next(stream)
                values.append("." if s.skipped else f"{s.score:.4f}")
            fh.write(with_info(fields, INFO_KEY, values) + "\n")
            lines += 1
    return lines
