"""nucleo: pretraining DNA language models.

The package is split so that importing it is cheap: nothing here imports torch or DeepSpeed;
``nucleo.load`` (nucleo.api) imports them when first used.
The foundation modules (``registry``, ``types``, ``alphabet``, ``schema``) import nothing else
from the project; the families (``architectures``, ``losses``, ``data_pipeline``) import only
them; the rest of ``nucleo`` (config, trainer, engine, tracking, CLI) composes the families.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``nucleo.load`` (nucleo.api) without importing torch until it is used."""
    if name == "load":
        from nucleo.api import load

        return load
    raise AttributeError(f"module 'nucleo' has no attribute {name!r}")
