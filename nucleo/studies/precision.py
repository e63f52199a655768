"""The precision x ZeRO check: does every family train, resume, export and fine-tune in every
precision, under every ZeRO stage, on this machine?

For each combination ``arch:stage:precision`` (precision: fp32; bf16 = DeepSpeed bf16 weights
with fp32 masters; autocast = fp32 weights under ``model.autocast=bf16``) it builds the family's
tiny model, wraps it in a real DeepSpeed engine on the run's device and checks, on windows of
real yeast DNA (the bundled sample):

- training: 6 steps, finite losses and gradient norms, the loss falls;
- the weights the engine holds have the precision's dtype;
- validation: an eval-mode pass of the objective is finite;
- resume: a checkpoint after step 3, reloaded into a fresh engine and trained to step 6 on the
  same batches, ends with the same weights as the run that never stopped (exactly on CPU);
- export: the fp32 weights from the masters (``full_state_dict``) equal those ``nucleo export``
  reads from the checkpoint files offline, and the exported fp32 model gives the engine's
  outputs within bf16 rounding;
- fine-tuning: the exported backbone with a two-class head (GC-rich vs AT-rich windows) trained
  for an epoch through the same engine settings (nucleo.downstream.finetune.train_full): finite
  losses, the head in the precision's dtype, finite fp32 weights gathered, probabilities that
  sum to one.

    python launch/precision_check.py                          # all 72, one process
    python launch/precision_check.py --families hyena mamba --precisions bf16
    deepspeed --num_gpus 2 launch/precision_check.py --stages 1 3

Rank 0 prints a line per combination (``--json``: ``RESULT {...}`` lines) and exits 1 if any
failed. tests/studies/test_precision.py runs it in one and two processes; launch/gpu_check.sh on
GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer
from nucleo.core.types import Batch
from nucleo.downstream.classifier import SequenceClassifier, hidden_size, predict_proba
from nucleo.downstream.finetune import FinetuneConfig, train_full
from nucleo.train.checkpoint import load_checkpoint, save_checkpoint, tag_for
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.engine import DistInfo, build_engine, setup_distributed
from nucleo.train.export import full_state_dict, state_from_checkpoint
from nucleo.train.objective import Objective

TINY: dict[str, list[str]] = {
    "transformer": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"],
    "hyena": ["model.d_model=32", "model.n_layers=2", "model.max_len=64"],
    "mamba": ["model.d_model=32", "model.n_layers=2"],
    "caduceus": ["model.d_model=32", "model.n_layers=2"],
    "multires": ["model.d_model=32", "model.n_layers=2", "model.max_len=64"],
    "hybrid": [
        "model.d_model=32", "model.n_layers=4", "model.pattern=[hyena,mamba,attention,multires]",
        "model.hyena.max_len=64", "model.multires.max_len=64", "model.attention.n_heads=2",
    ],
}  # fmt: skip
STEPS, CUT, BATCH, LENGTH = 6, 3, 4, 64
YEAST = Path(__file__).resolve().parents[2] / "data_pipeline/sample/fungi/ScerR64_I.fna.gz"
PRECISIONS = ("fp32", "bf16", "autocast")


def combos(
    families: list[str] | None = None,
    stages: list[int] | None = None,
    precisions: list[str] | None = None,
) -> list[str]:
    """``arch:stage:precision`` for every family, stage and precision asked for (all: 72)."""
    return [
        f"{a}:{s}:{p}"
        for a in families or sorted(TINY)
        for s in (range(4) if stages is None else stages)
        for p in precisions or PRECISIONS
    ]


def settings(arch: str, stage: int, precision: str, compiled: bool = False) -> list[str]:
    """Overrides for one combination (ZeRO-3 partitions even these tiny parameters);
    ``compiled``: with train.compile (a combination written ``arch:stage:precision:compile``)."""
    engine_precision = "bf16" if precision == "bf16" else "fp32"
    return [
        *(["train.compile=true"] if compiled else []),
        *TINY[arch],
        f"engine.zero_stage={stage}",
        f"engine.precision={engine_precision}",
        f"model.autocast={'bf16' if precision == 'autocast' else 'fp32'}",
        f"train.micro_batch_size={BATCH}",
        "train.warmup_steps=0",
        "train.lr=3e-3",
        f"train.max_steps={STEPS}",
        "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ]


class Windows:
    """Batch ``step`` of rank ``rank``: BATCH windows of yeast chromosome I, the same on every
    call (so a resumed run sees what the uninterrupted one saw)."""

    def __init__(self, rank: int, device: torch.device) -> None:
        (record,) = read_sequences(YEAST)
        self.tokens = torch.from_numpy(CharTokenizer().encode(bytes(record.seq)))
        self.rank, self.device = rank, device

    def __call__(self, step: int) -> Batch:
        gen = torch.Generator().manual_seed(1000 * step + self.rank)
        starts = torch.randint(0, len(self.tokens) - LENGTH, (BATCH,), generator=gen).tolist()
        tokens = torch.stack([self.tokens[s : s + LENGTH] for s in starts])
        batch = Batch(tokens=tokens, kingdom=torch.zeros(BATCH, dtype=torch.long), kingdoms=("x",))
        return batch.to(self.device)


def train(engine, objective, model, windows, dist, start: int, stop: int) -> list[dict]:
    """Steps start..stop-1; per step the loss and the global gradient norm."""
    engine.train()
    out = []
    for step in range(start, stop):
        torch.manual_seed(step * 31 + dist.rank)  # MLM masks: a function of the step
        result = objective(engine, windows(step), model, step=step)
        engine.backward(result.loss)
        norms = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
        engine.step()
        norm = engine.get_global_grad_norm()
        if norm is None and norms:  # fp32 without ZeRO: DeepSpeed does not record it
            norm = float(torch.linalg.vector_norm(torch.stack(norms)))
        out.append({"loss": float(result.loss.detach()), "grad_norm": float(norm or math.nan)})
    return out


def optimizer_steps(engine) -> list[int]:
    """The distinct step counts in the optimizer's state (one value, the steps taken)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({int(s["step"]) for s in inner.state.values() if "step" in s})


