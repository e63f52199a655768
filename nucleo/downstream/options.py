"""The named choices of the downstream commands, in a module light enough for the CLI's parser
(which is built before torch is imported)."""

LAYOUTS = ("parquet", "genomic-benchmarks", "genomic-benchmarks-cached")
"""Task folder layouts: nucleo's parquet, Genomic Benchmarks' folders of sequence files, and
Genomic Benchmarks' cached coordinates (which need the reference FASTA)."""

INITS = ("pretrained", "scratch")
"""Where a classifier's backbone starts: the export's weights, or its architecture fresh."""

MODES = ("full", "probe")
"""full: train backbone and head; probe: a logistic regression on frozen embeddings."""

BALANCES = ("none", "weights", "sampler")
"""How unbalanced classes are treated: not at all, a weighted loss, or a balanced sampler."""
