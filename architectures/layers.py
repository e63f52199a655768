"""What every family shares: the config base with size presets, the residual block, the
language-model shell (embedding, blocks, norm, tied head), gradient checkpointing, bf16
autocast, the precision contract of float32 regions, and the causal depthwise convolution.

A family supplies a *mixer* (the sequence-mixing layer, [B, L, D] -> [B, L, D]) and its config;
``LanguageModel`` does the rest, so every family has the same interface:
tokens [B, L] int64 (and an optional attention_mask [B, L], 1 on real tokens, 0 on right
padding) -> ``ModelOutput(hidden [B, L, D] float32, logits [B, L, V] float32)``.

Padding: a batch is right-padded. A causal model needs nothing more (position t never sees a
later one). A bidirectional model hands its blocks a ``Padding``, and each bidirectional mixer
(``takes_padding = True``) keeps pads from reaching real positions: attention masks them as
keys, convolutions zero them, and reversed passes reverse each sequence within its own length
(``Padding.reverse``). A sequence's outputs are then those it has alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from architectures.kernels import CAUSAL_CONV1D, KernelMode, use
from nucleo.core import cost
from nucleo.core.schema import check
from nucleo.core.types import ModelOutput

# The size ladder shared by every family: about 3.5x more parameters per rung, from ~0.5M to
# ~1B, so a scaling sweep is one flag (``--set model.size=...``). Each family's PRESETS pick a
# width and depth that land near these totals; tests/architectures/test_architectures.py holds
# them to it.
SIZES: dict[str, float] = {
    "tiny": 0.5e6,
    "mini": 1.75e6,
    "small": 6e6,
    "base": 21e6,
    "medium": 75e6,
    "large": 260e6,
    "xl": 900e6,
}


@dataclass
class ModelConfig:
    """Settings every family has.

    size: a preset of SIZES (null: none); it sets the family's width and depth, and any key
        given beside it overrides the preset. d_model: width D. n_layers: blocks.
    checkpointing: recompute each block's activations in backward (less memory, ~30% slower).
    autocast: "bf16" runs matrix products in bfloat16 under torch.autocast (CPU and GPU) with
        float32 weights; the FFTs and scans that need float32 stay in float32.
    kernels: the optional CUDA kernels (mamba-ssm, causal-conv1d, flash-attn): "auto" uses
        each where it loads and suits the layer, else PyTorch with one line saying why;
        "required" stops instead; "off" never uses them (architectures.kernels).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    size: str | None = None
    d_model: int = 256
    n_layers: int = 4
    checkpointing: bool = False
    autocast: Literal["fp32", "bf16"] = "fp32"
    kernels: KernelMode = "auto"

    def __post_init__(self) -> None:
        if self.size is not None:
            check(
                self.size in self.PRESETS,
                "size",
                f"unknown size {self.size!r}; presets: {', '.join(self.PRESETS)}",
            )
        check(self.d_model > 0, "d_model", f"must be > 0, got {self.d_model}")
        check(self.n_layers > 0, "n_layers", f"must be > 0, got {self.n_layers}")