def run_combo(combo: str, root: Path, dist_holder: list) -> dict:
    arch, stage, precision, *compiled = combo.split(":")
    cfg = load_config(arch=arch, overrides=settings(arch, int(stage), precision, bool(compiled)))
    dist = setup_distributed(cfg.engine)
    dist_holder[:] = [dist]
    tokenizer = CharTokenizer()
    windows = Windows(dist.rank, dist.device)
    ckpt = root / combo.replace(":", "-")

    def fresh():
        torch.manual_seed(0)
        model = build_model(arch, cfg.model, tokenizer)
        objective = Objective.build(cfg.losses, cfg.loss, model, tokenizer)
        return model, objective, build_engine(model, cfg.train, cfg.engine, dist)

    model, objective, engine = fresh()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    dtypes = {str(p.dtype) for p in model.parameters() if p.is_floating_point()}
    history = train(engine, objective, model, windows, dist, 0, CUT)
    save_checkpoint(engine, ckpt, CUT, {"step": CUT}, "", keep=1, is_main=dist.is_main)
    at_cut = full_state_dict(engine, cfg)  # collective under ZeRO
    history += train(engine, objective, model, windows, dist, CUT, STEPS)
    final = full_state_dict(engine, cfg)
    adam_steps = optimizer_steps(engine)

    engine.eval()
    with torch.no_grad():
        probe = windows(99)
        outputs = engine(probe.tokens)
        eval_loss = float(objective(engine, probe, model).loss)
    tuned = finetune_check(arch, cfg, final, tokenizer, windows, dist, int(stage), precision)

    # resume from the step-3 checkpoint in a fresh engine
    model2, objective2, engine2 = fresh()
    client = load_checkpoint(engine2, ckpt, tag_for(CUT))
    resumed_history = train(engine2, objective2, model2, windows, dist, CUT, STEPS)
    resumed = full_state_dict(engine2, cfg)
    exact = dist.device.type == "cpu"  # GPU kernels may sum in another order
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-3, "atol": 1e-4}
    resume_diff = max(float((final[k] - resumed[k]).abs().max()) for k in final)
    resume_ok = all(torch.allclose(final[k], resumed[k], **tol) for k in final)

    result: dict = {"combo": combo, "device": dist.device.type, "world_size": dist.world_size}
    if dist.is_main:
        offline = state_from_checkpoint(ckpt, tag_for(CUT), cfg)  # what `nucleo export` reads
        model_fp32 = build_model(arch, cfg.model, tokenizer).to(dist.device)
        model_fp32.load_state_dict(final)
        model_fp32.eval()
        with torch.no_grad():
            exported = model_fp32(probe.tokens)
        gap = float((exported.logits - outputs.logits.float()).abs().max())
        scale = float(outputs.logits.float().abs().max())
        losses = [h["loss"] for h in history]
        result.update(
            losses=losses,
            grad_norms=[h["grad_norm"] for h in history],
            resumed_losses=[h["loss"] for h in resumed_history],
            client_step=client.get("step"),
            weight_dtypes=sorted(dtypes),
            weights_ok=dtypes == {str(want)},
            eval_loss=eval_loss,
            export_dtypes=sorted({str(v.dtype) for v in final.values()}),
            offline_equals_masters=sorted(offline) == sorted(at_cut)
            and all(torch.equal(offline[k], at_cut[k]) for k in at_cut),
            resume_max_diff=resume_diff,
            resume_ok=resume_ok,
            optimizer_steps=adam_steps,
            resumed_optimizer_steps=optimizer_steps(engine2),
            export_logit_gap=gap,
            export_logit_scale=scale,
            **tuned,
        )
    if dist.is_main:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def finetune_check(
    arch: str, cfg: Any, weights: dict[str, torch.Tensor], tokenizer: Any, windows: Windows,
    dist: DistInfo, stage: int, precision: str,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune the trained backbone (its fp32 weights) with a two-class head, GC-rich vs
    AT-rich windows, for one epoch of 4 steps through the same engine settings."""
    torch.manual_seed(0)
    backbone = build_model(arch, cfg.model, tokenizer).to(dist.device)
    backbone.load_state_dict(weights)
    width = hidden_size(backbone, tokenizer, dist.device)
    classifier = SequenceClassifier(backbone, width, 2).to(dist.device)
    tokens = torch.cat([windows(200 + i).tokens.cpu() for i in range(8)])  # [32, LENGTH]
    gc = ((tokens == 1) | (tokens == 2)).float().mean(1)
    labels = (gc > gc.median()).long().numpy()
    ids = [row.numpy() for row in tokens]
    ft = FinetuneConfig(
        task="check", export="", epochs=1, batch_size=8, balance="none", device=cfg.engine.device,
        precision="bf16" if precision == "bf16" else "fp32", zero_stage=stage,
    )  # fmt: skip
    engine, settings, losses = train_full(classifier, ids, labels, ft, 0, tokenizer.pad_id, dist)
    head_dtype = str(classifier.head.weight.dtype)
    gathered = full_state_dict(engine, settings)  # collective under ZeRO
    probs = predict_proba(classifier, ids, 16, tokenizer.pad_id, dist.device, None, engine)
    return {
        "finetune_losses": losses,
        "finetune_head_dtype": head_dtype,
        "finetune_weights_finite": all(bool(torch.isfinite(v).all()) for v in gathered.values()),
        "finetune_probs_ok": bool(np.isfinite(probs).all() and np.allclose(probs.sum(1), 1)),
    }


def problems(result: dict) -> list[str]:
    """What is wrong with one combination's result (empty: it passed)."""
    if "error" in result:
        return [f"{result['error']} | {result.get('trace', '')}"]
    out = []
    losses, norms = result["losses"], result["grad_norms"]
    if not all(math.isfinite(x) for x in [*losses, *norms, result["eval_loss"]]):
        out.append(f"non-finite losses or gradient norms: {losses} {norms}")
    elif not losses[-1] < losses[0] - 0.15:  # ln 4 = 1.39 is the floor; they start near 2.1
        out.append(f"the loss did not fall: {losses}")
    if not result["weights_ok"]:
        out.append(f"engine weights are {result['weight_dtypes']}")
    if result["export_dtypes"] != ["torch.float32"]:
        out.append(f"export is {result['export_dtypes']}, not float32")
    if not result["offline_equals_masters"]:
        out.append("nucleo export's weights differ from the fp32 masters")
    for key in ("optimizer_steps", "resumed_optimizer_steps"):
        if result[key] != [STEPS]:  # Adam's bias corrections count on it
            out.append(f"the optimizer counts {result[key]} steps, not {STEPS} ({key})")
    if not result["resume_ok"]:
        out.append(f"resume diverged by {result['resume_max_diff']:.3g}")
    resumed, tail = result["resumed_losses"], losses[CUT:]
    if any(abs(a - b) > 1e-3 * abs(b) for a, b in zip(resumed, tail, strict=True)):
        out.append(f"resumed losses {resumed} differ from {tail}")
    gap, scale = result["export_logit_gap"], result["export_logit_scale"]
    if gap > 0.03 * scale + 0.02:
        out.append(f"the fp32 export's logits differ from the engine's by {gap:.3g}")
    if not all(math.isfinite(x) for x in result["finetune_losses"]):
        out.append(f"fine-tuning losses are not finite: {result['finetune_losses']}")
    want = "torch.bfloat16" if result["combo"].split(":")[2] == "bf16" else "torch.float32"
    if result["finetune_head_dtype"] != want:
        out.append(f"the fine-tuned head is {result['finetune_head_dtype']}, not {want}")
    if not (result["finetune_weights_finite"] and result["finetune_probs_ok"]):
        out.append("the fine-tuned classifier's weights or probabilities are not finite")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/precision_check.py",
        description="Train, resume and export every family in every precision and ZeRO stage.",
    )
    p.add_argument("combos", nargs="*", help="arch:stage:precision[:compile] (with "
                   "train.compile; default: the selection)")  # fmt: skip
    p.add_argument("--families", nargs="+", choices=sorted(TINY), help="default: all")
    p.add_argument("--stages", nargs="+", type=int, choices=range(4), help="default: 0 1 2 3")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: all three")
    p.add_argument("--out", help="scratch folder for checkpoints, shared by the ranks "
                   "(default: a temporary one)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print RESULT {json} lines")
    p.add_argument("--report", help="also write a markdown table (command, machine, date)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def default_scratch() -> str:
    """A scratch folder that every rank of one launch names alike (checkpoints are shared:
    several nodes need ``--out`` on a shared file system)."""
    if "MASTER_PORT" in os.environ:
        tag = f"{os.getuid()}-{os.environ.get('MASTER_ADDR', '')}-{os.environ['MASTER_PORT']}"
        return os.path.join(tempfile.gettempdir(), f"nucleo-precision-{tag}")
    return tempfile.mkdtemp(prefix="nucleo-precision-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for combo in args.combos:
        parts = combo.split(":")
        arch, stage, precision = [*parts, "", ""][:3]
        rest = parts[3:]
        valid = arch in TINY and stage in ("0", "1", "2", "3") and precision in PRECISIONS
        if not valid or rest not in ([], ["compile"]):
            raise SystemExit(
                f"launch/precision_check.py: {combo!r} is not arch:stage:precision[:compile] "
                f"(arch: {', '.join(sorted(TINY))}; stage 0-3; precision: {', '.join(PRECISIONS)})"
            )
    todo = args.combos or combos(args.families, args.stages, args.precisions)
    root = Path(args.out or default_scratch())
    root.mkdir(parents=True, exist_ok=True)
    holder: list = []
    failed = 0
    results = []
    for i, combo in enumerate(todo, 1):
        started = time.perf_counter()
        try:
            result = run_combo(combo, root, holder)
        except Exception as err:  # reported, and (in one process) the next combination runs
            trace = traceback.format_exc(limit=-3).replace("\n", " | ")
            result = {"combo": combo, "error": f"{type(err).__name__}: {err}", "trace": trace}
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:
                # the other ranks may be waiting in a collective for this one: going on to the
                # next combination would leave them waiting forever; end, and the launcher
                # ends them
                print(f"rank {os.environ.get('RANK')}: {combo}: {result['error']} | {trace}",
                      flush=True)  # fmt: skip
                os._exit(1)
        result["seconds"] = round(time.perf_counter() - started, 2)
        rank = holder[0].rank if holder else int(os.environ.get("RANK", 0))
        if rank != 0:
            continue
        wrong = problems(result) if "losses" in result or "error" in result else []
        failed += bool(wrong)
        results.append((result, wrong))
        if args.json:
            print("RESULT " + json.dumps(result), flush=True)
        else:
            head = f"[{i}/{len(todo)}] {combo:<22}"
            if wrong:
                print(f"{head} FAILED: {'; '.join(wrong)}", flush=True)
            else:
                losses = result["losses"]
                print(
                    f"{head} ok  loss {losses[0]:.3f} -> {losses[-1]:.3f}, resume exact "
                    f"{result['resume_max_diff'] == 0}, {result['seconds']:.1f}s",
                    flush=True,
                )
    main_rank = (holder[0].rank if holder else 0) == 0
    if not args.out and main_rank:  # rank 0 is the last to read the checkpoints
        shutil.rmtree(root, ignore_errors=True)
    if main_rank and not args.json:
        print(f"{len(todo) - failed} of {len(todo)} combinations passed", flush=True)
    if main_rank and args.report:
        world = holder[0].world_size if holder else 1
        Path(args.report).write_text(report(results, world, argv))
        print(f"wrote {args.report}", flush=True)
    return 1 if failed else 0


def report(results: list[tuple[dict, list[str]]], world_size: int, argv: list[str] | None) -> str:
    """Markdown: the command, machine, date and a row per combination."""
    import platform
    import sys

    import deepspeed

    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local")]
    launcher = f"deepspeed --num_gpus {world_size} " if world_size > 1 else "python "
    command = launcher + " ".join(["launch/precision_check.py", *args])
    device = results[0][0].get("device", "?") if results else "?"
    lines = [
        "# Precision x ZeRO check", "",
        f"- command: `{command}` ({world_size} process(es), on {device})",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores; torch {torch.__version__}, "
        f"DeepSpeed {deepspeed.__version__}, Python {platform.python_version()}",
        f"- passed: {sum(not w for _, w in results)} of {len(results)}", "",
        "Each row: a tiny model of the family, 6 AdamW steps on yeast DNA in a real DeepSpeed "
        "engine, a checkpoint after step 3 resumed in a fresh engine, the fp32 export, and a "
        "fine-tuning epoch of the export with a classifier head in the same engine settings. "
        "Loss: the first and last step's. Resume: the largest weight difference between the "
        "resumed and the uninterrupted run. Export gap: the largest logit difference between "
        "the fp32 export and the engine.", "",
        "| family | ZeRO | precision | result | loss | resume diff | export gap | fine-tune loss "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for result, wrong in results:
        arch, stage, precision, *compiled = result["combo"].split(":")
        precision += " compiled" if compiled else ""
        if "losses" in result:
            losses = result["losses"]
            tuned = result["finetune_losses"]
            cells = [f"{losses[0]:.3f} -> {losses[-1]:.3f}", f"{result['resume_max_diff']:.3g}",
                     f"{result['export_logit_gap']:.3g}", f"{tuned[0]:.3f}"]  # fmt: skip
        else:
            cells = ["", "", "", ""]
        verdict = "ok" if not wrong else "FAILED: " + "; ".join(wrong).replace("|", "/")[:200]
        lines.append(
            f"| {arch} | {stage} | {precision} | {verdict} | " + " | ".join(cells)
            + f" | {result['seconds']:.1f} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"
