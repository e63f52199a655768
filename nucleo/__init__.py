"""nucleo: pretraining DNA language models.

The package is split so that importing it is cheap: nothing here imports torch or DeepSpeed.
The foundation modules (``registry``, ``types``, ``alphabet``, ``schema``) import nothing else
from the project; the families (``architectures``, ``losses``, ``data_pipeline``) import only
them; the rest of ``nucleo`` (config, trainer, engine, tracking, CLI) composes the families.
"""

__version__ = "0.1.0"
