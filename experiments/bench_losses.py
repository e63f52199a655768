"""Benchmark the losses: training step time of loss combinations, as ratios to ``ce`` alone.

    .venv/bin/python experiments/bench_losses.py                    # ~10 minutes, 1 core
    .venv/bin/python experiments/bench_losses.py --arch transformer --rounds 3

One process, one thread, the same model and the same batches of real DNA (yeast chromosome I)
for every combination: a step is the objective's forward passes, the losses, backward and an
AdamW step, timed in CPU seconds. The combinations are interleaved round by round (this shared
machine is noisy) and each one's step time is the median over rounds of the mean over
``--steps`` steps (a multiple of ph's cadence, so ph's share is its default amortised cost).
Also measured: ``ce`` at twice the batch, the cost of one more forward-backward, which is what
``rc``'s second strand is allowed to cost.

Writes experiments/results/losses.md (and .json) with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from data_pipeline.readers import read_sequences  # noqa: E402
from data_pipeline.tokenizers import CharTokenizer  # noqa: E402
from experiments.report import RESULTS, header, run_record, write  # noqa: E402
from nucleo.core.runtime import configure_allocator  # noqa: E402
from nucleo.core.types import Batch  # noqa: E402
from nucleo.train.components import build_model  # noqa: E402
from nucleo.train.config import load_config  # noqa: E402
from nucleo.train.objective import Objective  # noqa: E402

COMBINATIONS = ["ce", "ce,rc", "ce,rc,cgr", "ce,cgr", "ce,walk", "ce,ph", "ce,headless"]
#: (combination, target ratio to ce, what the target is)
TARGETS = {
    "ce,cgr": (1.10, "<= 1.10x"),
    "ce,walk": (1.10, "<= 1.10x"),
    "ce,ph": (1.15, "<= 1.15x (default cadence)"),
}


def windows(length: int, count: int, seed: int) -> torch.Tensor:
    (record,) = read_sequences(ROOT / "data_pipeline/sample/fungi/ScerR64_I.fna.gz")
    tokens = torch.from_numpy(CharTokenizer().encode(bytes(record.seq)))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length, (count,), generator=gen)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


class Setup:
    """A model, its optimizer and objective for one combination (same init for all)."""

    def __init__(self, args: argparse.Namespace, losses: str, batch: int) -> None:
        cfg = load_config(arch=args.arch, losses=losses, overrides=args.set)
        torch.manual_seed(0)
        self.tokenizer = CharTokenizer()
        self.model = build_model(args.arch, cfg.model, self.tokenizer).train()
        self.objective = Objective.build(cfg.losses, cfg.loss, self.model, self.tokenizer)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.data = windows(args.length, batch * args.steps, seed=1).view(
            args.steps, batch, args.length
        )
        self.step = 0

    def run(self, steps: int) -> float:
        """Mean CPU seconds per step over ``steps`` steps."""
        started = time.process_time()
        for i in range(steps):
            tokens = self.data[i % len(self.data)]
            batch = Batch(tokens, torch.zeros(len(tokens), dtype=torch.long), ("fungi",))
            result = self.objective(self.model, batch, self.model, step=self.step)
            self.opt.zero_grad(set_to_none=True)
            result.loss.backward()
            self.opt.step()
            self.step += 1
        return (time.process_time() - started) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--arch", default="hyena")
    ap.add_argument("--set", action="append", default=None, help="config overrides")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="steps per round (ph's cadence)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--combinations", default=";".join(COMBINATIONS), help="';'-separated")
    ap.add_argument("--out", type=Path, default=RESULTS / "losses.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args()
    if args.report_only:
        record = json.loads(args.out.with_suffix(".json").read_text())
        write(args.out, report(record, record["median"]["ce"]))
        return
    if args.set is None:
        args.set = ["model.size=tiny"] + (
            [f"model.max_len={args.length}"] if args.arch == "hyena" else []
        )
    torch.set_num_threads(1)
    configure_allocator("cached")  # as the trainer runs on CPU
    combos = [c for c in args.combinations.split(";") if c]
    setups = {c: Setup(args, c, args.batch) for c in combos}
    setups["ce @ 2x batch"] = Setup(args, "ce", 2 * args.batch)
    for setup in setups.values():  # warm-up: allocator, first-call costs
        setup.run(2)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, setup in setups.items():
            times[name].append(setup.run(args.steps))
            print(f"round {r + 1}/{args.rounds} {name:>14}: {times[name][-1]:.3f} CPU-s/step")
    median = {name: statistics.median(v) for name, v in times.items()}
    base = median["ce"]
    record = {
        **run_record(),
        "settings": {
            "arch": args.arch,
            "set": args.set,
            "length": args.length,
            "batch": args.batch,
            "steps_per_round": args.steps,
            "rounds": args.rounds,
        },
        "seconds_per_step": times,
        "median": median,
    }
    write(args.out, report(record, base), record)


def report(record: dict, base: float) -> list[str]:
    s, median = record["settings"], record["median"]
    double = median["ce @ 2x batch"] / base
    lines = [
        "# Loss benchmarks",
        "",
        *header(record),
        "- one thread, glibc allocator cache on (as the trainer)",
        f"- model: `{s['arch']}` {' '.join(s['set'])}; batch {s['batch']} x {s['length']} "
        f"tokens of yeast chromosome I; AdamW",
        f"- each number: the median over {s['rounds']} interleaved rounds of the mean CPU "
        f"seconds per step over {s['steps_per_round']} steps (forward passes, losses, "
        "backward, optimizer)",
        "",
        "| losses | CPU-s per step | ratio to ce | target | met? |",
        "|---|---|---|---|---|",
    ]
    for name, value in median.items():
        ratio = value / base
        if name in TARGETS:
            limit, text = TARGETS[name]
            met = "met" if ratio <= limit else "**not met**"
        elif name.startswith("ce,rc"):
            extra = 1.10 if "cgr" in name else 1.0
            limit = double * extra
            text = f"<= {limit:.2f}x (ce @ 2x batch{' x 1.10 for cgr' if extra > 1 else ''})"
            met = "met" if ratio <= limit else "**not met**"
        else:
            text, met = "", ""
        lines.append(f"| `{name}` | {value:.3f} | {ratio:.2f}x | {text} | {met} |")
    lines += [
        "",
        "`rc` runs the model on the reverse complement too: its allowance is the cost of a "
        "second forward-backward, measured as `ce` at twice the batch. `ph` runs every 10 "
        "steps (its default cadence), so its row is its amortised cost; its cost per call is "
        "logged in training as `train/ph/seconds`. Rounds of the same combination vary by "
        "5-15% on this shared machine (every round is in the .json), so ratios within a few "
        "percent of their target are ties, not verdicts.",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
