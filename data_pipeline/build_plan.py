"""``nucleo data build --plan``: how long and how much memory a build will take, before it runs.

The estimate comes from measurements, not constants:

- the inputs' sizes (``storage.size``) and, from the first megabytes of up to ``samples`` of
  them, how many bases a compressed byte holds and how long their records are;
- this machine's per-core rate: a real in-process build (scan, near-duplicate sketches,
  write, concat) of a sample of those bases, timed, with its peak memory.

Time on N nodes x C cores = bases / (rate x N x C x efficiency) + the driver's serial merge
(per record); efficiency is the measured 2-worker speed-up / 2 from
``experiments/results/data_scale.md`` when given, else 0.9. Memory per worker is the
calibration's peak plus the longest record seen (a worker holds one record, its chunks and its
sketch at a time); the driver holds about 1.5 KB per record (the manifest's record list).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import storage
from data_pipeline.build_tasks import peak_rss_mb
from data_pipeline.shards import ShardOptions, SourceFile

SAMPLE_BYTES = 4 << 20  # compressed bytes read from each sampled input
CALIBRATION_BASES = 8_000_000
DRIVER_SECONDS_PER_RECORD = 4e-5  # merge + plan + manifest, per record (measured, 311 Mb)
DRIVER_BYTES_PER_RECORD = 1500
_SEQ_LINE = re.compile(rb"^\s*\d+ ([acgtnACGTN ]+)$", re.M)  # GenBank ORIGIN lines


@dataclass
class InputSample:
    """What the first bytes of an input say: bases per stored byte, records, longest record."""

    bases_per_byte: float
    bases: bytes
    records: int
    longest: int


def _decompress_head(head: bytes) -> bytes:
    """As much of ``head`` (the start of a file) as decompresses."""
    if head.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=47).decompress(head)
    if head.startswith(b"\xfd7zXZ\x00"):
        try:
            return lzma.LZMADecompressor().decompress(head)
        except lzma.LZMAError:
            return b""
    if head.startswith(b"BZh"):
        try:
            return bz2.BZ2Decompressor().decompress(head)
        except OSError:
            return b""
    return head


def sample_input(path: str | Path) -> InputSample:
    """Read the first ``SAMPLE_BYTES`` of ``path`` (local or URL)."""
    head = storage.head(path, SAMPLE_BYTES)
    text = _decompress_head(head)
    if text.lstrip().startswith(b"LOCUS"):
        seq = b"".join(m.replace(b" ", b"") for m in _SEQ_LINE.findall(text)).upper()
        records = max(1, text.count(b"\nLOCUS") + text.startswith(b"LOCUS"))
        lengths = [len(seq)]
    else:
        parts = text.split(b"\n>")
        records = max(1, len(parts))
        pieces = [b"".join(p.split(b"\n")[1:]) for p in parts]
        seq = b"".join(pieces).upper()
        lengths = [len(p) for p in pieces] or [0]
    return InputSample(len(seq) / max(1, len(head)), seq, records, max(lengths))


@dataclass
class Calibration:
    """This machine's per-core build rate (bases/s) and a worker's peak memory (MiB)."""

    bases_per_second: float
    peak_rss_mb: float
    bases: int


def calibrate(bases: bytes, options: ShardOptions) -> Calibration:
    """Time a real in-process build of ``bases`` (gzip FASTA records of 1 Mb, as inputs come)."""
    from data_pipeline.build import build_shards

    sample = (bases * (CALIBRATION_BASES // max(1, len(bases)) + 1))[:CALIBRATION_BASES]
    with tempfile.TemporaryDirectory(prefix="nucleo-plan-") as tmp:
        fasta = Path(tmp) / "sample.fa.gz"
        with gzip.open(fasta, "wb", compresslevel=6) as fh:
            for i in range(0, len(sample), 1_000_000):
                piece = sample[i : i + 1_000_000]
                fh.write(
                    b">r%d\n" % i
                    + b"\n".join(piece[j : j + 80] for j in range(0, len(piece), 80))
                    + b"\n"
                )
        started = time.perf_counter()
        build_shards([SourceFile(fasta, "plan")], Path(tmp) / "out", options, log=lambda _: None)
        seconds = time.perf_counter() - started
    return Calibration(len(sample) / seconds, peak_rss_mb(), len(sample))


def estimate(
    sources: list[SourceFile],
    options: ShardOptions,
    nodes: tuple[int, ...] = (1, 8, 64),
    cores: int = 32,
    local_cores: int = 1,
    efficiency: float = 0.9,
    samples: int = 8,
    total_bases: float | None = None,
) -> dict[str, Any]:
    """The plan: inputs, measured rates, and time/memory on this machine and on ``nodes``
    nodes of ``cores`` cores. ``total_bases`` overrides the bases estimated from the inputs
    (to project a corpus that is not here, e.g. all of RefSeq)."""
    sizes = [storage.size(s.path) for s in sources]
    step = max(1, len(sources) // samples)
    picked = [sample_input(sources[i].path) for i in range(0, len(sources), step)][:samples]
    per_byte = sum(p.bases_per_byte for p in picked) / len(picked)
    record_len = sum(len(p.bases) for p in picked) / max(1, sum(p.records for p in picked))
    bases = float(total_bases) if total_bases else per_byte * sum(sizes)
    records = bases / max(1.0, record_len)
    longest = max(p.longest for p in picked)
    cal = calibrate(max((p.bases for p in picked), key=len), options)
    serial = records * DRIVER_SECONDS_PER_RECORD

    def seconds(workers: int) -> float:
        speed = cal.bases_per_second * workers * (efficiency if workers > 1 else 1.0)
        return bases / speed + serial

    return {
        "inputs": len(sources),
        "input_bytes": sum(sizes),
        "bases": bases,
        "records": records,
        "bases_per_input_byte": per_byte,
        "longest_record_sampled": longest,
        "rate_per_core": cal.bases_per_second,
        "calibration_bases": cal.bases,
        "worker_memory_mb": cal.peak_rss_mb + 3 * longest / 2**20,
        "driver_memory_mb": records * DRIVER_BYTES_PER_RECORD / 2**20,
        "work_disk_gb": bases * 1.03 / 1e9,
        "efficiency": efficiency,
        "here": {"cores": local_cores, "seconds": seconds(local_cores)},
        "cluster": [{"nodes": n, "cores": cores, "seconds": seconds(n * cores)} for n in nodes],
    }


def describe(plan: dict[str, Any]) -> str:
    """The plan as the lines ``--plan`` prints."""
    from nucleo.core.progress import duration

    lines = [
        f"inputs: {plan['inputs']} files, {plan['input_bytes'] / 1e9:.2f} GB stored, about "
        f"{plan['bases'] / 1e9:.2f} Gb in about {plan['records']:,.0f} records "
        f"({plan['bases_per_input_byte']:.2f} bases per stored byte, from their first MB)",
        f"measured here: {plan['rate_per_core'] / 1e6:.2f} Mb/s per core (a build of "
        f"{plan['calibration_bases'] / 1e6:.0f} Mb of them, every stage), parallel efficiency "
        f"{plan['efficiency']:.2f}",
        f"memory: {plan['worker_memory_mb']:,.0f} MiB per worker (longest record sampled "
        f"{plan['longest_record_sampled'] / 1e6:.1f} Mb; a longer one adds 3 bytes per base), "
        f"{plan['driver_memory_mb']:,.0f} MiB for the driver; work folder "
        f"{plan['work_disk_gb']:,.1f} GB beside the output",
        f"{'where':<28}{'workers':>8}{'time':>12}",
        f"{'this machine':<28}{plan['here']['cores']:>8}{duration(plan['here']['seconds']):>12}",
    ]
    for row in plan["cluster"]:
        where = f"{row['nodes']} nodes x {row['cores']} cores"
        lines.append(f"{where:<28}{row['nodes'] * row['cores']:>8}{duration(row['seconds']):>12}")
    return "\n".join(lines)
