"""Multi-node jobs under Slurm: the launcher (``python -m nucleo.slurm``) and its sbatch
scripts, shipped as package data (``pretrain.sbatch``, ``sweep.sbatch``).

Imports ``nucleo.train`` and below, lazily (the per-node steps only exec).
"""

from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
"""The folder holding ``pretrain.sbatch`` and ``sweep.sbatch``."""
