"""Shard builds on many workers: the same bytes for any worker count, resuming after a kill,
near-duplicate clusters equal to the in-memory reference, a Dask scheduler, Slurm job scripts,
and ``--plan``."""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from distributed import Client

from data_pipeline.build import build_shards
from data_pipeline.build_tasks import tar_member, tar_trailer
from data_pipeline.dedup import SketchOptions, cluster_sketches, sketch
from data_pipeline.near_dups import Bands, components, reduce_partition
from data_pipeline.shards import ShardOptions, SourceFile, read_sources_tsv, write_sources_tsv

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data_pipeline" / "sample"
QUIET = {"log": lambda _: None}


def _tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file but build.json (the build's time and workers)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "build.json"
    }


def _some_sources(n: int = 10) -> list[SourceFile]:
    """``n`` sample inputs of several kingdoms (exact duplicates and GenBank among them)."""
    sources = read_sources_tsv(SAMPLE / "sources.tsv")
    return sources[:: max(1, len(sources) // n)][:n]


def test_members_one_by_one_make_the_archive_one_writer_makes():
    samples = [
        {"__key__": f"rec_{i}-{i:06d}", "seq": b"ACGT" * (i * 37 + 1), "json": {"i": i}}
        for i in range(7)
    ]
    long = "NZ_" + "x" * 150  # a name over tar's 100 characters: a PAX extended header
    samples.append({"__key__": f"{long}-000000", "seq": b"acgtN", "json": {"record": long}})
    whole = io.BytesIO()
    with wds.TarWriter(whole, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    members = b"".join(tar_member(s) for s in samples)
    assert members + tar_trailer(len(members)) == whole.getvalue()


@pytest.mark.slow
def test_one_two_and_four_workers_write_the_same_bytes(tmp_path):
    sources = _some_sources()
    options = ShardOptions(chunk_len=8192, min_shards=3)
    trees = {}
    for workers in (None, 2, 4):
        out = tmp_path / f"w{workers}"
        manifest = build_shards(sources, out, options, workers=workers, **QUIET)
        assert manifest["build"]["workers"] == (workers or 1)
        trees[workers] = _tree(out)
        assert not (tmp_path / f"w{workers}.work").exists()  # removed after success
    assert trees[None] == trees[2] == trees[4]
    assert sum(name.endswith(".tar") for name in trees[None]) > 20


def _mutate(seq: bytearray, rate: float, rng: random.Random) -> bytearray:
    out = bytearray(seq)
    for i in range(len(out)):
        if rng.random() < rate:
            out[i] = ord(rng.choice("ACGT"))
    return out


def _near_duplicate_family(rng: random.Random) -> dict[str, bytes]:
    """Genomes with near-copies at several distances (some above the 0.8 threshold, some
    only through a chain), unrelated ones, one too short to sketch."""
    seqs: dict[str, bytes] = {}
    for family in range(4):
        base = bytearray(rng.choice(b"ACGT") for _ in range(40_000))
        seqs[f"f{family}_base"] = bytes(base)
        chain = base
        for step, rate in enumerate((0.0005, 0.002, 0.004, 0.02)):
            chain = _mutate(chain, rate, rng)
            seqs[f"f{family}_m{step}"] = bytes(chain)
    seqs["tiny"] = b"ACGTACGTAC"
    return seqs


def test_distributed_clusters_equal_the_in_memory_reference(tmp_path):
    rng = random.Random(7)
    seqs = _near_duplicate_family(rng)
    keys = sorted(seqs)
    opts = SketchOptions(k=21, scale=20, num_perm=128, threshold=0.8)
    sketches = {k: sketch(seqs[k], opts) for k in keys}
    reference = cluster_sketches(sketches, {k: len(seqs[k]) for k in keys}, opts.threshold)
    want = sorted(sorted(c.members) for c in reference)
    assert any(len(m) > 2 for m in want) and any(len(m) == 1 for m in want)
    bands = Bands.for_threshold(opts.threshold, opts.num_perm)
    # two "inputs" of the scan, as the scan task writes them
    work = tmp_path / "work"
    (work / "scan").mkdir(parents=True)
    halves = [keys[::2], keys[1::2]]
    order = halves[0] + halves[1]
    for name, half in zip(("a", "b"), halves, strict=True):
        values = np.stack([np.asarray(sketches[k].hashvalues, dtype=np.uint64) for k in half])
        np.save(work / "scan" / f"{name}.sketch.npy", values)
        np.save(work / "scan" / f"{name}.bands.npy", np.stack([bands.hashes(v) for v in values]))
    offsets = [0, len(halves[0]), len(keys)]
    excluded = np.array([sketches[k].is_empty() for k in order])
    for parts in (1, 3):
        near = tmp_path / f"near{parts}"
        near.mkdir()
        np.save(near / "excluded.npy", excluded)
        for p in range(parts):
            reduce_partition({"work": str(work), "near": str(near), "names": ["a", "b"],
                              "partition": p, "partitions": parts, "offsets": offsets,
                              "bands": bands})  # fmt: skip
        label = components(len(order), sorted(near.glob("edges-*.npy")))
        got: dict[int, list[str]] = {}
        for key, lab in zip(order, label.tolist(), strict=True):
            got.setdefault(lab, []).append(key)
        assert sorted(sorted(m) for m in got.values()) == want, parts


def test_a_build_clusters_near_duplicates_as_the_reference_does(tmp_path):
    rng = random.Random(3)
    seqs = _near_duplicate_family(rng)
    files = []
    for i, key in enumerate(sorted(seqs)):
        path = tmp_path / f"{i:02d}.fa"
        path.write_bytes(b">" + key.encode() + b"\n" + seqs[key] + b"\n")
        files.append(SourceFile(path, "viral"))
    options = ShardOptions(chunk_len=4096, min_shards=2, minhash_scale=20)
    manifest = build_shards(files, tmp_path / "out", options, **QUIET)
    opts = options.sketch_options()
    sketches = {k: sketch(v, opts) for k, v in seqs.items()}
    reference = cluster_sketches(sketches, {k: len(v) for k, v in seqs.items()}, opts.threshold)
    want = {k: (c.members[0], c.similarity[k]) for c in reference for k in c.members}
    got = {r["key"]: (r["cluster"], r["similarity"]) for r in manifest["records"]}
    assert got == want


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nucleo", "data", "build", *args]


@pytest.mark.slow
def test_a_killed_build_resumes_without_redoing_finished_inputs(tmp_path):
    sources = read_sources_tsv(SAMPLE / "sources.tsv")
    tsv = write_sources_tsv(sources, tmp_path / "sources.tsv")
    out, work = tmp_path / "shards", tmp_path / "shards.work"
    proc = subprocess.Popen(_cli("--sources", str(tsv), "--out", str(out), "--workers", "2"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((work / "scan").glob("*.json"))) < 8:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the command, its Dask scheduler and workers
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in (work / "scan").glob("*.json")}
    assert len(done) >= 8 and not out.exists()
    again = subprocess.run(_cli("--sources", str(tsv), "--out", str(out), "--workers", "2",
                                "--keep-work"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the build" in again.stdout
    scan_line = next(x for x in again.stderr.splitlines() if x.startswith("scan"))
    assert f", {len(done)} already done" in scan_line, scan_line
    # the inputs scanned before the kill were not read again: their results are untouched
    assert {p: p.stat().st_mtime_ns for p in done} == done
    clean = tmp_path / "clean"
    build_shards(sources, clean, ShardOptions(), **QUIET)
    assert _tree(out) == _tree(clean)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DASK = str(Path(sys.executable).parent / "dask")


def _dask_scheduler() -> tuple[str, subprocess.Popen]:
    """A ``dask scheduler`` on a free port of 127.0.0.1 (no workers): its address, its process."""
    port = _free_port()
    cmd = [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
           "--dashboard-address", ":0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"tcp://127.0.0.1:{port}", proc


@pytest.mark.slow
def test_a_running_dask_cluster_builds_the_same_set(tmp_path):
    address, scheduler = _dask_scheduler()
    procs = [scheduler]
    try:
        time.sleep(1.0)
        worker = [DASK, "worker", address, "--nworkers", "2", "--nthreads", "1",
                  "--no-dashboard"]  # fmt: skip
        procs.append(subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(address, timeout=30) as client:  # both workers in before the build counts them
            client.wait_for_workers(2, timeout=120)
        sources = _some_sources(6)
        tsv = write_sources_tsv(sources, tmp_path / "sources.tsv")
        run = subprocess.run(_cli("--sources", str(tsv), "--out", str(tmp_path / "c"),
                                  "--scheduler", address), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        local = tmp_path / "l"
        build_shards(sources, local, ShardOptions(), **QUIET)
        assert _tree(tmp_path / "c") == _tree(local)
        assert "dask (2 workers" in (tmp_path / "c" / "build.json").read_text()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def test_a_scheduler_that_does_not_answer_is_one_line(tmp_path):
    run = subprocess.run(_cli("--input", f"viral={SAMPLE / 'viral' / 'lambda.fasta.gz'}",
                              "--out", str(tmp_path / "o"), "--scheduler",
                              f"tcp://127.0.0.1:{_free_port()}"),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [x for x in run.stderr.splitlines() if x.startswith("nucleo:")]
    assert run.returncode == 2 and len(lines) == 1 and "no Dask scheduler answers" in lines[0]


@pytest.mark.slow
def test_a_scheduler_without_workers_is_one_line_not_a_wait():
    from data_pipeline.executors import SchedulerError, scheduler_executor

    address, scheduler = _dask_scheduler()
    try:
        with pytest.raises(SchedulerError, match="has no workers after 2 s") as err:
            scheduler_executor(address, timeout=30, worker_wait=2)
        assert f"dask worker {address}" in str(err.value) and "\n" not in str(err.value)
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)


def test_slurm_workers_are_one_thread_processes_of_this_python():
    from data_pipeline.executors import slurm_cluster

    cluster = slurm_cluster(nodes=0, cores=16, memory="32GB", walltime="01:00:00",
                            partition="cpu", account="lab")  # fmt: skip
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p cpu" in script and "#SBATCH -A lab" in script
    assert "#SBATCH -t 01:00:00" in script and sys.executable in script
    assert "--nworkers 16" in script and "--nthreads 1" in script
    assert "PRE_SPAWN_ENVIRON" in script and "MALLOC_TRIM" not in script


def test_plan_estimates_time_and_memory_and_builds_nothing(tmp_path):
    out = tmp_path / "o"
    run = subprocess.run(_cli("--sources", str(SAMPLE / "sources.tsv"), "--out", str(out),
                              "--plan", "--plan-nodes", "1", "8", "--plan-cores", "16"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Mb/s per core" in run.stdout and "MiB per worker" in run.stdout
    assert "8 nodes x 16 cores" in run.stdout and not out.exists()


def test_progress_lines_name_each_stage(tmp_path):
    run = subprocess.run(_cli("--sources", str(SAMPLE / "sources.tsv"), "--out",
                              str(tmp_path / "o"), "--workers", "0"),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stderr.splitlines()
    for stage, counts in (("scan", "records"), ("near", ""), ("concat", "b |")):
        line = next(x for x in lines if x.startswith(stage))
        assert counts in line and "MB/s" in line and "ETA" in line, line
    assert "in-process" in (tmp_path / "o" / "build.json").read_text()
