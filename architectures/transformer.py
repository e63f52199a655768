"""Transformer: pre-norm blocks, rotary positions, attention by flash-attn or PyTorch's SDPA.

tokens [B, L] -> embedding [B, L, D] -> n_layers x (x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)))
-> RMSNorm -> hidden [B, L, D] -> tied LM head -> logits [B, L, V].

Attention is causal (next-token) or bidirectional (masked-LM). On CUDA with bf16/fp16
activations it uses flash-attn's kernel when installed; everywhere else
``torch.nn.functional.scaled_dot_product_attention`` (a fused kernel on GPU and on CPU).
``attention_reference`` is the readable softmax(QK^T / sqrt(d)) V that the tests hold both to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from architectures.incremental import KVCache
from architectures.kernels import FLASH_ATTN, require_suitable, use
from architectures.layers import Block, LanguageModel, ModelConfig, Padding, presets
from nucleo.core import cost
from nucleo.core.registry import ARCHITECTURES
from nucleo.core.schema import check


@dataclass
class TransformerConfig(ModelConfig):
    """Size and shape of a transformer (size, d_model, n_layers, checkpointing, autocast: see
    ModelConfig).

    n_heads: attention heads (D must divide evenly). mlp_ratio: MLP hidden width as a multiple
    of D. dropout: on attention output and MLP. rope_base: rotary frequency base.
    causal: next-token (true) or bidirectional attention.
    """

    PRESETS = presets(
        [
            ("tiny", 128, 2, {"n_heads": 4}),
            ("mini", 192, 4, {"n_heads": 4}),
            ("small", 256, 8, {"n_heads": 4}),
            ("base", 384, 12, {"n_heads": 6}),
            ("medium", 640, 16, {"n_heads": 10}),
            ("large", 1024, 20, {"n_heads": 16}),
            ("xl", 1536, 32, {"n_heads": 24}),
        ]
    )

    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rope_base: float = 10000.0
    causal: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.n_heads > 0, "n_heads", "must be > 0")
        check(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        check((self.d_model // self.n_heads) % 2 == 0, "n_heads", "head size must be even (rotary)")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        why = flash_unsuitable(self.d_model // self.n_heads)
        require_suitable(self.kernels, [("n_heads", f"flash-attn: {why}")] if why else [])


def rotary_tables(length: int, head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """[L, head_dim / 2] complex rotations exp(i * t * base^(-2k/head_dim))."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def rotary_at(position: int, head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """[1, head_dim / 2] complex rotation of one position, its angles taken in float64."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = position * inv_freq
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[None].to(device)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x [B, L, H, Dh] by rotation [L, Dh/2] (complex)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2).type_as(x)


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v, masked above the diagonal when causal; [B, L, H, Dh]."""
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.float()).type_as(q)


def flash_unsuitable(head_dim: int, dtype: torch.dtype | None = None) -> str | None:
    """Why flash-attn's kernel cannot take heads of ``head_dim`` in ``dtype`` (None: it can)."""
    if head_dim > 256 or head_dim % 8:
        return f"head size d_model / n_heads = {head_dim}; its kernel takes multiples of 8 <= 256"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return (
            f"{str(dtype).removeprefix('torch.')} activations; its kernel takes bf16 "
            "(engine.precision=bf16 or model.autocast=bf16)"
        )
    return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    dropout: float = 0.0,
    kernels: str = "auto",
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention on q, k, v [B, L, H, Dh] -> [B, L, H, Dh].

    flash-attn on CUDA under ``kernels`` (architectures.kernels) when the heads and dtype suit
    it, else PyTorch SDPA. fp32 activations take SDPA quietly under ``auto`` (flash-attn has
    no fp32 kernel; nothing is missing). ``keys`` [B, L] bool: the positions that may be
    attended to (padding masked out; SDPA then, as flash-attn's padded path needs unpadding).
    """
    if keys is not None:
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=keys[:, None, None, :],
            dropout_p=dropout,
            is_causal=False,
        )
        return y.transpose(1, 2)
    if q.device.type == "cuda" and kernels != "off":
        why = flash_unsuitable(q.shape[-1], q.dtype)
        quiet_fp32 = kernels == "auto" and q.dtype == torch.float32 and why is not None
        flash = None if quiet_fp32 else use(FLASH_ATTN, q.device, kernels, why)
        if flash is not None:
            return flash(q, k, v, dropout_p=dropout, causal=causal)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, dropout_p=dropout
    )
    return y.transpose(1, 2)


class Attention(nn.Module):
    """Rotary multi-head self-attention, [B, L, D] -> [B, L, D]."""

    uses_kernels = (FLASH_ATTN,)
    takes_padding = True

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.rope_base = cfg.rope_base
        self.kernels = cfg.kernels
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, padding: Padding | None = None) -> torch.Tensor:
        """x [B, L, D]; ``padding``: pads are never attended to (bidirectional; a causal
        layer needs no mask for right padding)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).unbind(2)
        rotation = rotary_tables(length, q.shape[-1], self.rope_base, x.device)
        q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        keys = padding.mask if padding is not None and not self.causal else None
        dropout = self.dropout if self.training else 0.0
        y = attention(q, k, v, self.causal, dropout, self.kernels, keys)
        return self.out_proj(y.reshape(batch, length, width))

    def prefill(self, x: torch.Tensor, window: int) -> tuple[torch.Tensor, KVCache]:
        """The causal forward on a prompt x [B, L, D], and a KVCache of its last ``window``
        rotated keys and values (architectures.incremental)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).unbind(2)
        rotation = rotary_tables(length, q.shape[-1], self.rope_base, x.device)
        q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        y = attention(q, k, v, True, 0.0, self.kernels)
        cache = KVCache(k.transpose(1, 2), v.transpose(1, 2), window)
        return self.out_proj(y.reshape(batch, length, width)), cache

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One position x [B, D] -> [B, D]: its query attends to the cached keys and its own.
        Its rotary angle is taken in float64, so positions far past 2^16 stay exact."""
        batch, width = x.shape
        q, k, v = self.qkv(x).view(batch, 1, 3, self.n_heads, -1).unbind(2)  # [B, 1, H, Dh]
        rotation = rotary_at(cache.position, q.shape[-1], self.rope_base, x.device)
        q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        keys, values = cache.append(k[:, 0], v[:, 0])  # [B, H, n, Dh]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values)  # [B, H, 1, Dh]
        return self.out_proj(y.reshape(batch, width))

    def flops(self, batch: int, length: int) -> cost.Flops:
        """Projections, and q k^T plus attention x v over the full L x L matrix."""
        rows = batch * length
        return cost.Flops(
            matmul=cost.linear(self.qkv, rows) + cost.linear(self.out_proj, rows),
            attention=4.0 * batch * length * length * self.qkv.in_features,
        )


@ARCHITECTURES.register("transformer", config=TransformerConfig)
class Transformer(LanguageModel):
    """Pre-norm transformer with rotary positions, SDPA/flash attention and tied embeddings."""

    def __init__(
        self, cfg: TransformerConfig, vocab_size: int, complement_ids: list[int] | None = None
    ) -> None:
        blocks = [
            Block(Attention(cfg), cfg.d_model, cfg.mlp_ratio, cfg.dropout)
            for _ in range(cfg.n_layers)
        ]
        super().__init__(cfg, vocab_size, blocks)
        self.causal = cfg.causal
