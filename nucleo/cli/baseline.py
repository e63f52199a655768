"""``nucleo baseline``: floors that a network's bits per base must beat.

nucleo baseline markov --shards DIR [--max-order 10] [--out markov.md] [--save m.npz]
    k-mer Markov models of orders 0..K fit on the training split, scored on the
    validation windows training uses (overall and per kingdom)
nucleo baseline score --model m.npz [--order K] FASTA...
    per-record bits per base of a saved Markov model, beside ``nucleo score``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from nucleo.cli.common import UserError, add_out, add_shards, at_least

#: orders a model may hold (data_pipeline.markov.MAX_ORDER; repeated here so that building
#: the parser imports no numpy)
MAX_ORDER = 12


def order_type(text: str) -> int:
    """An argument type: a Markov order in 0..MAX_ORDER."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_ORDER:
        raise argparse.ArgumentTypeError(f"{value} is not valid (an order in 0..{MAX_ORDER})")
    return value


order_type.__name__ = f"order in 0..{MAX_ORDER}"


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this report."""
    parts = [
        f"nucleo baseline markov --shards {args.shards} --max-order {args.max_order}",
        f"--window {args.window} --windows-per-kingdom {args.windows_per_kingdom}",
        f"--seed {args.seed}",
    ]
    if args.max_bases is not None:
        parts.append(f"--max-bases {args.max_bases}")
    parts += [f"--kingdom {k}" for k in args.kingdom or []]
    parts += [f"--save {args.save}"] if args.save else []
    return " ".join([*parts, f"--out {args.out}"])


def cmd_markov(args: argparse.Namespace) -> int:
    import json

    from data_pipeline import markov as model_of
    from data_pipeline import storage
    from nucleo.core.machine import describe, summary
    from nucleo.studies import markov

    if not storage.isdir(args.shards):  # a folder, or a shard set's URL
        raise UserError(f"--shards {storage.redact(args.shards)}: no such folder")
    out = Path(args.out)
    if out.suffix != ".md":
        raise UserError(f"--out {out}: name a markdown file (.md; the .json goes beside it)")
    cap = model_of.DEFAULT_MAX_BASES if args.max_bases is None else args.max_bases or None
    print(f"fitting orders 0..{args.max_order} on the training split of {args.shards} ...")
    model = model_of.fit_from_shards(args.shards, args.max_order, args.kingdom, cap, print)
    if args.save:
        print(f"saved the model to {model.save(args.save)}")
    print(f"scoring the validation windows (seed {args.seed}) ...", flush=True)
    result = markov.validation_bits(
        model, args.shards, args.window, args.windows_per_kingdom, args.seed, args.kingdom
    )
    if not result["kingdoms"]:
        raise UserError(f"--shards {args.shards}: no validation windows (no val split?)")
    record = {
        "command": _command(args),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": describe(),
    }
    table = markov.report_lines(result, model.meta)
    lines = [
        "# k-mer Markov baseline: the floor a network must beat",
        "",
        f"- command: `{record['command']}`",
        f"- date: {record['date']}",
        f"- machine: {summary()}",
        *table,
        "",
        "A network's validation bits per base (`val/bits_per_base`, and per kingdom) is only "
        "worth its parameters where it falls below the best order here: above it, the network "
        "has learned less than k-mer statistics of the training split give for free.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**record, "fit": model.meta, "validation": result}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(table))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import math

    from data_pipeline.markov import MarkovModel, score_records

    try:
        model = MarkovModel.load(args.model)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"--model {err}") from None
    order = model.max_order if args.order is None else args.order
    if order > model.max_order:
        raise UserError(f"--order {order}: {args.model} holds orders 0..{model.max_order}")
    for path in args.fasta:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such genome file")
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 (stdout or a file)
    nats_sum, scored_sum, count = 0.0, 0, 0
    try:
        out.write("record\tbases\ttokens_scored\tlog_likelihood_nats\tbits_per_base\n")
        for path in args.fasta:
            for rid, bases, scored, nats in score_records(model, path, order):
                bits = f"{nats / scored / math.log(2):.6f}" if scored else "NA"
                out.write(f"{rid}\t{bases}\t{scored}\t{-nats:.4f}\t{bits}\n")
                out.flush()
                nats_sum, scored_sum, count = nats_sum + nats, scored_sum + scored, count + 1
    finally:
        if args.out:
            out.close()
    total = nats_sum / scored_sum / math.log(2) if scored_sum else math.nan
    summary = (
        f"order-{order} Markov: {count} records, {scored_sum:,} bases scored, "
        f"{total:.4f} bits per base in all"
    )
    print(summary if args.out else f"# {summary}", file=sys.stdout if args.out else sys.stderr)
    if args.out:
        print(f"wrote {count} scores to {args.out}")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``baseline markov`` and ``baseline score``."""
    baseline = sub.add_parser("baseline", help="floors a network must beat (k-mer Markov models)")
    group = baseline.add_subparsers(dest="baseline_command", required=True)
    p = group.add_parser(
        "markov", help="fit k-mer Markov models on the training split, score the validation "
        "windows, write a report",
    )  # fmt: skip
    add_shards(p)
    p.add_argument("--max-order", type=order_type, default=10, metavar="K",
                   help="fit every order 0..K (context bases)")  # fmt: skip
    p.add_argument("--window", "--seq-len", type=at_least(8), default=512, metavar="TOKENS",
                   help="validation window length (data.seq_len of the runs compared)")  # fmt: skip
    p.add_argument("--windows-per-kingdom", type=at_least(1), default=32, metavar="N",
                   help="validation windows a kingdom (eval.windows_per_kingdom)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="train.seed of the runs to compare (it draws the windows)")  # fmt: skip
    p.add_argument("--max-bases", type=at_least(0), default=None, metavar="N",
                   help="read at most N training bases, each kingdom in proportion to its "
                        "bases (0: all; default: 300M, about a minute on 2 cores)")  # fmt: skip
    p.add_argument("--kingdom", action="append", metavar="NAME",
                   help="only this kingdom (repeatable; data.kingdoms; default: all)")  # fmt: skip
    p.add_argument("--save", metavar="PATH", help="also save the fitted model (.npz)")
    add_out(p, "report file (markdown); its .json goes beside it", default="markov.md")
    p.set_defaults(func=cmd_markov)

    p = group.add_parser("score", help="per-record bits per base of a saved Markov model (TSV)")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="a model saved by nucleo baseline markov --save")  # fmt: skip
    p.add_argument("--order", type=order_type, metavar="K",
                   help="the order to score with (default: the model's highest)")  # fmt: skip
    p.add_argument("fasta", nargs="+", metavar="FASTA",
                   help="FASTA or GenBank files (.gz/.xz/.bz2 too), read by record")  # fmt: skip
    add_out(p, "TSV file to write (default: stdout)")
    p.set_defaults(func=cmd_score)
