"""``nucleo predict | score | embed``: a fine-tuned classifier's labels, a language model's
scores and embeddings, for every record of a FASTA/GenBank file (streamed).

    nucleo predict CLASSIFIER FASTA [--out labels.tsv]                   labels for records
    nucleo score EXPORT FASTA [--out scores.tsv] [--stride 512]  log-likelihood, bits per base
    nucleo embed EXPORT FASTA --out emb.npy [--layer -2]          per-record pooled embeddings
"""

from __future__ import annotations

import argparse
import json
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
