"""Import the component families so that their registries are filled.

``nucleo.registry`` cannot import the families (they import it); anything that looks names up
imports the registries from here instead.
"""

import architectures  # noqa: F401  (registers architectures)
import data_pipeline  # noqa: F401  (registers tokenizers)
import losses  # noqa: F401  (registers losses)
from nucleo.registry import ARCHITECTURES, LOSSES, TOKENIZERS

__all__ = ["ARCHITECTURES", "LOSSES", "TOKENIZERS"]
