"""Do variant-effect scores see selection? Simulated SNVs at conserved positions (the A, T and G
of annotated start codons) against SNVs at random positions of the same real genome, scored by
``nucleo score-variants``'s code path; a model that learned the genome's grammar should score
start-codon mutations lower (AUROC > 0.5).

    python experiments/variant_check.py [--export runs/NAME/export] [--genbank FILE.gb.gz]
        [--per-class N] [--window 1024] [--strand both] [--device auto]

Construction (seeded, ``--seed``): every CDS segment of the GenBank file whose first codon on its
strand is ATG gives its three start-codon positions (segments of spliced genes that do not
begin with ATG drop out; GTG/TTG starts are left out); each position gets one SNV to a base
drawn uniformly from the other three. Random positions: drawn uniformly over the record(s),
outside those start codons and N's, one SNV each likewise. ``--per-class`` caps each class
(drawn without replacement). The VCF is written to a temporary folder; the report gives
counts, mean scores, AUROC (P(conserved < random), ties half) with a 95% bootstrap interval
over both classes resampled, and where the genome stood in the export's training shards
(train, val, absent: a genome in train makes this partly a memory test).

Default genome: the Arabidopsis thaliana chloroplast NC_000932.1 (bundled, 154 kb, 104 CDS
segments). Default export: the newest ``runs/*/export``. Writes experiments/results/variants.md
(and .json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.report import RESULTS, ROOT, header, run_record, write

GENOME = ROOT / "data_pipeline/sample/plastid/NC_000932.gb.gz"
COMPLEMENT = str.maketrans("ACGTN", "TGCAN")


def newest_export() -> Path | None:
    found = [p for p in ROOT.glob("runs/*/export") if (p / "config.json").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def start_codons(genbank: Path) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """(record id -> bases, [(record, 0-based position)] of the A, T, G of every CDS segment
    whose first codon on its strand is ATG)."""
    from data_pipeline.annotations import read_genbank_features
    from data_pipeline.readers import read_sequences

    seqs = {r.id: bytes(r.seq).decode() for r in read_sequences(genbank)}
    positions = []
    for rid, features in read_genbank_features(genbank).items():
        seq = seqs.get(rid, "")
        for f in features:
            if f.type != "CDS" or f.end - f.start < 3:
                continue
            if f.strand == "-":
                codon = seq[f.end - 3 : f.end].translate(COMPLEMENT)[::-1]
                at = [f.end - 1, f.end - 2, f.end - 3]
            else:
                codon, at = seq[f.start : f.start + 3], [f.start, f.start + 1, f.start + 2]
            if codon == "ATG":
                positions += [(rid, p) for p in at]
    return seqs, sorted(set(positions))


def simulate(
    seqs: dict[str, str], conserved: list[tuple[str, int]], per_class: int, seed: int
) -> list[tuple[str, str, int, str, str]]:
    """(class, record, 1-based pos, ref, alt) of the conserved and random SNVs."""
    rng = random.Random(seed)
    if per_class and len(conserved) > per_class:
        conserved = sorted(rng.sample(conserved, per_class))
    taken = set(conserved)
    names, lengths = list(seqs), np.array([len(s) for s in seqs.values()], float)
    target = len(conserved)
    randoms: set[tuple[str, int]] = set()
    while len(randoms) < target:
        rid = names[rng.choices(range(len(names)), weights=lengths)[0]]
        pos = rng.randrange(len(seqs[rid]))
        if (rid, pos) not in taken and seqs[rid][pos] in "ACGT":
            randoms.add((rid, pos))
    out = []
    for kind, sites in (("conserved", conserved), ("random", sorted(randoms))):
        for rid, pos in sites:
            ref = seqs[rid][pos]
            out.append((kind, rid, pos + 1, ref, rng.choice([b for b in "ACGT" if b != ref])))
    return out


def auroc(low: np.ndarray, high: np.ndarray) -> float:
    """P(a ``low`` score < a ``high`` score), ties counted half (Mann-Whitney U / n1 n2)."""
    if not len(low) or not len(high):
        return float("nan")
    less = (low[:, None] < high[None, :]).sum() + 0.5 * (low[:, None] == high[None, :]).sum()
    return float(less / (len(low) * len(high)))


def bootstrap(low: np.ndarray, high: np.ndarray, draws: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the AUROC over both classes resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = [auroc(rng.choice(low, len(low)), rng.choice(high, len(high))) for _ in range(draws)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def training_split(meta: dict[str, Any], record_ids: list[str]) -> str:
    """Where the genome's records stood in the export's training shards, from their manifest."""
    shards = (meta.get("run_config") or {}).get("data", {}).get("shards")
    if not shards:
        return "unknown (the export names no shards)"
    manifest = Path(shards) if Path(shards).is_absolute() else ROOT / shards
    manifest = manifest / "manifest.json"
    if not manifest.is_file():
        return f"unknown ({shards}/manifest.json not found here)"
    records = json.loads(manifest.read_text()).get("records", [])
    splits = {r["id"]: r.get("split") or "dropped as a duplicate" for r in records}
    found = {rid: splits.get(rid, "absent") for rid in record_ids}
    return ", ".join(f"{rid}: {where}" for rid, where in found.items()) + f" ({shards})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=newest_export(),
                        help="an export folder (default: the newest runs/*/export)")  # fmt: skip
    parser.add_argument("--genbank", type=Path, default=GENOME,
                        help="an annotated genome (GenBank with CDS features)")  # fmt: skip
    parser.add_argument("--per-class", type=int, default=0,
                        help="at most N SNVs per class (0: every start-codon base)")  # fmt: skip
    parser.add_argument("--window", type=int, default=1024, help="tokens around each variant")
    parser.add_argument("--strand", choices=("both", "forward"), default="both")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "variants.md")
    args = parser.parse_args()
    if args.export is None:
        parser.error("no runs/*/export found; train one (launch/demo.sh) or pass --export")

    from nucleo.downstream.variants import score_vcf, summary

    record = run_record()
    seqs, conserved = start_codons(args.genbank)
    snvs = simulate(seqs, conserved, args.per_class, args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nucleo-variants-") as tmp:
        vcf = Path(tmp) / "simulated.vcf"
        lines = ["##fileformat=VCFv4.2", "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
        for i, (kind, rid, pos, ref, alt) in enumerate(snvs):
            lines.append(f"{rid}\t{pos}\t{kind}{i}\t{ref}\t{alt}\t.\t.\t.")
        vcf.write_text("\n".join(lines) + "\n")
        scores, counts, meta = score_vcf(
            args.export, vcf, args.genbank, window=args.window, strands=args.strand,
            batch=args.batch_size, device=args.device, say=print,
        )  # fmt: skip
        rows = [(kind, s.score) for (kind, *_), s in zip(snvs, scores, strict=True)]
    seconds = time.perf_counter() - started
    by = {
        k: np.array([x for kind, x in rows if kind == k and x == x])
        for k in ("conserved", "random")
    }
    low, high = by["conserved"], by["random"]
    value = auroc(low, high)
    interval = bootstrap(low, high, args.bootstrap, args.seed) if len(low) and len(high) else (
        float("nan"), float("nan"))  # fmt: skip
    where = training_split(meta, list(seqs))
    kind = "log-likelihood ratio" if meta.get("causal", True) else "masked marginal"
    trained = meta.get("trained") or {}
    data = {
        **record, "export": str(args.export), "genbank": str(args.genbank),
        "arch": meta.get("arch"), "tokenizer": meta.get("tokenizer"),
        "causal": meta.get("causal", True), "trained": trained, "window": args.window,
        "strand": args.strand, "seed": args.seed, "per_class": args.per_class,
        "start_codon_bases": len(conserved), "counts": {k: len(v) for k, v in by.items()},
        "mean": {k: float(v.mean()) if len(v) else None for k, v in by.items()},
        "auroc": value, "auroc_95": interval, "summary": summary(counts),
        "training_split": where, "seconds": round(seconds, 1),
    }  # fmt: skip
    rel = args.export.resolve()
    shown = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
    capped = (
        f"; {args.per_class} drawn" if args.per_class and len(conserved) > args.per_class else ""
    )
    sizes = ", ".join(f"{k} {len(v):,} bases" for k, v in seqs.items())
    md = [
        "# Variant effects: start codons vs random positions",
        "",
        *header(record),
        f"- export: `{shown}` ({meta.get('arch')}, {meta.get('tokenizer')} tokenizer, "
        f"{'causal' if data['causal'] else 'bidirectional'}; trained: "
        f"{json.dumps(trained) if trained else 'not recorded'})",
        f"- genome: `{args.genbank.name}` ({sizes}); in the export's shards: {where}",
        f"- score: {kind} in nats, window {args.window} tokens, strand {args.strand}; "
        f"{data['summary']}; {seconds:.0f} s",
        "",
        *(
            [
                "**The export was not trained (random weights): this run checks the code path, "
                "it measures nothing.**",
                "",
            ]
            if not trained
            else []
        ),
        "Conserved: the A, T and G of every annotated CDS segment whose first codon on its "
        f"strand is ATG ({len(conserved)} bases{capped}), each mutated to one of the other "
        "three bases (uniform, seeded); random: as many positions drawn uniformly over the "
        "genome outside those codons and N's, mutated likewise. A model that learned the "
        "genome's grammar should score start-codon SNVs lower: AUROC = P(conserved score < "
        "random score).",
        "",
        "| class | SNVs scored | mean score (nats) |",
        "|---|---|---|",
        *(
            f"| {k} | {len(v)} | {v.mean():.4f} |" if len(v) else f"| {k} | 0 | - |"
            for k, v in by.items()
        ),
        "",
        f"**AUROC {value:.3f}** (95% bootstrap interval {interval[0]:.3f} to {interval[1]:.3f}, "
        f"{args.bootstrap} draws).",
    ]
    write(args.out, md, data)
    print(f"AUROC {value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]; {data['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
