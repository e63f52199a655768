"""The progress line: step, loss, learning rate, tokens/s and ETA, printed by rank 0."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``125`` -> ``2m05s``, ``7.5`` -> ``7.5s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def rate(value: float) -> str:
    """``14123`` -> ``14.1k``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """Tracks throughput between updates and prints one line per update.

    tokens_per_step: tokens of one optimizer step over all ranks. Throughput is measured
    between consecutive updates, without the time between ``pause`` and ``resume``
    (validation, checkpoints); the ETA extrapolates the mean step time so far. stream: where
    lines go (None: nowhere, as on ranks other than 0).
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        stream: TextIO | None = sys.stdout,
        start_tokens: int | None = None,
    ) -> None:
        self.total = total_steps
        self.tokens_per_step = tokens_per_step
        self.stream = stream
        self.started = time.perf_counter()
        self._mark = self.started  # start of the current stretch of training
        self._mark_step = start_step
        self._pending = 0.0  # training seconds since the last update, before the mark
        self.train_seconds = 0.0  # all measured training time
        self.train_steps = 0
        self.train_tokens = 0  # tokens of the measured steps
        self.tokens_per_second = 0.0
        self._mark_tokens = start_tokens  # tokens trained at the mark (when counted)

    def pause(self) -> None:
        """Call before non-training work (validation, checkpoints): it is not throughput."""
        now = time.perf_counter()
        self._pending += now - self._mark
        self._mark = now

    def resume(self) -> None:
        self._mark = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens: int | None = None) -> str:
        """Print and return the progress line for optimizer step ``step``. ``tokens``: tokens
        trained so far, when steps differ in size (sequence-length warm-up); else
        tokens_per_step per step."""
        now = time.perf_counter()
        seconds = self._pending + (now - self._mark)
        steps = step - self._mark_step
        if tokens is None or self._mark_tokens is None:
            new_tokens = steps * self.tokens_per_step
        else:
            new_tokens = tokens - self._mark_tokens
        self._pending, self._mark, self._mark_step = 0.0, now, step
        self._mark_tokens = tokens
        if steps > 0 and seconds > 0:
            self.tokens_per_second = new_tokens / seconds
            self.train_seconds += seconds
            self.train_steps += steps
            self.train_tokens += new_tokens
        per_step = self.train_seconds / self.train_steps if self.train_steps else 0.0
        eta = (self.total - step) * per_step
        line = (
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%) | loss {loss:.4f} | "
            f"lr {lr:.2e} | {rate(self.tokens_per_second)} tok/s | "
            f"elapsed {duration(now - self.started)} | eta {duration(eta)}"
        )
        if self.stream is not None:
            print(line, file=self.stream, flush=True)
        return line
