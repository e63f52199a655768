"""Transformer: pre-norm blocks, rotary positions, PyTorch's scaled-dot-product attention.

tokens [B, L] -> embedding [B, L, D] -> n_layers x (x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)))
-> RMSNorm -> hidden [B, L, D] -> tied LM head -> logits [B, L, V].

Attention uses ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
kernel (flash or memory-efficient) on GPU and a fused CPU kernel otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nucleo.registry import ARCHITECTURES
from nucleo.schema import check
from nucleo.types import ModelOutput


@dataclass
class TransformerConfig:
    """Size and shape of a transformer.

    d_model: width D. n_layers: blocks. n_heads: attention heads (D must divide evenly).
    mlp_ratio: MLP hidden width as a multiple of D. dropout: on attention output and MLP.
    rope_base: rotary frequency base. causal: next-token (true) or bidirectional attention.
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    rope_base: float = 10000.0
    causal: bool = True

    def __post_init__(self) -> None:
        check(self.d_model > 0 and self.n_layers > 0, "d_model", "d_model, n_layers must be > 0")
        check(self.n_heads > 0, "n_heads", "must be > 0")
        check(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}",
        )
        check((self.d_model // self.n_heads) % 2 == 0, "n_heads", "head size must be even (rotary)")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


def rotary_tables(length: int, head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """[L, head_dim / 2] complex rotations exp(i * t * base^(-2k/head_dim))."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x [B, H, L, Dh] by rotation [L, Dh/2] (complex)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, rotation), apply_rotary(k, rotation)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, cfg.d_model, bias=False),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rotation))
        return x + self.drop(self.mlp(self.norm2(x)))


@ARCHITECTURES.register("transformer", config=TransformerConfig)
class Transformer(nn.Module):
    """Pre-norm transformer with rotary positions, SDPA attention and tied embeddings."""

    rc_equivariant = False

    def __init__(self, cfg: TransformerConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = cfg.causal
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.apply(self._init)
        for block in self.blocks:  # GPT-2 scaling of residual projections
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        """tokens: [B, L] int64 -> hidden [B, L, D], logits [B, L, V]."""
        head_dim = self.cfg.d_model // self.cfg.n_heads
        rotation = rotary_tables(tokens.shape[1], head_dim, self.cfg.rope_base, tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, rotation)
        hidden = self.norm(x)
        return ModelOutput(hidden=hidden, logits=self.head(hidden))
