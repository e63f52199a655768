"""Import the component families so that their registries are filled.

``nucleo.core.registry`` cannot import the families (they import it); anything that looks names up
imports the registries from here instead.
"""

from typing import Any

from torch import nn

import architectures  # noqa: F401  (registers architectures)
import data_pipeline  # noqa: F401  (registers tokenizers)
import losses  # noqa: F401  (registers losses)
from nucleo.core.protocols import Tokenizer
from nucleo.core.registry import ARCHITECTURES, LOSSES, TOKENIZERS

__all__ = ["ARCHITECTURES", "LOSSES", "TOKENIZERS", "build_model"]


def build_model(arch: str, model_config: Any, tokenizer: Tokenizer) -> nn.Module:
    """The architecture ``arch`` sized for ``tokenizer``'s vocabulary, with its complement map
    (which the RC-equivariant families need)."""
    return ARCHITECTURES.build(
        arch,
        model_config,
        vocab_size=tokenizer.vocab_size,
        complement_ids=getattr(tokenizer, "complement_ids", None),
    )
