"""The data pipeline's done-when run on the offline corpus: train, kill, resume, compare.

    python experiments/corpus_resume.py            # needs `nucleo data corpus` and
                                                   # `nucleo data bpe` first (see the README)

Runs ``experiments/configs/corpus_bpe.yaml`` twice with DeepSpeed: once uninterrupted, once
killed with SIGKILL soon after its first checkpoint and then resumed with ``--resume``. A
resumed run that neither repeats nor skips data ends with exactly the uninterrupted run's
weights. Writes experiments/results/corpus_run.md (the command, the machine, the date, the
two runs' throughput and validation, and whether the weights are identical).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.report import header, run_record, write  # noqa: E402
from nucleo.train.checkpoint import complete_tags  # noqa: E402
from nucleo.train.export import load_exported  # noqa: E402

CONFIG = "experiments/configs/corpus_bpe.yaml"


def launch(root: Path, name: str, *args: str, wait: bool = True) -> subprocess.Popen:
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "1", "launch/pretrain.py", "--config", CONFIG, *args]
    cmd += ["--set", f"run.root={root}", "--set", f"run.name={name}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    log = open(root / f"{name}.log", "a")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    if wait and proc.wait() != 0:
        raise SystemExit(f"{name} failed; see {root / f'{name}.log'}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/corpus_resume", help="run root (replaced)")
    parser.add_argument("--out", default="experiments/results/corpus_run.md")
    args = parser.parse_args()
    run = run_record()
    root = ROOT / args.root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    started = time.time()
    launch(root, "full")
    full_seconds = time.time() - started

    proc = launch(root, "killed", wait=False)
    ckpt = root / "killed" / "checkpoints"
    while not complete_tags(ckpt) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(5)  # a few steps past the checkpoint: work that the resume must redo exactly
    if proc.poll() is not None:
        raise SystemExit("the run ended before it could be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = complete_tags(ckpt)[-1]
    progress = [
        line for line in (root / "killed.log").read_text().splitlines() if line.startswith("step ")
    ]
    launch(root, "killed", "--resume", str(root / "killed"))

    full_model = load_exported(root / "full" / "export")[0].state_dict()
    resumed_model = load_exported(root / "killed" / "export")[0].state_dict()
    identical = all((full_model[k] == resumed_model[k]).all() for k in full_model)
    full = json.loads((root / "full" / "summary.json").read_text())
    resumed = json.loads((root / "killed" / "summary.json").read_text())
    val = full["final_validation"]
    kingdoms = {k.split("/")[-1]: v for k, v in val.items() if k.startswith("val/bits_per_base/")}
    lines = [
        "# Done-when run: offline corpus, BPE, temperature mixture, RC, kill and resume",
        "",
        *header(run),
        f"- config: `{CONFIG}`",
        "",
        f"- uninterrupted: {full['step']} steps, {full['tokens']:,} tokens, "
        f"{full['tokens_per_second']:,} tokens/s training, {full_seconds:.0f} s wall "
        f"(launch included); final val bits/base {val.get('val/bits_per_base', float('nan')):.4f}",
        f"- killed with SIGKILL 5 s after its {killed_at} checkpoint (last progress line: "
        f"`{progress[-1] if progress else None}`); resumed from "
        f"{killed_at}: {resumed['step']} steps, final val bits/base "
        f"{resumed['final_validation'].get('val/bits_per_base', float('nan')):.4f}",
        f"- final weights of the resumed run identical to the uninterrupted run's: "
        f"**{'yes' if identical else 'NO'}**",
        "",
        "Final validation bits per base per kingdom (uninterrupted run):",
        "",
        "| " + " | ".join(kingdoms) + " |",
        "|" + "---:|" * len(kingdoms),
        "| " + " | ".join(f"{v:.3f}" for v in kingdoms.values()) + " |",
        "",
    ]
    write(ROOT / args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
