"""Training: the run config, the DeepSpeed engine, the objective, the trainer loop, evaluation,
checkpoints, export, tracking (the one MLflow seam) and the compute counter.

Imports ``nucleo.core`` and the families (``architectures``, ``losses``, ``data_pipeline``).
"""
