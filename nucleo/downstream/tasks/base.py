"""What every task shares: the Task and Split types, the sampling helpers, and the builder
protocol by which a task file registers itself in ``TASKS``.

A task is one file: a builder class registered with ``@TASKS.register("name")`` (here, or in
another package through the ``nucleo.tasks`` entry-point group) holding

- ``needs``: the input option the offline corpus can supply when it is not given;
- ``corpus_inputs(corpus) -> dict``: those inputs, found in a ``nucleo data corpus`` folder;
- ``build(**options) -> Task``: the task, with leakage-free splits; its keyword arguments are
  the options ``nucleo tasks build NAME`` accepts (``--option KEY=VALUE`` for any of them).
"""

from __future__ import annotations

import csv
import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from nucleo.core.registry import TASKS


class TaskError(ValueError):
    """A task folder or file that cannot be read; the message names the file and what is valid."""


@dataclass
class Split:
    """One split: ``sequences`` (upper-case bytes), ``labels`` [n] int64 class indices, an
    ``id`` per example and the ``group`` (record or organism) it was cut from."""

    sequences: list[bytes]
    labels: np.ndarray
    ids: list[str]
    groups: list[str]
    #: (region, start, end, strand) per example when it came from a reference, else None.
    regions: list[tuple[str, int, int, str]] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def counts(self, n_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=n_classes).tolist()


@dataclass
class Task:
    name: str
    classes: list[str]
    splits: dict[str, Split]
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        parts = []
        for name, split in self.splits.items():
            counts = ", ".join(
                f"{c} {n}"
                for c, n in zip(self.classes, split.counts(len(self.classes)), strict=True)
            )
            lengths = [len(s) for s in split.sequences] or [0]
            parts.append(
                f"{name}: {len(split)} sequences ({counts}); {len(set(split.groups))} groups; "
                f"length {min(lengths)}-{max(lengths)}"
            )
        return f"task {self.name}: {len(self.classes)} classes\n  " + "\n  ".join(parts)


class TaskBuilder(Protocol):
    """What a task file registers (see the module docstring)."""

    needs: ClassVar[str]

    @staticmethod
    def corpus_inputs(corpus: Path) -> dict[str, Any]: ...

    @staticmethod
    def build(**options: Any) -> Task: ...


def build_task(name: str, corpus: str | Path | None = None, **options: Any) -> Task:
    """Build the registered task ``name`` from explicit options (None: not given) or, for its
    main input when not given, from the offline corpus folder ``corpus``."""
    builder: Any = TASKS.get(name).cls
    inputs = {k: v for k, v in options.items() if v is not None}
    if builder.needs not in inputs:
        if corpus is None:
            raise TaskError(f"task {name} needs --{builder.needs} or --corpus")
        inputs = {**builder.corpus_inputs(Path(corpus)), **inputs}
    accepted = inspect.signature(builder.build).parameters
    unknown = sorted(set(inputs) - set(accepted))
    if unknown:
        raise TaskError(
            f"task {name} takes no option {', '.join(unknown)}; it takes {', '.join(accepted)}"
        )
    return builder.build(**inputs)


def corpus_files(corpus: Path) -> list[tuple[str, str]]:
    """(path, format) of every file of an offline corpus folder's manifests."""
    files = []
    for manifest in sorted((corpus / "manifests").glob("*.tsv")):
        with manifest.open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                files.append((row["path"], row.get("format", "")))
    if not files:
        raise TaskError(
            f"{corpus}/manifests: no corpus manifests; build it with `nucleo data corpus`"
        )
    return files


# ----------------------------------------------------------------------------- sampling


def has_n(seq: bytes) -> bool:
    return seq.count(b"N") > 0


def grid_fragments(
    seq: bytes | bytearray, length: int, count: int, rng: np.random.Generator
) -> list[int]:
    """Up to ``count`` distinct non-overlapping fragment starts (multiples of ``length``) of
    ``seq`` whose fragment holds no N."""
    slots = len(seq) // length
    out: list[int] = []
    for slot in rng.permutation(slots):
        start = int(slot) * length
        if not has_n(bytes(seq[start : start + length])):
            out.append(start)
            if len(out) == count:
                break
    return out


def in_test(group: str, salt: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"{salt}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_from(rows: list[tuple[bytes, int, str, str, tuple[str, int, int, str] | None]]) -> Split:
    regions = [r[4] for r in rows]
    return Split(
        sequences=[r[0] for r in rows],
        labels=np.array([r[1] for r in rows], np.int64),
        ids=[r[2] for r in rows],
        groups=[r[3] for r in rows],
        regions=None if any(r is None for r in regions) else regions,  # type: ignore[misc]
    )
