"""``plasmid_vs_chromosome``: plasmid vs chromosome fragments of whole genomes (the Klebsiella
pneumoniae assemblies of the corpus); one genome is held out for test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.readers import read_sequences
from nucleo.core.registry import TASKS
from nucleo.downstream.tasks.base import Task, TaskError, corpus_files, grid_fragments, split_from


def build_plasmid_vs_chromosome(
    genomes: Sequence[str | Path],
    test_genome: str | None = None,
    length: int = 200,
    train_per_class: int = 1000,
    test_per_class: int = 300,
    seed: int = 0,
) -> Task:
    """Plasmid vs chromosome fragments of whole-genome assemblies (one file per genome); a
    record is a plasmid when its description says so. Genomes without both kinds of record are
    skipped (named in meta). ``test_genome`` (a file name or stem; default: the last usable
    file) is held out for test, the others train."""
    paths = [Path(g) for g in genomes]
    stems = [p.name.split(".")[0] for p in paths]
    usable: dict[str, dict[int, list[tuple[str, bytes]]]] = {}
    skipped = {}
    for path, stem in zip(paths, stems, strict=True):
        pools: dict[int, list[tuple[str, bytes]]] = {0: [], 1: []}
        for record in read_sequences(path):
            label = 1 if "plasmid" in record.description.lower() else 0
            pools[label].append((record.id, bytes(record.seq)))
        if pools[0] and pools[1]:
            usable[stem] = pools
        else:
            skipped[str(path)] = f"{len(pools[0])} chromosome and {len(pools[1])} plasmid records"
    if len(usable) < 2:
        raise TaskError(
            "plasmid_vs_chromosome holds one genome out: it needs >= 2 genome files with both "
            "chromosome and plasmid records (a plasmid's description says 'plasmid'); usable: "
            f"{sorted(usable)}; skipped: {skipped}"
        )
    held = (test_genome or list(usable)[-1]).split(".")[0]
    if held not in usable:
        raise TaskError(
            f"--test-genome {held!r} is none of the usable genomes: {', '.join(usable)}"
        )
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"train": [], "test": []}
    for split in ("train", "test"):
        count = train_per_class if split == "train" else test_per_class
        members = [s for s in usable if (s == held) == (split == "test")]
        for label in (0, 1):
            pool = [(stem, rid, seq) for stem in members for rid, seq in usable[stem][label]]
            slots = np.array([len(seq) // length for _, _, seq in pool], float)
            per_record = np.bincount(
                rng.choice(len(pool), size=count, p=slots / slots.sum()), minlength=len(pool)
            )
            for index, (stem, rid, seq) in enumerate(pool):
                for start in grid_fragments(seq, length, int(per_record[index]), rng):
                    region = (rid, start, start + length, "+")
                    rows[split].append(
                        (seq[start : start + length], label, f"{rid}:{start}", stem, region)
                    )
    meta = {
        "genomes": [str(p) for p in paths],
        "test_genome": held,
        "skipped": skipped,
        "length": length,
        "seed": seed,
    }
    return Task(
        "plasmid_vs_chromosome",
        ["chromosome", "plasmid"],
        {k: split_from(v) for k, v in rows.items()},
        meta,
    )


@TASKS.register("plasmid_vs_chromosome")
class PlasmidVsChromosome:
    """plasmid vs chromosome fragments of whole genomes (one genome held out for test)"""

    needs = "genomes"
    build = staticmethod(build_plasmid_vs_chromosome)

    @staticmethod
    def corpus_inputs(corpus: Path) -> dict[str, Any]:
        klebs = sorted({p for p, _ in corpus_files(corpus) if "kleborate" in p})
        return {"genomes": klebs, "test_genome": "NTUH-K2044"}
