"""``fit``: build every component from the run config and train with DeepSpeed.

One loop for one CPU process or many GPUs: each optimizer step runs ``grad_accum``
micro-batches through the objective, DeepSpeed averages gradients across ranks and steps the
optimizer and schedule. Rank 0 prints progress and logs to MLflow; validation runs on all ranks.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from data_pipeline.loader import TrainLoader
from data_pipeline.tokenizers import build_tokenizer
from nucleo.checkpoint import latest_tag, load_checkpoint, save_checkpoint
from nucleo.components import ARCHITECTURES
from nucleo.config import RunConfig, save_config
from nucleo.engine import (
    DistInfo,
    build_engine,
    deepspeed_config,
    grad_norm,
    needs_own_grad_norm,
    setup_distributed,
)
from nucleo.evaluation import Validator
from nucleo.export import export_model, full_state_dict
from nucleo.objective import Objective
from nucleo.progress import Progress, duration
from nucleo.tracking import Tracker, run_tags


@dataclass
class TrainState:
    """What a checkpoint must restore besides model and optimizer."""

    step: int = 0
    tokens: int = 0
    mlflow_run_id: str | None = None
    loader: dict[str, Any] = field(default_factory=dict)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters (tied weights once) and non-embedding parameters."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": total, "non_embedding": total - embedding}


def _agree(value: Any, dist: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank; an Exception from rank 0 is raised everywhere."""
    if dist.world_size > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    if isinstance(value, Exception):
        raise value
    return value


def prepare_run_dir(cfg: RunConfig, dist: DistInfo, resume: str | Path | None) -> Path:
    """The run directory, the same on every rank; refuses to overwrite another run."""
    result: Any = None
    if dist.is_main:
        try:
            if resume:
                run_dir = Path(resume)
                if latest_tag(run_dir / "checkpoints") is None:
                    raise FileNotFoundError(f"{run_dir}: no complete checkpoint to resume from")
            else:
                name = cfg.run.name or "{}-{}-{}".format(
                    cfg.arch, "+".join(cfg.losses), time.strftime("%Y%m%d-%H%M%S")
                )
                run_dir = Path(cfg.run.root) / name
                if (run_dir / "checkpoints").exists():
                    raise FileExistsError(
                        f"{run_dir} already holds a run; resume it with --resume {run_dir}, "
                        "or choose another --set run.name=..."
                    )
            run_dir.mkdir(parents=True, exist_ok=True)
            result = run_dir
        except Exception as err:
            result = err
    return _agree(result, dist)


def _mean_across_ranks(
    sums: dict[str, torch.Tensor], count: int, dist: DistInfo
) -> dict[str, float]:
    keys = sorted(sums)
    packed = torch.stack([sums[k].double() for k in keys]) / max(1, count)
    if dist.world_size > 1:
        torch.distributed.all_reduce(packed)
        packed /= dist.world_size
    return {k: float(v) for k, v in zip(keys, packed.tolist(), strict=False)}


