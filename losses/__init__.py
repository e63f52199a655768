"""Losses, one file per loss, each registered by name in ``LOSSES``.

A loss is called as ``loss(batch, outputs, model) -> LossOutput`` where ``outputs`` maps each
view it declared (``"forward"``, ``"rc"``) to the model's output on that view. Losses are pure:
no logging, no all-reduce, no forward passes of their own. Importing this package registers
them all.
"""

from losses import ce as ce
