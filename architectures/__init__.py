"""Architectures, one file per family, each registered by name in ``ARCHITECTURES``.

Every architecture maps tokens [B, L] int64 to ``ModelOutput(hidden [B, L, D], logits [B, L, V])``
and declares ``causal`` (next-token) and ``rc_equivariant`` so that the objective can check
which losses apply. Importing this package registers them all.
"""

from architectures import caduceus as caduceus
from architectures import hybrid as hybrid
from architectures import hyena as hyena
from architectures import mamba as mamba
from architectures import multires as multires
from architectures import transformer as transformer
