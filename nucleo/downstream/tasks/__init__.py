"""Downstream classification tasks: built from real genomes with leakage-free splits, and read
or written in the layouts users already have.

Built tasks (``nucleo tasks build NAME``), one file each, registered in ``TASKS``:
``kingdom`` (kingdom.py), ``plasmid_vs_chromosome`` (plasmid.py), ``coding_vs_intergenic``
(coding.py); other packages add theirs through the ``nucleo.tasks`` entry-point group (base.py
says what a task file holds). Layouts (layouts.py): ``parquet``, ``genomic-benchmarks``,
``genomic-benchmarks-cached``.
"""

from nucleo.core.registry import TASKS
from nucleo.downstream.tasks.base import Split, Task, TaskBuilder, TaskError, build_task
from nucleo.downstream.tasks.coding import build_coding_vs_intergenic
from nucleo.downstream.tasks.kingdom import build_kingdom
from nucleo.downstream.tasks.layouts import detect_layout, load_task, save_task
from nucleo.downstream.tasks.plasmid import build_plasmid_vs_chromosome

__all__ = [
    "TASKS", "Split", "Task", "TaskBuilder", "TaskError", "build_coding_vs_intergenic",
    "build_kingdom", "build_plasmid_vs_chromosome", "build_task", "detect_layout", "load_task",
    "save_task",
]  # fmt: skip
