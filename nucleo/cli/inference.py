"""``nucleo predict | score | embed | evaluate``: a fine-tuned classifier's labels, a language
model's scores and embeddings, for every record of a FASTA/GenBank file (streamed), and its bits
per base by region class of annotated records.

    nucleo predict CLASSIFIER FASTA [--out labels.tsv]                   labels for records
    nucleo score EXPORT FASTA [--out scores.tsv] [--stride 512]  log-likelihood, bits per base
    nucleo embed EXPORT FASTA --out emb.npy [--layer -2]          per-record pooled embeddings
    nucleo evaluate --model A [--model B] [--shards DIR] --out regions.md   bits by region class
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from nucleo.cli.common import UserError, add_batch_size, add_device, add_out, at_least, warn


def cmd_predict(args: argparse.Namespace) -> int:
    from nucleo.downstream.classifier import predict_file

    rows = predict_file(  # loads first
        args.classifier, args.fasta, args.batch_size, args.device, stride=args.stride
    )
    classes = json.loads((Path(args.classifier) / "classifier.json").read_text())["classes"]
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (stdout or a file)
    count = 0
    try:
        out.write("record\tprediction\t" + "\t".join(f"p_{c}" for c in classes) + "\n")
        for rid, label, probs in rows:
            out.write(f"{rid}\t{label}\t" + "\t".join(f"{p:.6f}" for p in probs) + "\n")
            count += 1
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"wrote {count} predictions to {args.out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from nucleo.downstream.inference import MOSTLY_N, score_file

    scores = score_file(  # loads and checks before anything is written
        args.export, args.fasta, args.window, args.batch_size, args.both_strands, args.device,
        args.stride,
    )  # fmt: skip
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (stdout or a file)
    count = 0
    try:
        out.write("record\tbases\ttokens_scored\tlog_likelihood_nats\tbits_per_base\n")
        for s in scores:
            bits = "NA" if s.tokens_scored == 0 else f"{s.bits_per_base:.6f}"
            out.write(f"{s.record}\t{s.bases}\t{s.tokens_scored}\t{s.log_likelihood:.4f}\t{bits}\n")
            out.flush()
            count += 1
            if s.tokens_scored == 0:
                warn(f"{s.record}: nothing scored ({s.bases} base(s); a causal model scores "
                     "from each window's second token): NA")  # fmt: skip
            elif s.n_fraction > MOSTLY_N:
                warn(f"{s.record}: {100 * s.n_fraction:.0f}% N: its score says little")
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"wrote {count} scores to {args.out}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from nucleo.downstream.inference import embed_file

    out = Path(args.out)
    if out.suffix not in (".npy", ".parquet"):
        raise UserError(f"--out {out}: name a .npy or a .parquet file")
    ids, vectors = embed_file(
        args.export, args.fasta, args.window, args.batch_size, args.device, args.pooling,
        args.stride, args.layer,
    )  # fmt: skip
    width = vectors.shape[1] if vectors.size else 0
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), width)
        pq.write_table(pa.table({"id": ids, "embedding": column}), out)
        print(f"wrote {vectors.shape[0]} x {width} to {out} (columns id, embedding)")
        return 0
    np.save(out, vectors)
    ids_path = out.with_suffix(".ids.txt")
    ids_path.write_text("".join(f"{i}\n" for i in ids))
    print(f"wrote {vectors.shape[0]} x {width} to {out}, ids in {ids_path}")
    return 0


def _floor(args: argparse.Namespace) -> tuple[Any, int, str] | None:
    """(model, order, name) of ``--markov``/``--markov-order``, or None."""
    if args.markov is None:
        if args.markov_order is not None:
            raise UserError("--markov-order: give the model too (--markov MODEL.npz)")
        return None
    if args.markov_order is None:
        raise UserError("--markov: give its order too (--markov-order K)")
    try:
        from data_pipeline.markov import MarkovModel
    except ImportError as err:
        raise UserError(f"--markov: cannot import data_pipeline.markov ({err})") from None
    return MarkovModel.load(args.markov), args.markov_order, f"markov order {args.markov_order}"


def _evaluate_command(args: argparse.Namespace) -> str:
    """The command line that repeats this evaluation (every setting spelt out)."""
    words = ["nucleo", "evaluate"]
    for model in args.model:
        words += ["--model", model]
    if args.annotations:
        words += ["--annotations", *args.annotations, "--kingdom", args.kingdom or "unspecified"]
    else:
        words += ["--shards", args.shards or "data/offline/shards", "--split", args.split]
    for flag in ("window", "stride", "markov", "markov_order"):
        if getattr(args, flag) is not None:
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    words += ["--max-bases-per-kingdom", str(args.max_bases_per_kingdom), "--out", args.out]
    return shlex.join(words)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nucleo.core.device import resolve
    from nucleo.downstream import regions
    from nucleo.downstream.region_classes import targets_from_files, targets_from_shards

    if args.annotations and args.shards:
        raise UserError("--annotations and --shards: give one (annotated files, or a shard set)")
    if args.kingdom and not args.annotations:
        raise UserError("--kingdom names the kingdom of --annotations files; a shard set's "
                        "records carry theirs")  # fmt: skip
    out = Path(args.out)
    if out.suffix != ".md":
        raise UserError(f"--out {out}: name a .md file (the .json and .png go beside it)")
    floor = _floor(args)
    device = resolve(args.device)
    networks = [regions.load_network(m, device, args.window, args.stride) for m in args.model]
    if args.annotations:
        targets = targets_from_files(args.annotations, args.kingdom or "unspecified")
    else:
        targets = targets_from_shards(args.shards or "data/offline/shards", args.split)
    command = _evaluate_command(args)
    report = regions.evaluate(networks, targets, device, args.max_bases_per_kingdom,
                              args.batch_size, floor, command)  # fmt: skip
    written = report.save(out)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def _add_stride(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--stride", type=at_least(1), default=None, metavar="TOKENS",
                   help=f"start a window every TOKENS tokens (default: the window length, no "
                        f"overlap); overlapping windows {what}")  # fmt: skip


def _add_inference_arguments(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("export", help="a model export folder (RUN_DIR/export or nucleo export)")
    p.add_argument("fasta", help="FASTA or GenBank file (.gz/.xz/.bz2 too), streamed by record")
    p.add_argument("--window", type=at_least(2), default=1024, metavar="TOKENS",
                   help="tokens per window of long records")  # fmt: skip
    add_batch_size(p, "windows", batch)
    add_device(p)


def add_commands(sub: Any) -> None:
    """Register predict, score and embed on nucleo's subparsers."""
    p = sub.add_parser("predict", help="a fine-tuned classifier on FASTA -> labels (TSV)")
    p.add_argument("classifier", help="a `nucleo finetune` output folder")
    p.add_argument("fasta", help="FASTA or GenBank file, streamed by record")
    add_out(p, "TSV file to write (default: stdout)")
    add_batch_size(p, "windows", 64)
    _add_stride(p, "each give probabilities, averaged")
    add_device(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("score", help="per-record log-likelihood and bits per base (TSV)")
    _add_inference_arguments(p, 8)
    add_out(p, "TSV file to write (default: stdout)")
    p.add_argument("--both-strands", action="store_true", help="average with the rc strand")
    _add_stride(p, "score each token once, with the most left context")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("embed", help="per-record pooled embeddings (.npy or .parquet)")
    _add_inference_arguments(p, 8)
    add_out(p, ".npy file (record ids beside it in .ids.txt) or .parquet file (columns id, "
            "embedding)", required=True)  # fmt: skip
    p.add_argument("--pooling", choices=("mean", "max", "last"), default="mean",
                   help="over the record's tokens (last: the final token's state)")  # fmt: skip
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden states of this layer: 0 the embedding, i after block i, -1 the "
                        "final states, -2 the block before, ...")  # fmt: skip
    _add_stride(p, "take each token once, from the window with the most left context")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "evaluate",
        help="bits per base by region class (CDS codon positions, UTR, intron, RNAs, intergenic, "
        "repeats) and kingdom: .md, .json, .png",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]PATH",
        help="a causal export or run folder (repeat it to compare runs side by side)",
    )
    p.add_argument(
        "--shards",
        metavar="DIR",
        help="shard folder whose --split records to read (default: data/offline/shards)",
    )
    p.add_argument("--split", default="val", help="the manifest's split to evaluate")
    p.add_argument(
        "--annotations",
        nargs="+",
        metavar="FILE",
        help="GenBank files, or GFF3 files with their X_*genomic.fna[.gz] beside them, instead "
        "of a shard set",
    )
    p.add_argument("--kingdom", help="kingdom of the --annotations records (default: unspecified)")
    p.add_argument(
        "--window",
        type=at_least(2),
        metavar="TOKENS",
        help="tokens per window (default: each model's training length)",
    )
    _add_stride(p, "score each token once, with the most left context")
    p.add_argument(
        "--max-bases-per-kingdom",
        type=at_least(1),
        default=100_000,
        metavar="N",
        help="bases scored per kingdom at most, in evenly spaced windows",
    )
    p.add_argument(
        "--markov",
        metavar="MODEL.npz",
        help="a data_pipeline.markov model, scored on the same bases as a floor",
    )
    p.add_argument("--markov-order", type=at_least(0), metavar="K", help="its order")
    add_out(p, "markdown table to write; the .json and .png go beside it", default="regions.md")
    add_batch_size(p, "windows", 8)
    add_device(p)
    p.set_defaults(func=cmd_evaluate)
