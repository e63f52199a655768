"""Reports of the k-mer Markov floor (the model: ``data_pipeline.markov``): its bits per base
on the validation windows training draws, the markdown table of ``nucleo baseline markov``,
and the floor line other reports print beside a network's figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.markov import MarkovModel, score_windows


def validation_bits(
    model: MarkovModel,
    shard_dir: str | Path,
    seq_len: int = 512,
    per_kingdom: int = 32,
    seed: int = 0,
    kingdoms: list[str] | None = None,
) -> dict[str, Any]:
    """Bits per base of every order on exactly the validation windows training draws
    (``validation_set`` with the char tokenizer, ``eval.windows_per_kingdom`` and
    ``train.seed``), scored like the network's next-token bits: positions 1..L-1 of each
    window, pads excluded, pooled over windows (``all``, and per kingdom; ``repeat`` and
    ``non_repeat`` too when the shards keep the soft mask, a base counting by its mask as in
    ``Validator``). An N target has no Markov probability: it is left out and counted
    (``n_targets``; the network scores it). ``score_windows`` does the scoring, as training's
    ``eval.floor`` does.
    """
    from data_pipeline.loader import DataConfig, validation_set
    from data_pipeline.tokenizers import CharTokenizer

    cfg = DataConfig(shards=str(shard_dir), seq_len=seq_len, kingdoms=kingdoms)
    found = validation_set(cfg, CharTokenizer(), per_kingdom, seed)
    names = found.kingdoms
    scores = score_windows(model, found.tokens, found.kingdom, len(names), found.repeat)
    bits = {str(k): scores.bits_per_base(k, names) for k in range(model.max_order + 1)}
    present = [i for i, _ in enumerate(names) if scores.bases[i] > 0]
    counted = np.bincount(found.kingdom.numpy(), minlength=len(names))
    return {
        "shards": str(shard_dir),
        "seq_len": seq_len,
        "windows_per_kingdom": per_kingdom,
        "seed": seed,
        "kingdoms": [names[i] for i in present],
        "windows": {names[i]: int(counted[i]) for i in present},
        "bases_scored": {names[i]: int(scores.bases[i]) for i in present},
        "n_targets": {names[i]: int(scores.unknown[i]) for i in present},
        "repeat_bases": float(scores.masked_bases[0]) if found.repeat is not None else None,
        "bits_per_base": bits,
    }


def report_lines(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """The markdown of a validation result: orders x kingdoms, and each kingdom's best order."""
    bits = result["bits_per_base"]
    parts = [p for p in ("repeat", "non_repeat") if p in bits["0"]]
    names = ["all", *parts, *result["kingdoms"]]
    lines = [
        f"- fit: {meta['bases_read']:,} training bases of `{meta.get('shards', '?')}` "
        f"({meta.get('training_bases', 0):,} in its train split), orders 0..{meta['max_order']}, "
        f"{meta['smoothing']}" + (f", {meta['fit_seconds']} s" if "fit_seconds" in meta else ""),
        f"- validation: {sum(result['windows'].values())} windows of {result['seq_len']} bases "
        f"(up to {result['windows_per_kingdom']} a kingdom, seed {result['seed']}, the windows "
        f"training validates on); positions 1..L-1 scored, "
        f"{sum(result['bases_scored'].values()):,} bases, "
        f"{sum(result['n_targets'].values())} N targets left out",
        "",
        "Bits per base (`all`: bases pooled over every window, as training's `val/bits_per_base`"
        + ("; `repeat`, `non_repeat`: soft-masked bases and the rest" if parts else "")
        + "):",
        "",
        "| order | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for k in sorted(bits, key=int):
        lines.append(f"| {k} | " + " | ".join(f"{bits[k][n]:.4f}" for n in names) + " |")
    best = {n: min(bits, key=lambda k, n=n: bits[k][n]) for n in names}
    lines += [
        "| best order | " + " | ".join(best[n] for n in names) + " |",
        "",
        "The best order of a column is picked on these windows, so it flatters the floor a "
        "little; one order for every kingdom (the best of `all`) is the fair single floor.",
    ]
    return lines


def best_floor(report: dict[str, Any], kingdom: str = "all") -> tuple[int, float]:
    """(order, bits per base) of the best order of a ``nucleo baseline markov`` .json report,
    overall (``kingdom="all"``) or for one kingdom: the floor printed beside a network's
    figures. Choosing the order on the same windows flatters the floor slightly."""
    by_order = report["validation"]["bits_per_base"]
    found = [(float(v[kingdom]), int(k)) for k, v in by_order.items() if v.get(kingdom) is not None]
    if not found:
        raise ValueError(f"the Markov report has no bits per base for {kingdom!r}")
    bits, order = min(found)
    return order, bits


def floor_line(path: str | Path) -> tuple[str, float]:
    """A report line naming the floor of a Markov .json report, and the floor's bits/base."""
    report = json.loads(Path(path).read_text())
    order, bits = best_floor(report)
    windows = report["validation"]
    line = (
        f"- k-mer Markov floor: {bits:.4f} bits/base (order {order}, fit on the training split, "
        f"scored on the same {windows['seq_len']}-base validation windows, "
        f"{windows['windows_per_kingdom']} per kingdom, seed {windows['seed']}; {path})"
    )
    return line, bits
