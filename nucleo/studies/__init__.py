"""Studies over many runs: sweeps, run comparison, scaling-law fits and plans, the GPU check.

Imports ``nucleo.train``, ``nucleo.downstream`` and below.
"""