def presets(rows: Iterable[tuple[str, int, int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """PRESETS from rows (size, d_model, n_layers, other settings of the family)."""
    out = {}
    for size, d_model, n_layers, extra in rows:
        assert size in SIZES, f"{size!r} is not one of {', '.join(SIZES)}"
        out[size] = {"d_model": d_model, "n_layers": n_layers, **extra}
    return out


class Padding:
    """Right padding of a batch: ``mask`` [B, L] bool (true on real tokens), ``lengths`` [B].

    Built by ``Padding.of`` from an attention mask; mixers use ``zero`` (pads set to 0) and
    ``reverse`` (each sequence reversed within its length, pads left in place).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.lengths = mask.sum(-1)

    @staticmethod
    def of(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> Padding | None:
        """The padding of ``attention_mask`` [B, L] (None, or no zeros: None).

        Raises ValueError unless it is right padding (ones, then zeros) of tokens' shape with at
        least one real token per row: the mixers' exactness rests on that.
        """
        if attention_mask is None:
            return None
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; the tokens have "
                f"{tuple(tokens.shape)}"
            )
        mask = attention_mask.to(tokens.device) != 0
        lengths = mask.sum(-1, keepdim=True)
        prefix = torch.arange(mask.shape[-1], device=mask.device) < lengths
        if not torch.equal(mask, prefix):
            raise ValueError("attention_mask must be right padding: ones, then zeros, per row")
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask has a row without real tokens")
        return None if bool(mask.all()) else Padding(mask)

    def repeat(self, times: int) -> Padding:
        """The padding of ``times`` copies of the batch stacked along B (strand batches)."""
        return Padding(self.mask.repeat(times, 1))

    def zero(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """x with its pad positions along ``dim`` (the length axis) set to zero."""
        shape = [1] * x.dim()
        shape[0], shape[dim] = self.mask.shape
        return x * self.mask.view(shape).to(x.dtype)

    def reverse(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """x with each sequence reversed within its length along ``dim`` (pads stay put)."""
        length = self.mask.shape[-1]
        t = torch.arange(length, device=x.device)
        lengths = self.lengths.to(x.device)[:, None]
        index = torch.where(t < lengths, lengths - 1 - t, t)  # [B, L]
        shape = [1] * x.dim()
        shape[0], shape[dim] = index.shape
        return x.gather(dim, index.view(shape).expand_as(x))


def reverse(x: torch.Tensor, padding: Padding | None, dim: int = 1) -> torch.Tensor:
    """x reversed along ``dim``: per sequence within its length when padded, else a flip."""
    return x.flip(dim) if padding is None else padding.reverse(x, dim)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(D, r*D) -> GELU -> Linear(r*D, D)."""

    def __init__(self, d_model: int, ratio: float) -> None:
        super().__init__()
        hidden = int(ratio * d_model)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    def flops(self, batch: int, length: int) -> cost.Flops:
        """Up and down projections."""
        rows = batch * length
        return cost.Flops(matmul=cost.linear(self.up, rows) + cost.linear(self.down, rows))


#: With checkpointing, the position-wise half of a block (norm, MLP, residual) runs in pieces of
#: this many positions, each recomputed in backward, so its r*D-wide hidden layer never exists
#: for the whole sequence at once (4 GB per layer for d_model 128 at 2^20 positions, fp32).
POSITIONWISE_CHUNK = 65536


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) when mlp_ratio > 0.

    positionwise_chunk: when > 0 (set by LanguageModel under checkpointing) and the sequence
    is longer, the MLP half runs in checkpointed pieces of that many positions.
    """

    positionwise_chunk: int = 0

    def __init__(
        self, mixer: nn.Module, d_model: int, mlp_ratio: float = 0.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.RMSNorm(d_model) if mlp_ratio > 0 else None
        self.mlp = MLP(d_model, mlp_ratio) if mlp_ratio > 0 else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        """x [B, L, D]; ``padding`` reaches the mixer (bidirectional models pass one)."""
        x = x + self.drop(mix(self.mixer, self.norm1(x), padding))
        if self.mlp is None:
            return x
        chunk = self.positionwise_chunk
        if chunk and x.shape[1] > chunk and torch.is_grad_enabled():
            pieces = x.split(chunk, dim=1)
            return torch.cat([checkpoint(self._mlp, p, use_reentrant=False) for p in pieces], 1)
        return self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mlp is not None and self.norm2 is not None
        return x + self.drop(self.mlp(self.norm2(x)))

    def residual_projections(self) -> list[nn.Linear]:
        """Linear layers that write into the residual stream (scaled at init)."""
        out = [m for m in (getattr(self.mixer, "out_proj", None),) if isinstance(m, nn.Linear)]
        return out + ([self.mlp.down] if self.mlp is not None else [])

    def flops(self, batch: int, length: int) -> cost.Flops:
        """The mixer's formula plus the MLP's."""
        out = cost.module_flops(self.mixer, batch, length)
        if self.mlp is not None:
            out += self.mlp.flops(batch, length)
        return out


def mix(mixer: nn.Module, x: torch.Tensor, padding: Padding | None) -> torch.Tensor:
    """mixer(x), with ``padding`` when there is one; a mixer that cannot take it refuses."""
    if padding is None:
        return mixer(x)
    if not getattr(mixer, "takes_padding", False):
        raise ValueError(
            f"{type(mixer).__name__} takes no padding mask (no takes_padding = True), so a "
            "bidirectional model built on it cannot run a padded batch exactly; pass "
            "sequences of one length, or give the mixer a ``padding`` argument"
        )
    return mixer(x, padding=padding)


def autocast_context(mode: str, device: torch.device):
    """torch.autocast for ``mode`` ("bf16", or "fp32": none) on the device type of ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def float32_region(device: torch.device):
    """Turn autocast off for a block of code that must run in float32 (FFTs, scans).

    The precision contract (DESIGN.md principle 6): such a region casts its inputs up with
    ``.float()`` and hands its result to the next layer with ``like_weights``.
    """
    return torch.autocast(device.type, enabled=False)


def like_weights(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``x`` in the dtype of ``layer``'s weights: a float32 region's result, handed back.

    With bf16 weights (DeepSpeed ``bf16``) that is bfloat16; with float32 weights (fp32, or
    bf16 autocast, which casts inside the layer itself) ``x`` is returned as it is.
    """
    return x.to(layer.weight.dtype)


class LanguageModel(nn.Module):
    """Embedding -> blocks -> RMSNorm -> tied LM head, shared by every family.

    Subclasses set ``causal`` and ``rc_equivariant`` and pass their blocks (each
    [B, L, D] -> [B, L, D]). Weights: normal(0.02), residual projections scaled by
    1/sqrt(2 * n_layers) (GPT-2), so every family starts from the same footing.
    """

    causal: bool = True
    rc_equivariant: bool = False

    def __init__(self, cfg: ModelConfig, vocab_size: int, blocks: Iterable[nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        if cfg.checkpointing:  # Block and any module that declares the attribute
            for module in self.modules():
                if hasattr(module, "positionwise_chunk"):
                    module.positionwise_chunk = POSITIONWISE_CHUNK
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(
                module, "keep_init", False
            ):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in getattr(block, "residual_projections", list)():
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    def run_blocks(self, x: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        """The blocks, each recomputed in backward when ``checkpointing`` is on."""
        for block in self.blocks:
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, padding, use_reentrant=False)
            else:
                x = block(x) if padding is None else block(x, padding)
        return x

    def padding(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> Padding | None:
        """What the blocks need of ``attention_mask``: nothing for a causal model (right pads
        come after every real position), a ``Padding`` for a bidirectional one. Either way the
        mask is checked (left padding would be silently wrong)."""
        padding = Padding.of(attention_mask, tokens)
        return None if self.causal else padding

    def forward(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ModelOutput:
        """tokens [B, L] int64, attention_mask [B, L] (1 real, 0 right padding; None: no
        padding) -> hidden [B, L, D], logits [B, L, V], both float32. Real positions come out
        as they would alone; pad positions carry values nobody should read."""
        padding = self.padding(tokens, attention_mask)
        with autocast_context(self.cfg.autocast, tokens.device):
            hidden = self.norm(self.run_blocks(self.embed(tokens), padding))
            logits = self.head(hidden)
        return ModelOutput(hidden=hidden.float(), logits=logits.float())

    def hidden_states(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, layer: int = -1
    ) -> torch.Tensor:
        """[B, L, D] float32 states after ``layer`` of the n blocks: 0 is the embedding, i the
        residual stream after block i, n (or -1) the final normed states (``forward``'s
        ``hidden``); negative counts from the end (-2: after block n - 1). Runs only the blocks
        it needs."""
        n = len(self.blocks)
        if not -(n + 1) <= layer <= n:
            raise ValueError(
                f"layer {layer}: this model has layers 0..{n} (0: the embedding, {n} or -1: "
                f"the final states) or -{n + 1}..-1 from the end"
            )
        index = layer % (n + 1)
        padding = self.padding(tokens, attention_mask)
        with autocast_context(self.cfg.autocast, tokens.device):
            x, inner = self.stem(tokens, padding)
            for block in self.blocks[:index]:
                x = block(x) if inner is None else block(x, inner)
            if index == n:
                x = self.norm(x)
            return self.merge_strands(x, padding).float()

    def stem(
        self, tokens: torch.Tensor, padding: Padding | None
    ) -> tuple[torch.Tensor, Padding | None]:
        """The blocks' input for ``tokens`` and the padding they take (Caduceus: both strands)."""
        return self.embed(tokens), padding

    def merge_strands(self, x: torch.Tensor, padding: Padding | None) -> torch.Tensor:
        """Block states as [B, L, D] (Caduceus: its two strands side by side)."""
        return x

    def prefill(self, tokens: torch.Tensor, window: int | None = None) -> tuple[torch.Tensor, Any]:
        """Incremental decoding's start: tokens [B, L] -> (logits of the last position [B, V]
        float32, a cache for ``step``); later steps look back at most ``window`` positions.
        ValueError for a bidirectional model or a mixer without state (architectures.incremental).
        """
        from architectures.incremental import prefill

        return prefill(self, tokens, window)

    def step(self, token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One more token [B] after ``prefill`` -> (its logits [B, V] float32, the cache)."""
        from architectures.incremental import step

        return step(self, token, cache)

    #: LM heads applied per position (Caduceus with RC parameter sharing: one per strand).
    heads_per_position = 1

    def flops(self, batch: int, length: int) -> cost.Flops:
        """Forward FLOPs on tokens [batch, length]: every block, plus the tied LM head."""
        out = cost.Flops()
        for block in self.blocks:
            out += cost.module_flops(block, batch, length)
        vocab, width = self.embed.num_embeddings, self.embed.embedding_dim
        out["matmul"] += self.heads_per_position * 2.0 * width * vocab * batch * length
        return out


def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: str = "auto",
    unsuitable: str | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution along L: x [B, C, L], weight [C, K] -> [B, C, L].

    Output t sees inputs t-K+1..t (left zero padding). causal-conv1d's kernel on CUDA under
    ``kernels`` (architectures.kernels; ``unsuitable``: why this layer's width does not suit
    it). The kernel takes x contiguous along L, or channel-last with C and strides multiples
    of 8; anything else is made contiguous first.
    """
    kernel = use(CAUSAL_CONV1D, x.device, kernels, unsuitable)
    if kernel is not None:
        channel_last_ok = x.stride(1) == 1 and x.shape[1] % 8 == 0
        channel_last_ok = channel_last_ok and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0
        if x.stride(2) != 1 and not channel_last_ok:
            x = x.contiguous()
        return kernel(x, weight, bias)
    width = weight.shape[-1]
    return F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
