"""Soft-mask genomes that arrive unmasked, with an established masker (``--mask``).

RefSeq's eukaryotic FASTA already marks repeats in lower case (WindowMasker's, or
RepeatMasker's); many other genome files arrive all upper case. ``nucleo data build --mask``
masks those, one record at a time, with:

- ``dust``: the symmetric DUST algorithm (SDUST, Morgulis et al. 2006): low-complexity
  sequence (homopolymers, short tandem repeats), not interspersed repeats. Through the
  ``pydustmasker`` package when importable (``pip install pydustmasker``), else NCBI's
  ``dustmasker`` on PATH (``apt-get install ncbi-blast+``). Both with DUST's defaults
  (window 64, score threshold 20).
- ``windowmasker``: NCBI's WindowMasker (Morgulis et al. 2006), the masker of RefSeq's
  eukaryotic genomes: over-represented k-mers, so interspersed and tandem repeats. Its two
  passes (``-mk_counts``, then ``-ustat ... -outfmt interval``) run on each record alone, so
  the k-mer counts are the record's, not the whole genome's: right for a chromosome, rough
  for a short record. Needs ``windowmasker`` on PATH (``apt-get install ncbi-blast+``).

Only records with no lower-case base at all are masked: a record that carries its own soft mask
keeps it. A masker's intervals lower-case ``ACGT`` only; ``N`` stays upper case (an unknown base
is not a repeat). Masking is deterministic (same input, tool and settings: same mask).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.readers import SequenceRecord

#: the ``--mask`` choices (``ShardOptions.mask``)
MASKS = ("none", "dust", "windowmasker")
#: records shorter than this are left as they are (the tools refuse them)
MIN_BASES = 4
#: DUST's defaults, the same in pydustmasker and NCBI's dustmasker
DUST_WINDOW = 64
DUST_LEVEL = 20

_APT = "apt-get install ncbi-blast+"
_LOWER_ACGT = bytes.maketrans(b"ACGT", b"acgt")

Intervals = list[tuple[int, int]]


class MaskingError(ValueError):
    """A masker that cannot run (unknown, not installed, or failed); the message is one line."""


@dataclass(frozen=True)
class Masker:
    """One masking tool: ``intervals(seq)`` gives the half-open [start, end) intervals to mask.

    name: the ``--mask`` choice; tool and version: what ran; settings: its parameters."""

    name: str
    tool: str
    version: str
    settings: dict[str, Any]
    find: Callable[[bytes | bytearray], Intervals] = field(repr=False, compare=False)

    def intervals(self, seq: bytes | bytearray) -> Intervals:
        """Sorted half-open intervals of ``seq`` (upper-case ACGTN) that the tool masks."""
        if len(seq) < MIN_BASES:
            return []
        return sorted(self.find(seq))

    def describe(self) -> dict[str, Any]:
        """What the manifest records: mask, tool, version, settings."""
        return {
            "mask": self.name,
            "tool": self.tool,
            "version": self.version,
            "settings": dict(self.settings),
        }


def get_masker(name: str) -> Masker | None:
    """The masker called ``name`` (None for ``"none"``); a one-line MaskingError when the name
    is unknown or no tool for it is installed."""
    if name == "none":
        return None
    if name == "dust":
        return _dust()
    if name == "windowmasker":
        return _windowmasker()
    raise MaskingError(f"mask {name!r} is not a masker; valid: {', '.join(MASKS)}")


def has_soft_mask(seq: bytes | bytearray) -> bool:
    """Whether ``seq`` has any lower-case (soft-masked) base."""
    return len(seq) > 0 and not seq.isupper()


def soft_mask(seq: bytearray, intervals: Any) -> int:
    """Lower-case the ACGT bases of ``seq`` inside ``intervals`` (pairs of half-open [start,
    end)), in place; returns how many bases became lower case."""
    changed = 0
    for start, end in np.asarray(intervals, dtype=np.int64).reshape(-1, 2).tolist():
        piece = seq[start:end]
        upper_before = len(piece) - piece.count(b"N") - sum(piece.count(b) for b in b"acgtn")
        seq[start:end] = piece.translate(_LOWER_ACGT)
        changed += upper_before
    return changed


class RecordMasker:
    """Masks the records of a shard build, each one once: intervals found in the build's first
    pass are remembered by the caller's key and applied again in its second, so the repeat
    counts of pass 1 and the chunks of pass 2 agree, and a slow tool runs once per record.
    Only intervals are kept, never sequences.

    ``apply(key, rec)`` masks ``rec`` in place and returns where its mask came from: "input"
    (it had lower case: kept as it is), the masker's name (masked by the tool), or "" (no
    mask). A line per record the tool masks goes to ``log``."""

    def __init__(self, masker: Masker | None, log: Callable[[str], None] = print) -> None:
        self.masker = masker
        self.log = log
        self._found: dict[Any, np.ndarray] = {}

    def apply(self, key: Any, rec: SequenceRecord) -> str:
        if has_soft_mask(rec.seq):
            return "input"
        if self.masker is None:
            return ""
        found = self._found.get(key)
        if found is not None:
            soft_mask(rec.seq, found)
            return self.masker.name
        started = time.time()
        found = np.asarray(self.masker.intervals(rec.seq), dtype=np.int64).reshape(-1, 2)
        self._found[key] = found
        masked = soft_mask(rec.seq, found)
        self.log(
            f"masked {rec.id} with {self.masker.name}: {masked:,} of {len(rec.seq):,} bases "
            f"({masked / max(1, len(rec.seq)):.1%}) in {len(found):,} intervals, "
            f"{time.time() - started:.1f}s"
        )
        return self.masker.name


# --- dust -------------------------------------------------------------------------------------


def _dust() -> Masker:
    try:
        pydustmasker = importlib.import_module("pydustmasker")
    except ImportError:
        pydustmasker = None
    if pydustmasker is not None:

        def find(seq: bytes | bytearray) -> Intervals:
            found = pydustmasker.DustMasker(
                seq.decode("ascii"), window_size=DUST_WINDOW, score_threshold=DUST_LEVEL
            )
            return [(int(s), int(e)) for s, e in found.intervals]

        return Masker(
            "dust",
            "pydustmasker",
            str(getattr(pydustmasker, "__version__", "?")),
            {"window_size": DUST_WINDOW, "score_threshold": DUST_LEVEL},
            find,
        )
    binary = shutil.which("dustmasker")
    if binary is None:
        raise MaskingError(
            "mask 'dust' needs the pydustmasker package or NCBI's dustmasker on PATH, and "
            f"neither is here: pip install pydustmasker (or {_APT})"
        )
    args = ["-window", str(DUST_WINDOW), "-level", str(DUST_LEVEL), "-linker", "1"]

    def find_ncbi(seq: bytes | bytearray) -> Intervals:
        with tempfile.TemporaryDirectory(prefix="nucleo-dust-") as tmp:
            fasta = _write_fasta(seq, Path(tmp) / "record.fa")
            out = _run([binary, "-in", str(fasta), "-outfmt", "interval", *args], "dustmasker")
        return _ncbi_intervals(out)

    settings = {"window": DUST_WINDOW, "level": DUST_LEVEL, "linker": 1}
    return Masker("dust", "dustmasker", _ncbi_version(binary), settings, find_ncbi)


# --- windowmasker -----------------------------------------------------------------------------


def _windowmasker() -> Masker:
    binary = shutil.which("windowmasker")
    if binary is None:
        raise MaskingError(f"mask 'windowmasker' needs NCBI's windowmasker on PATH: {_APT}")

    def find(seq: bytes | bytearray) -> Intervals:
        with tempfile.TemporaryDirectory(prefix="nucleo-windowmasker-") as tmp:
            fasta = _write_fasta(seq, Path(tmp) / "record.fa")
            counts = Path(tmp) / "counts"
            _run([binary, "-mk_counts", "-in", str(fasta), "-out", str(counts)], "windowmasker")
            out = _run(
                [binary, "-ustat", str(counts), "-in", str(fasta), "-outfmt", "interval"],
                "windowmasker",
            )
        return _ncbi_intervals(out)

    settings = {"counts": "per record (-mk_counts, defaults)", "dust": False}
    return Masker("windowmasker", "windowmasker", _ncbi_version(binary), settings, find)


# --- NCBI's command-line tools ----------------------------------------------------------------


def _write_fasta(seq: bytes | bytearray, path: Path, width: int = 80) -> Path:
    with open(path, "wb") as fh:
        fh.write(b">record\n")
        for start in range(0, len(seq), width * 1024):
            block = seq[start : start + width * 1024]
            fh.write(b"\n".join(block[i : i + width] for i in range(0, len(block), width)))
            fh.write(b"\n")
    return path


def _run(cmd: list[str], tool: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"
        raise MaskingError(f"{tool} failed ({' '.join(cmd[1:3])} ...): {why}")
    return done.stdout


def _ncbi_intervals(text: str) -> Intervals:
    """``-outfmt interval`` lines ``start - end`` (0-based, end inclusive) as half-open
    intervals."""
    found = []
    for line in text.splitlines():
        if line.startswith(">") or not line.strip():
            continue
        start, _, end = line.partition(" - ")
        found.append((int(start), int(end) + 1))
    return found


def _ncbi_version(binary: str) -> str:
    """``blast 2.12.0`` from ``<tool> -version`` (its 'Package:' line), else its first line."""
    try:
        out = subprocess.run(
            [binary, "-version"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in out.splitlines():
        if line.strip().startswith("Package:"):
            return line.split(":", 1)[1].split(",")[0].strip()
    return out.splitlines()[0].strip() if out.strip() else "?"