def fit(
    cfg: RunConfig, resume: str | Path | None = None, out: TextIO = sys.stdout
) -> dict[str, Any]:
    """Train ``cfg``; with ``resume`` (a run directory) continue its latest complete checkpoint.

    Returns a summary (final step, tokens, validation metrics, wall time, tokens/s), which is
    also written to ``<run dir>/summary.json``.
    """
    started = time.perf_counter()
    dist = setup_distributed(cfg.engine)
    say = (lambda text: print(text, file=out, flush=True)) if dist.is_main else (lambda text: None)
    run_dir = prepare_run_dir(cfg, dist, resume)
    config_yaml_path = run_dir / "config.yaml"
    if dist.is_main:
        save_config(cfg, config_yaml_path)

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = ARCHITECTURES.build(cfg.arch, cfg.model, vocab_size=tokenizer.vocab_size)
    params = count_parameters(model)
    objective = Objective.build(cfg.losses, cfg.loss, model, tokenizer)
    loader = TrainLoader(
        cfg.data, tokenizer, cfg.train.micro_batch_size, cfg.train.seed, dist.rank, dist.world_size
    )
    validator = Validator(cfg.eval, cfg.data, tokenizer, objective, dist, cfg.train.seed)
    engine = build_engine(model, cfg.train, cfg.engine, dist)

    state = TrainState()
    ckpt_dir = run_dir / "checkpoints"
    if resume:
        tag = latest_tag(ckpt_dir)
        assert tag is not None
        client = load_checkpoint(engine, ckpt_dir, tag)
        state = TrainState(
            step=int(client["step"]),
            tokens=int(client["tokens"]),
            mlflow_run_id=client.get("mlflow_run_id"),
            loader=client.get("loader", {}),
        )
        loader.load_state_dict(state.loader)
        say(f"resumed {run_dir} from {tag} (step {state.step}, {state.tokens:,} tokens)")

    tokens_per_step = (
        cfg.train.micro_batch_size * cfg.train.grad_accum * dist.world_size * cfg.data.seq_len
    )
    tracker = Tracker(cfg.tracking, cfg.run.root, enabled=dist.is_main)
    state.mlflow_run_id = tracker.start(
        run_dir.name, state.mlflow_run_id, run_tags(cfg, dist.world_size)
    )
    state.mlflow_run_id = _agree(state.mlflow_run_id, dist)
    if not resume:
        derived = {
            "derived": {
                "parameters": params["total"],
                "non_embedding_parameters": params["non_embedding"],
                "world_size": dist.world_size,
                "global_batch_windows": tokens_per_step // cfg.data.seq_len,
                "tokens_per_step": tokens_per_step,
                "run_dir": str(run_dir),
            },
            "deepspeed": deepspeed_config(cfg.train, cfg.engine, dist.world_size),
        }
        tracker.log_params({**cfg.to_dict(), **derived})
        tracker.log_artifact(config_yaml_path)
    else:
        tracker.set_tags({"nucleo.resumed_at_step": str(state.step)})

    say(
        f"run {run_dir} | {cfg.arch} {params['total']:,} parameters "
        f"({params['non_embedding']:,} non-embedding) | losses {','.join(cfg.losses)} | "
        f"{dist.world_size} rank(s) on {dist.device.type} | {tokens_per_step:,} tokens/step | "
        f"MLflow {tracker.uri if tracker.active else 'off'}"
    )

    progress = Progress(
        cfg.train.max_steps, state.step, tokens_per_step, out if dist.is_main else None
    )
    val_seconds = 0.0
    warned_slow_eval = False
    last_val: dict[str, float] = {}

    def validate() -> None:
        nonlocal val_seconds, last_val
        progress.pause()
        last_val = validator(engine, model)
        val_seconds += last_val.get("val/seconds", 0.0)
        tracker.log_metrics(last_val, state.step)
        tracker.flush()
        if last_val:
            per_kingdom = " ".join(
                f"{k.rsplit('/', 1)[1]} {v:.3f}"
                for k, v in last_val.items()
                if k.startswith("val/bits_per_base/")
            )
            headline = last_val.get("val/bits_per_base", last_val.get("val/loss", math.nan))
            say(f"val step {state.step} | bits/base {headline:.4f} | {per_kingdom}")
        nonlocal warned_slow_eval
        if not warned_slow_eval and progress.train_seconds > 60:
            share = val_seconds / progress.train_seconds
            if share > 0.1:
                warned_slow_eval = True
                say(
                    f"note: validation has taken {100 * share:.0f}% of the training time; "
                    "lower eval.windows_per_kingdom or raise eval.every"
                )
        progress.resume()

    def checkpoint() -> None:
        progress.pause()
        client = {
            "step": state.step,
            "tokens": state.tokens,
            "mlflow_run_id": state.mlflow_run_id,
            "loader": loader.state_dict(),
            "config": cfg.to_dict(),
        }
        path = save_checkpoint(
            engine,
            ckpt_dir,
            state.step,
            client,
            config_yaml_path.read_text() if dist.is_main else "",
            cfg.checkpoint.keep,
            dist.is_main,
        )
        say(f"checkpoint {path}")
        progress.resume()

    status = "FAILED"
    try:
        if state.step == 0:
            validate()
        batches = iter(loader)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        own_norm = needs_own_grad_norm(cfg.engine)
        while state.step < cfg.train.max_steps:
            logging = (state.step + 1) % cfg.train.log_every == 0 or (
                state.step + 1 == cfg.train.max_steps
            )
            norm: float | None = None
            for micro in range(cfg.train.grad_accum):
                batch = next(batches).to(dist.device)
                torch.manual_seed(
                    (cfg.train.seed * 1_000_003 + state.step) * 4099 + dist.rank * 31 + micro
                )
                result = objective(engine, batch, model)
                engine.backward(result.loss)
                if logging and own_norm and micro == cfg.train.grad_accum - 1:
                    norm = grad_norm(model)
                engine.step()
                for key, value in result.metrics.items():
                    sums[key] = sums.get(key, torch.zeros((), device=dist.device)) + value
                count += 1
            state.step += 1
            state.tokens += tokens_per_step
            if logging:
                means = _mean_across_ranks(sums, count, dist)
                sums, count = {}, 0
                lr = float(engine.get_lr()[0])
                line_loss = means.get("loss", math.nan)
                progress.update(state.step, line_loss, lr)
                metrics = {f"train/{k}": v for k, v in means.items()}
                if norm is None and engine.get_global_grad_norm() is not None:
                    norm = float(engine.get_global_grad_norm())
                if norm is not None:
                    metrics["train/grad_norm"] = norm
                metrics.update(
                    {
                        "train/lr": lr,
                        "train/tokens": state.tokens,
                        "train/tokens_per_second": progress.tokens_per_second,
                    }
                )
                tracker.log_metrics(metrics, state.step)
                if not math.isfinite(line_loss):
                    raise FloatingPointError(f"loss is {line_loss} at step {state.step}; stopping")
            if cfg.eval.every and state.step % cfg.eval.every == 0:
                validate()
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                checkpoint()
        if not (cfg.eval.every and state.step % cfg.eval.every == 0):
            validate()
        if not (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
            checkpoint()
        if cfg.checkpoint.export:
            weights = full_state_dict(engine, cfg.engine.zero_stage)
            if dist.is_main:
                export_dir = export_model(
                    weights,
                    cfg,
                    tokenizer,
                    run_dir / "export",
                    {"step": state.step, "tokens": state.tokens, "run_dir": str(run_dir)},
                )
                tracker.log_artifact(export_dir / "config.json", "export")
                say(f"export {export_dir}")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)

    wall = time.perf_counter() - started
    train_seconds = progress.train_seconds
    summary = {
        "run_dir": str(run_dir),
        "step": state.step,
        "tokens": state.tokens,
        "parameters": params,
        "wall_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 1),
        "validation_seconds": round(val_seconds, 1),
        "tokens_per_second": round(
            progress.train_steps * tokens_per_step / max(train_seconds, 1e-9)
        ),
        "final_validation": last_val,
        "mlflow_run_id": state.mlflow_run_id,
        "tracking_uri": tracker.uri,
    }
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(
            f"done: {state.step} steps, {state.tokens:,} tokens in {duration(wall)} "
            f"({summary['tokens_per_second']:,} tok/s training; validation {duration(val_seconds)})"
        )
    return summary
