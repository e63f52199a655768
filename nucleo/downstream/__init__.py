"""Using trained models: downstream tasks, fine-tuning (through the training engine), linear
probes, inference (scores, embeddings) and generation with its evaluation.

Imports ``nucleo.train`` and below.
"""
