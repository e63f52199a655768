"""Incremental decoding: run a prompt once, then one token per step from each mixer's state.

    logits, cache = model.prefill(tokens)          # tokens [B, L] -> logits [B, V] (last position)
    logits, cache = model.step(next_token, cache)  # next_token [B] -> logits [B, V]

A causal mixer takes part by having two methods:

    prefill(x [B, L, D], window) -> (y [B, L, D], state)   its forward on the prompt, and the
                                                            state it leaves
    step(x [B, D], state) -> y [B, D]                       one new position; state updated
                                                            in place

What each family keeps (``window``: the tokens a step may look back on, as ``sample``'s
``model(tokens[:, -window:])`` does):

- transformer attention: rotated keys and values of the last ``window`` positions (``KVCache``,
  a ring buffer), O(window) per token;
- mamba: the last d_conv - 1 conv inputs and the SSM state h [B, E, N]: O(1) per token;
- hyena: the short conv's last inputs and, per long convolution, the history of its input (the
  last ``window`` values, ``History``): one dot product over the history per channel, exact;
- multires: per tree level a ring buffer of its input, as far back as its dilated taps reach:
  O(depth x K) per token;
- hybrid: its mixers' states.

Within the window the logits are the full forward's (tests hold every family to 1e-4). Past
it, recomputing over the last ``window`` tokens restarts every layer at the window's start,
while a cache carries what it holds: attention keeps the last ``window`` keys, each computed
when its token came (from its own window, so deeper layers reach further back, as in
sliding-window attention), hyena the last ``window`` inputs of each long convolution, mamba
and multires their whole state. For a one-layer transformer the two are equal (rotary
attention depends only on relative positions).

Generation runs in eval mode (dropout off) and without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Cache:
    """A model's decoding state: one state per block, the tokens seen, the look-back window."""

    states: list[Any]
    position: int
    window: int


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot decode incrementally (None: it can)."""
    if not getattr(model, "causal", False):
        return f"{type(model).__name__} is bidirectional: it cannot generate left to right"
    for i, block in enumerate(getattr(model, "blocks", None) or []):
        mixer = getattr(block, "mixer", None)
        if mixer is None or not all(hasattr(block, a) for a in ("norm1", "drop", "mlp")):
            return f"block {i} ({type(block).__name__}) is not a residual Block"
        if not (hasattr(mixer, "prefill") and hasattr(mixer, "step")):
            return f"{type(mixer).__name__} has no prefill/step (no incremental state)"
    if not getattr(model, "blocks", None):
        return f"{type(model).__name__} has no blocks"
    return None


def _check(model: nn.Module) -> None:
    why = unsupported(model)
    if why is not None:
        raise ValueError(f"no incremental decoding: {why}")


def _autocast(model: nn.Module, device: torch.device):
    mode = getattr(model.cfg, "autocast", "fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The position-wise half of a Block (norm, MLP, residual), if it has one."""
    if block.mlp is None:
        return x
    return x + block.drop(block.mlp(block.norm2(x)))


@torch.no_grad()
def prefill(
    model: nn.Module, tokens: torch.Tensor, window: int | None = None
) -> tuple[torch.Tensor, Cache]:
    """tokens [B, L] int64 -> (logits of the last position [B, V] float32, cache).

    ``window``: how many positions later steps may look back on (None: no limit).
    """
    _check(model)
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"prefill takes tokens [B, L] with L >= 1, got {tuple(tokens.shape)}")
    limit = window or 2**62
    states = []
    with _autocast(model, tokens.device):
        x = model.embed(tokens)
        for block in model.blocks:
            y, state = block.mixer.prefill(block.norm1(x), limit)
            x = _mlp(block, x + block.drop(y))
            states.append(state)
        logits = model.head(model.norm(x[:, -1]))
    return logits.float(), Cache(states, tokens.shape[1], limit)


@torch.no_grad()
def step(model: nn.Module, token: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
    """token [B] int64 (the next token of each sequence) -> (its logits [B, V] float32, the
    cache, updated in place)."""
    with _autocast(model, token.device):
        x = model.embed(token.reshape(-1))
        for block, state in zip(model.blocks, cache.states, strict=True):
            x = _mlp(block, x + block.drop(block.mixer.step(block.norm1(x), state)))
        logits = model.head(model.norm(x))
    cache.position += 1
    return logits.float(), cache


# ----------------------------------------------------------------------------- buffers


class KVCache:
    """Keys and values of the last ``window`` positions for one attention layer: k, v
    [B, H, slots, Dh] (a ring buffer once full: softmax attention does not care about the
    order of its keys). ``position``: the tokens seen (the next one's rotary position)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, window: int) -> None:
        """k, v [B, H, L, Dh]: the prompt's (rotated) keys and values."""
        batch, heads, length, dim = k.shape
        keep = min(length, window)
        slots = min(window, max(2 * keep, 64))
        self.k = k.new_zeros(batch, heads, slots, dim)
        self.v = v.new_zeros(batch, heads, slots, dim)
        self.k[:, :, :keep] = k[:, :, length - keep :]
        self.v[:, :, :keep] = v[:, :, length - keep :]
        self.filled, self.next, self.window, self.position = keep, keep % window, window, length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one position's k, v [B, H, Dh]; the keys and values to attend to [B, H, n, Dh]."""
        if self.filled == self.k.shape[2] < self.window:  # grow, up to the window
            grown = min(self.window, 2 * self.filled)
            pad = (0, 0, 0, grown - self.filled)
            self.k = torch.nn.functional.pad(self.k, pad)
            self.v = torch.nn.functional.pad(self.v, pad)
        self.k[:, :, self.next] = k
        self.v[:, :, self.next] = v
        self.next = (self.next + 1) % self.window
        self.filled = min(self.filled + 1, self.window)
        self.position += 1
        return self.k[:, :, : self.filled], self.v[:, :, : self.filled]


class History:
    """The last ``limit`` values of a signal of C channels, oldest first, as one view
    [B, C, n]: a buffer of up to 2 x limit slots, shifted back once full (amortised O(1))."""

    def __init__(self, x: torch.Tensor, limit: int) -> None:
        """x [B, C, L]: the values so far."""
        keep = min(x.shape[-1], limit)
        slots = min(2 * limit, max(2 * keep, 64))
        self.buffer = x.new_zeros(*x.shape[:-1], slots)
        self.buffer[..., :keep] = x[..., x.shape[-1] - keep :]
        self.start, self.stop, self.limit = 0, keep, limit

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Add x [B, C]; the last min(seen, limit) values [B, C, n], oldest first."""
        if self.stop == self.buffer.shape[-1]:
            kept = self.stop - self.start
            if self.buffer.shape[-1] < 2 * self.limit:  # grow, up to 2 x limit
                grown = min(2 * self.limit, 2 * self.buffer.shape[-1])
                buffer = self.buffer.new_zeros(*self.buffer.shape[:-1], grown)
            else:
                buffer = self.buffer
            buffer[..., :kept] = self.buffer[..., self.start : self.stop].clone()
            self.buffer, self.start, self.stop = buffer, 0, kept
        self.buffer[..., self.stop] = x
        self.stop += 1
        self.start = max(self.start, self.stop - self.limit)
        return self.buffer[..., self.start : self.stop]
