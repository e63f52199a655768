"""``kingdom``: which kingdom a fragment (200 bp) comes from, balanced classes. Train fragments
come from the corpus's ``train`` shards, test fragments from its ``val`` shards, whose records
the corpus split by near-duplicate cluster: no record (or near copy) is on both sides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.loader import split_chunks
from nucleo.core.registry import TASKS
from nucleo.downstream.tasks.base import Task, TaskError, grid_fragments, split_from


def build_kingdom(
    shards: str | Path,
    length: int = 200,
    train_per_class: int = 400,
    test_per_class: int = 100,
    seed: int = 0,
    kingdoms: Sequence[str] | None = None,
) -> Task:
    """The ``kingdom`` task from a shard folder (``nucleo data build``/``corpus``): train
    fragments from ``train`` shards, test fragments from ``val`` shards. A kingdom without
    ``val`` records (or too few bases for the asked count) is left out and named in meta."""
    from data_pipeline.shards import load_manifest

    root = shards if storage.is_url(shards) else Path(shards)  # a URL stays one
    manifest = load_manifest(root)
    rng = np.random.default_rng(seed)
    names = sorted(kingdoms or manifest["kingdoms"])
    kept, left_out = [], {}
    for kingdom in names:
        if kingdom not in manifest["kingdoms"]:
            raise TaskError(f"{root}/manifest.json has no kingdom {kingdom!r}")
        info = manifest["kingdoms"][kingdom]
        need = {"train": train_per_class, "val": test_per_class}
        short = [s for s in need if info.get(s, {}).get("bases", 0) < need[s] * length * 1.25]
        if short:
            left_out[kingdom] = f"too few bases in its {'/'.join(short)} split"
            continue
        kept.append(kingdom)
    if len(kept) < 2:
        raise TaskError(f"{root}: fewer than 2 kingdoms with both train and val data ({left_out})")
    rows: dict[str, list] = {"train": [], "test": []}
    for label, kingdom in enumerate(kept):
        for split, out, count in (
            ("train", "train", train_per_class),
            ("val", "test", test_per_class),
        ):
            chunks = split_chunks(root, kingdom, split, manifest)
            weights = np.array([len(c[2]) // length for c in chunks], float)
            per_chunk = np.bincount(
                rng.choice(len(chunks), size=count * 2, p=weights / weights.sum()),
                minlength=len(chunks),
            )
            picked = []
            for index in np.flatnonzero(per_chunk):
                record, offset, seq = chunks[index]
                for start in grid_fragments(seq, length, int(per_chunk[index]), rng):
                    frag = seq[start : start + length]
                    region = (record, offset + start, offset + start + length, "+")
                    picked.append((frag, label, f"{record}:{offset + start}", record, region))
            if len(picked) < count:
                raise TaskError(
                    f"{kingdom}/{split}: only {len(picked)} N-free fragments, need {count}"
                )
            order = rng.permutation(len(picked))[:count]
            rows[out].extend(picked[i] for i in sorted(order))
    meta = {"source": str(root), "length": length, "seed": seed, "left_out": left_out}
    return Task("kingdom", kept, {k: split_from(v) for k, v in rows.items()}, meta)


@TASKS.register("kingdom")
class Kingdom:
    """which kingdom a fragment comes from (test: the corpus's held-out val shards)"""

    needs = "shards"
    build = staticmethod(build_kingdom)

    @staticmethod
    def corpus_inputs(corpus: Path) -> dict[str, Any]:
        return {"shards": corpus / "shards"}
