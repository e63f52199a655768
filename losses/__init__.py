"""Losses, one file per loss, each registered by name in ``LOSSES``.

A loss is built as ``cls(config, tokenizer)`` and called as ``loss(batch, outputs, model) ->
LossOutput`` where ``outputs`` maps each view it declared to the model's output on that view.
The objective makes the views ``"forward"`` (the tokens) and ``"rc"`` (their reverse
complement); a loss that needs another view (``mlm``'s ``"masked"``) makes it in an optional
``prepare(batch, generator)``, which the objective calls before any forward pass. A loss may
also define ``check_model(model)`` to refuse, with a ConfigError, a model its settings do not
fit. Every config extends ``losses.common.LossConfig`` (weight, schedule, cadence). Losses are
pure: no logging, no all-reduce, no forward passes of their own. Importing this package
registers them all.
"""

from losses import ce as ce
from losses import cgr as cgr
from losses import headless as headless
from losses import mlm as mlm
from losses import ph as ph
from losses import rc as rc
from losses import walk as walk
