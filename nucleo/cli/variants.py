"""``nucleo score-variants``: variant-effect scores of a VCF's alleles from an export.

    nucleo score-variants EXPORT --vcf calls.vcf.gz --reference genome.fa [--out scores.tsv]

The scores are nucleo.downstream.variants's (causal: log-likelihood ratio of windows sharing
their flanks; bidirectional: masked marginal). Output: a TSV (stdout by default), or the VCF
itself with a NUCLEO_LLR INFO field when --out ends in .vcf or .vcf.gz.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nucleo.cli.common import Parser, UserError, add_batch_size, add_device, add_out, at_least

_VCF_SUFFIXES = (".vcf", ".vcf.gz", ".vcf.bgz")


def cmd_score_variants(args: argparse.Namespace) -> int:
    from nucleo.downstream.variants import score_vcf, summary, write_tsv, write_vcf

    out = args.out
    if out is not None and out.endswith(".gz") and not out.endswith(_VCF_SUFFIXES):
        raise UserError(f"--out {out}: a compressed output is a VCF (.vcf.gz); a TSV is plain")
    if out is not None and (out == args.vcf):
        raise UserError(f"--out {out}: that is the input VCF; write elsewhere")

    def say(line: str) -> None:  # progress, every 10 s of a long VCF
        print(line, file=sys.stderr, flush=True)

    scores, counts, meta = score_vcf(  # loads and checks before anything is written
        args.model, args.vcf, args.reference, window=args.window, strands=args.strand,
        batch=args.batch_size, device=args.device, max_allele_length=args.max_allele_length,
        skip_mismatches=args.skip_mismatches, say=say,
    )  # fmt: skip
    if out is not None and out.endswith(_VCF_SUFFIXES):
        kind = (
            "log P(alt window) - log P(ref window)"
            if meta.get("causal", True)
            else "masked marginal log p(alt) - log p(ref)"
        )
        description = (
            f"nucleo score-variants: {kind} in nats, {args.strand} strand(s), window "
            f"{args.window} tokens, model {args.model}; . where not scored"
        )
        write_vcf(args.vcf, scores, out, description)
    elif out is None:
        write_tsv(scores, sys.stdout)
    else:
        with open(out, "w") as fh:
            write_tsv(scores, fh)
    line = summary(counts) + (f"; wrote {out}" if out else "")
    print(line, file=sys.stderr if out is None else sys.stdout)
    return 0


def add_commands(sub: Any) -> None:
    p: Parser = sub.add_parser(
        "score-variants",
        help="variant-effect scores of a VCF's alleles (TSV, or the VCF with NUCLEO_LLR)",
        description="Score every ALT allele of a VCF against a reference with an export: "
        "causal models, log P(alt window) - log P(ref window) (same flanks); bidirectional "
        "models, the masked marginal log p(alt) - log p(ref) at the masked REF bases. Negative: "
        "the model prefers the reference. Symbolic ALTs (<DEL>, *, .), long alleles and "
        "(bidirectional) indels are skipped and counted.",
    )
    p.add_argument("model", metavar="MODEL", help="an export folder (nucleo export)")
    p.add_argument("--vcf", required=True, metavar="FILE",
                   help="variants: VCF, plain, gzip or bgzip (.vcf.gz)")  # fmt: skip
    p.add_argument("--reference", required=True, metavar="FASTA",
                   help="the reference the VCF is on: FASTA or GenBank, compressed or not, "
                   "held in memory (~1 byte per base)")  # fmt: skip
    add_out(p, "scores: a .tsv (default: stdout), or a .vcf / .vcf.gz copy of the input with "
            "a NUCLEO_LLR INFO field (.gz written as BGZF, for tabix)")  # fmt: skip
    p.add_argument("--window", type=at_least(4), default=1024, metavar="TOKENS",
                   help="model input around each variant (char: bases; kmer: k-mers)")  # fmt: skip
    p.add_argument("--strand", choices=("both", "forward"), default="both",
                   help="both: average with the reverse-complemented windows' score")  # fmt: skip
    add_batch_size(p, "windows", 8)
    p.add_argument("--max-allele-length", type=at_least(1), default=50, metavar="BASES",
                   help="skip alleles (REF or ALT) longer than this")  # fmt: skip
    p.add_argument("--skip-mismatches", action="store_true",
                   help="count and skip lines whose CHROM is not in the reference or whose REF "
                   "differs from it, instead of stopping at the first")  # fmt: skip
    add_device(p)
    p.set_defaults(func=cmd_score_variants)
