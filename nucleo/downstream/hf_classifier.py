"""``AutoModelForSequenceClassification`` for classifiers saved by ``nucleo finetune``.

``save_classifier`` copies this file into the classifier's folder as
``modeling_nucleo_classifier.py`` and names its class in config.json's ``auto_map``; with
``trust_remote_code=True`` transformers loads the backbone from model.safetensors and the head
from head.safetensors, and classifies exactly as ``nucleo.downstream.classifier`` does: its
``SequenceClassifier`` pooling (the mean of the final hidden states over real tokens, from
``attention_mask``) and its linear head. Needs the installed ``nucleo`` package.

Strand averaging (classifier.json's ``rc_conjoin``, which ``nucleo predict`` applies) is not:
this returns the logits of the strand it is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import cached_file

from nucleo.downstream.classifier import SequenceClassifier
from nucleo.train.hf_modeling import NucleoConfig, NucleoPreTrainedModel

HEAD_FILE = "head.safetensors"


class NucleoForSequenceClassification(NucleoPreTrainedModel):
    """Backbone (``self.nucleo``) -> masked mean [B, D] -> ``self.head`` [B, num_labels]."""

    _keys_to_ignore_on_load_missing = (r"^head\.",)  # in head.safetensors, loaded below

    def __init__(self, config: NucleoConfig) -> None:
        super().__init__(config)
        with torch.device("cpu"):
            self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.layer = int(getattr(config, "pooling_layer", -1))  # SequenceClassifier's layer
        self.post_init()

    @property
    def backbone(self) -> nn.Module:
        """What ``SequenceClassifier``'s methods call the backbone."""
        return self.nucleo

    embed = SequenceClassifier.embed  # nucleo's pooling, the very function

    @classmethod
    def from_pretrained(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info
        hub = ("cache_dir", "force_download", "local_files_only", "token", "revision")
        head_path = cached_file(path, HEAD_FILE, **{k: kwargs[k] for k in hub if k in kwargs})
        if head_path is None:  # cached_file raises for a missing file; a guard for mypy
            raise FileNotFoundError(f"{path}/{HEAD_FILE}: not found")
        head = load_file(head_path)
        with torch.no_grad():
            model.head.weight.copy_(head["weight"])
            model.head.bias.copy_(head["bias"])
        return loaded

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """input_ids, attention_mask: [B, L] -> class logits [B, num_labels]; ``labels`` [B]
        gives the cross-entropy."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = SequenceClassifier.forward(self, input_ids, mask.bool())  # type: ignore[arg-type]
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
