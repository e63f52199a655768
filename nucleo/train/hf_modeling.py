"""Hugging Face ``transformers`` classes for nucleo exports: ``trust_remote_code=True`` loading.

``export_model`` copies this file into every export as ``modeling_nucleo.py`` and names its
classes in config.json (``model_type: nucleo``, ``auto_map``), so that::

    AutoConfig / AutoModel / AutoModelForCausalLM (causal) / AutoModelForMaskedLM (bidirectional)
        .from_pretrained(export_dir, trust_remote_code=True)

work. The classes do not re-implement the architectures: they build the model with the
installed ``nucleo`` package (``pip install -e .`` in its repository, beside ``transformers``)
from config.json's ``arch``, ``model``, ``vocab_size`` and ``complement_ids``, and call its forward,
so logits are nucleo's own. Weights load from the export's model.safetensors under the prefix
``nucleo.``; the weights nucleo shares between modules (the tied embedding and head, BiMamba's
shared projections), stored once, are re-tied through ``_tied_weights_keys``.

Inputs: ``input_ids`` [B, L] int64 and ``attention_mask`` [B, L] 1/0 (right padding, as
``AutoTokenizer(..., padding=True)`` gives), passed through to nucleo's forward.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, MaskedLMOutput

from nucleo.core.alphabet import BOS, EOS, MASK, PAD
from nucleo.core.schema import from_dict
from nucleo.train.components import ARCHITECTURES

PREFIX = "nucleo"  # the nucleo model's attribute: its weights load as nucleo.<name>
if int(transformers.__version__.split(".")[0]) < 5:  # 4.x ties weights by another protocol
    raise ImportError(
        f"nucleo's transformers classes need transformers>=5.0, not "
        f"{transformers.__version__}: pip install -U transformers"
    )


class NucleoConfig(PretrainedConfig):
    """An export's config.json: nucleo's keys (``arch``, ``model``: the family's settings,
    ``vocab_size``, ``complement_ids``: the tokenizer's complement permutation or None,
    ``causal``) and anything else it holds (``run_config``, ``trained``) as attributes."""

    model_type = "nucleo"

    def __init__(
        self,
        arch: str = "transformer",
        model: dict[str, Any] | None = None,
        vocab_size: int = 9,
        complement_ids: list[int] | None = None,
        causal: bool = True,
        **kwargs: Any,
    ) -> None:
        self.arch = arch
        self.model = dict(model or {})
        self.vocab_size = vocab_size
        self.complement_ids = complement_ids
        self.causal = causal
        for key, value in (("pad", PAD), ("bos", BOS), ("eos", EOS), ("mask", MASK)):
            kwargs.setdefault(f"{key}_token_id", value)
        kwargs.setdefault("tie_word_embeddings", True)  # which weights: _tied_weights_keys
        super().__init__(**kwargs)


def build_nucleo(config: NucleoConfig) -> nn.Module:
    """nucleo's model for ``config`` (freshly initialised), built on the CPU even inside
    ``from_pretrained``'s meta-device context: its non-persistent buffers are computed here."""
    entry = ARCHITECTURES.get(config.arch)
    settings: Any = from_dict(entry.config, {**config.model, "kernels": "auto"}, "model")
    with torch.device("cpu"):
        return ARCHITECTURES.build(
            config.arch,
            settings,
            vocab_size=config.vocab_size,
            complement_ids=config.complement_ids,
        )


def shared_weights(module: nn.Module, prefix: str) -> dict[str, str]:
    """{target: source} for every parameter ``module`` holds under several names, as
    regexes; the source is the name safetensors keeps (the alphabetically first)."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(f"{prefix}.{name}")
    out = {}
    for group in names.values():
        source, *targets = sorted(group)
        out.update({re.escape(t) + "$": re.escape(source) + "$" for t in targets})
    return out


def _hidden(out: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    """(final hidden states,) when ``output_hidden_states`` asks (nucleo keeps no others)."""
    return (out.hidden,) if kwargs.get("output_hidden_states") else None


class NucleoPreTrainedModel(PreTrainedModel):
    """Holds nucleo's model as ``self.nucleo``; weights come from nucleo's own initialisation
    or from the export, never from transformers' initialisers."""

    config_class = NucleoConfig
    base_model_prefix = PREFIX
    main_input_name = "input_ids"

    def __init__(self, config: NucleoConfig) -> None:
        super().__init__(config)
        self.nucleo = build_nucleo(config)
        self._tied_weights_keys = shared_weights(self.nucleo, PREFIX)
        # non-persistent buffers (filter decays, complement tables) are not in the weights
        # file, and from_pretrained replaces them with empty tensors: kept to put back
        self._computed = {
            name: buf.detach().clone()
            for name, buf in self.named_buffers()
            if name not in self.state_dict()
        }

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: nucleo initialised the model when it built it (from torch's seed)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info
        with torch.no_grad():
            for name, value in model._computed.items():
                model.get_buffer(name).copy_(value)
        return loaded

    def get_input_embeddings(self) -> nn.Module | None:
        return getattr(self.nucleo, "embed", None)

    def _nucleo(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        """nucleo's ModelOutput (hidden [B, L, D], logits [B, L, V], fp32)."""
        return self.nucleo(input_ids, attention_mask=attention_mask)


class NucleoModel(NucleoPreTrainedModel):
    """``AutoModel``: the final hidden states [B, L, D] as ``last_hidden_state``."""

    def __init__(self, config: NucleoConfig) -> None:
        super().__init__(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        out = self._nucleo(input_ids, attention_mask)
        return BaseModelOutput(last_hidden_state=out.hidden, hidden_states=_hidden(out, kwargs))


class NucleoForCausalLM(NucleoPreTrainedModel, GenerationMixin):
    """``AutoModelForCausalLM`` (causal exports): next-token logits [B, L, V]; ``labels``
    [B, L] gives the shifted cross-entropy (-100 ignored); ``generate`` works (no cache:
    each step runs the whole sequence)."""

    def __init__(self, config: NucleoConfig) -> None:
        super().__init__(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # nucleo's models keep no key/value cache

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The whole sequence so far, every step. Prompts must be unpadded (equal lengths):
        generate appends after the pads, and nucleo's models take right padding only."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "generate: give prompts of equal length, unpadded (one at a time otherwise): "
                "new tokens would follow the pads, and nucleo's models take right padding only"
            )
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        out = self._nucleo(input_ids, attention_mask)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            loss = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=out.logits, hidden_states=_hidden(out, kwargs))


class NucleoForMaskedLM(NucleoPreTrainedModel):
    """``AutoModelForMaskedLM`` (bidirectional exports): per-position logits [B, L, V];
    ``labels`` [B, L] gives the cross-entropy where it is not -100."""

    def __init__(self, config: NucleoConfig) -> None:
        super().__init__(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        out = self._nucleo(input_ids, attention_mask)
        loss = None
        if labels is not None:
            logits = out.logits.reshape(-1, out.logits.shape[-1])
            loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=out.logits, hidden_states=_hidden(out, kwargs))
