"""``fit``: build every component from the run config and train with DeepSpeed.

One loop for one CPU process or many GPUs: each optimizer step runs ``grad_accum``
micro-batches through the objective, DeepSpeed averages gradients across ranks and steps the
optimizer and schedule. Rank 0 prints progress and logs to MLflow; validation runs on all ranks.

``Trainer.__init__`` builds (model, objective, data, engine, tracking, resume state);
``Trainer.fit`` runs the loop; ``step``, ``log``, ``validate``, ``checkpoint`` and ``finish``
are its parts, each a screen or less.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from architectures.kernels import check_kernels
from data_pipeline.loader import SKIPPED_KEY, TrainLoader
from data_pipeline.shards import soft_masked
from data_pipeline.tokenizers import build_tokenizer
from nucleo.core.progress import Progress, duration
from nucleo.core.schema import ConfigError, flatten
from nucleo.core.types import Batch
from nucleo.train.checkpoint import load_checkpoint, prepare_run_dir, save_checkpoint
from nucleo.train.components import build_model
from nucleo.train.compute import ComputeCounter, count_parameters
from nucleo.train.config import RunConfig, save_config
from nucleo.train.engine import (
    DistInfo,
    apply_current_settings,
    build_engine,
    deepspeed_config,
    grad_norm,
    needs_own_grad_norm,
    on_main,
    setup_distributed,
)
from nucleo.train.evaluation import Validator
from nucleo.train.export import export_model, full_state_dict
from nucleo.train.objective import Objective
from nucleo.train.steps import Accumulated, optimizer_step
from nucleo.train.tracking import ModelWriter, Tracker, run_tags


def check_repeat_mask(objective: Objective, manifest: dict[str, Any], shards: str) -> None:
    """Refuse a repeat weight other than 1 on shards that keep no soft mask (it would
    silently weigh every base alike)."""
    weighted = [t for t in objective.terms if t.repeat_weight != 1.0]
    if weighted and not soft_masked(manifest):
        term = weighted[0]
        own = getattr(term.config, "repeat_weight", None) is not None
        key = f"loss.{term.name}.repeat_weight" if own else "data.repeat_weight"
        raise ConfigError(
            key,
            f"{term.repeat_weight} needs shards that keep the soft mask, but {shards} has none "
            f"(format {manifest.get('format')!r}, or built without it): rebuild them with "
            "`nucleo data build` (format 2 keeps lower-case repeats), or set it to 1",
        )


@dataclass
class TrainState:
    """What a checkpoint must restore besides model and optimizer."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0  # training compute so far (nucleo.train.compute: analytic)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    loader: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the run config when saved


def _mean_across_ranks(
    sums: dict[str, torch.Tensor], counts: dict[str, int], dist: DistInfo
) -> dict[str, float]:
    """Each metric's mean over the micro-batches that computed it (losses with a cadence
    appear in some only), then over ranks (every rank has the same keys: cadences follow the
    step)."""
    keys = sorted(sums)
    packed = torch.stack([sums[k].double() / max(1, counts[k]) for k in keys])
    if dist.world_size > 1:
        torch.distributed.all_reduce(packed)
        packed /= dist.world_size
    return {k: float(v) for k, v in zip(keys, packed.tolist(), strict=False)}


class Diverged(FloatingPointError):
    """A non-finite loss or weight: the run stops before anything non-finite is saved."""


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Trainer:
    """One training run, built from its config (and, to resume, its run directory).

    model_writer: writes the final export as an MLflow model (the flavour lives above this
    layer: the command line passes ``nucleo.downstream.pyfunc.save_pyfunc``); None: no model.
    """

    def __init__(
        self,
        cfg: RunConfig,
        resume: str | Path | None = None,
        out: TextIO = sys.stdout,
        model_writer: ModelWriter | None = None,
    ):
        self.started = time.perf_counter()
        self.cfg = cfg
        self.model_writer = model_writer
        self.dist = dist = setup_distributed(cfg.engine)
        self.out = out if dist.is_main else None
        # Everything that can reject the data or the losses comes before the run directory.
        self.tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_options)
        self.skipped_shards: dict[int, int] = {}  # reader -> shards it skipped (on_bad_shard)
        self.loader = TrainLoader(
            cfg.data, self.tokenizer, cfg.train.micro_batch_size, cfg.train.seed,
            dist.rank, dist.world_size, cfg.train.grad_accum,
        )  # fmt: skip
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.arch, cfg.model, self.tokenizer)
        bf16 = cfg.engine.precision == "bf16" or cfg.model.autocast == "bf16"
        self.kernels = check_kernels(self.model, dist.device, cfg.model.kernels, bf16)
        self.params = count_parameters(self.model)
        self.compute = ComputeCounter(self.model, cfg.train.micro_batch_size)
        self.objective = Objective.build(
            cfg.losses, cfg.loss, self.model, self.tokenizer, cfg.data.repeat_weight
        )
        check_repeat_mask(self.objective, self.loader.manifest, self.loader.where)
        self.validator = Validator(
            cfg.eval, cfg.data, self.tokenizer, self.objective, dist, cfg.train.seed
        )  # reads the validation windows and eval.floor (a bad one stops the run here)
        self.run_dir, resume_tag = prepare_run_dir(cfg, dist, resume, self.say)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.config_yaml = self.run_dir / "config.yaml"
        if dist.is_main:
            save_config(cfg, self.config_yaml)
            self.tokenizer.save(self.run_dir)  # the run's exact vocabulary (and its HF twin)
        self.engine = build_engine(self.model, cfg.train, cfg.engine, dist)
        self.tokens_per_step = self.loader.windows_per_step * cfg.data.seq_len  # at full length
        self.state = TrainState()
        if resume_tag:
            self._restore(resume_tag)
        self.tracker = Tracker(
            cfg.tracking, cfg.run.root, enabled=dist.is_main, previous_uri=self.state.tracking_uri
        )
        self._start_tracking(resumed=bool(resume_tag))
        self.progress = Progress(
            cfg.train.max_steps, self.state.step, self.tokens_per_step, self.out, self.state.tokens
        )
        self.val_seconds = 0.0
        self.last_val: dict[str, float] = {}
        self.last_saved: str | None = resume_tag
        self._warned_slow_eval = False

    def say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def _restore(self, tag: str) -> None:
        client = load_checkpoint(self.engine, self.ckpt_dir, tag)
        apply_current_settings(self.engine, self.cfg.train)
        self.state = TrainState(
            step=int(client["step"]),
            tokens=int(client["tokens"]),
            flops=float(client.get("flops", 0.0)),
            mlflow_run_id=client.get("mlflow_run_id"),
            tracking_uri=client.get("tracking_uri"),
            loader=client.get("loader", {}),
            config=client.get("config", {}),
        )
        self.loader.load_state_dict(self.state.loader)
        s = self.state
        self.say(f"resumed {self.run_dir} from {tag} (step {s.step}, {s.tokens:,} tokens)")

    def _start_tracking(self, resumed: bool) -> None:
        cfg, dist, tracker = self.cfg, self.dist, self.tracker
        previous = self.state.mlflow_run_id
        run_id = on_main(
            lambda: tracker.start(self.run_dir.name, previous, run_tags(cfg, dist.world_size)),
            dist.is_main,
        )
        # If the store is down, keep the id we had: a later resume can still continue it.
        self.state.mlflow_run_id = run_id or previous
        self.state.tracking_uri = tracker.uri
        tracker.log_dataset(cfg.data.shards)
        if resumed:
            before, now = flatten(self.state.config), flatten(cfg.to_dict())
            changes = [
                f"{k}: {before.get(k)} -> {now.get(k)}"
                for k in sorted(set(before) | set(now))
                if before.get(k) != now.get(k)
            ]
            tags = {"nucleo.resumed_at_step": str(self.state.step)}
            if changes:
                tags["nucleo.resume_changes"] = "; ".join(changes)[:5000]
                tracker.log_artifact(self.config_yaml, f"resumed_step_{self.state.step}")
            tracker.set_tags(tags)
        else:
            derived = {
                "parameters": self.params["total"],
                "non_embedding_parameters": self.params["non_embedding"],
                "world_size": dist.world_size,
                "global_batch_windows": self.loader.windows_per_step,
                "tokens_per_step": self.tokens_per_step,
                "flops_per_token": self.flops_per_token(),
                "forward_flops_per_token": (
                    self.compute.forward_per_window(cfg.data.seq_len) / cfg.data.seq_len
                ),
                "run_dir": str(self.run_dir),
                "kingdom_mixture": {k: round(v, 6) for k, v in self.loader.mixture().items()},
            }
            ds = deepspeed_config(cfg.train, cfg.engine, dist.world_size)
            tracker.log_params({**cfg.to_dict(), "derived": derived, "deepspeed": ds})
            tracker.log_artifact(self.config_yaml)
            for name in ("nucleo_tokenizer.json", "tokenizer.json", "tokenizer_config.json"):
                if (self.run_dir / name).is_file():  # the HF twin: where the tokenizer has one
                    tracker.log_artifact(self.run_dir / name)
        self.say(
            f"run {self.run_dir} | {cfg.arch} {self.params['total']:,} parameters "
            f"({self.params['non_embedding']:,} non-embedding) | losses {','.join(cfg.losses)} | "
            f"{dist.world_size} rank(s) on {dist.device.type}{self._precision_note()} | "
            f"{self.tokens_per_step:,} tokens/step{self._warmup_note()} | "
            f"MLflow {tracker.uri if tracker.active else 'off'}"
        )

    def fit(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary (also ``<run dir>/summary.json``)."""
        cfg, state = self.cfg, self.state
        status = "FAILED"
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminated)  # scheduler kills: end the run as KILLED
        try:
            if state.step == 0:
                self.validate()
            batches = self._counting_skipped(iter(self.loader))
            metrics = Accumulated()
            while state.step < cfg.train.max_steps:
                logging = (state.step + 1) % cfg.train.log_every == 0 or (
                    state.step + 1 == cfg.train.max_steps
                )
                norm = self.step(batches, metrics, want_norm=logging)
                if logging:
                    self.log(metrics, norm)
                    metrics = Accumulated()
                if cfg.eval.every and state.step % cfg.eval.every == 0:
                    self.validate()
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                    self.checkpoint()
            self.finish()
            status = "FINISHED"
        except (KeyboardInterrupt, SystemExit):
            status = "KILLED"
            raise
        finally:
            self.tracker.end(status)
        return self.summary()

    def step(self, batches: Iterator[Batch], metrics: Accumulated, want_norm: bool) -> float | None:
        """One optimizer step over ``grad_accum`` micro-batches (nucleo.train.steps); adds
        their metrics into ``metrics``. Returns the gradient norm when ``want_norm`` and
        DeepSpeed does not record it itself."""
        cfg, dist, state = self.cfg, self.dist, self.state
        norms: list[float] = []

        def before_step(micro: int) -> None:
            if want_norm and micro == cfg.train.grad_accum - 1 and needs_own_grad_norm(cfg.engine):
                norms.append(grad_norm(self.model))  # all-reduced, not yet clipped

        step_loss = optimizer_step(
            self.engine, self.objective, self.model, batches, grad_accum=cfg.train.grad_accum,
            step=state.step, seed=cfg.train.seed, rank=dist.rank, device=dist.device,
            metrics=metrics, before_step=before_step,
        )  # fmt: skip
        self._stop_unless(torch.isfinite(step_loss), f"loss of step {state.step + 1}")
        state.tokens += self.loader.tokens_at(state.step)
        state.flops += self.compute.step(
            self.loader.windows_per_step,
            cfg.data.seq_len_at(state.step),
            self.objective.passes_at(state.step),
        )
        state.step += 1
        return norms[0] if norms else None

    def _counting_skipped(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """``batches``, taking each reader's count of skipped shards off the way."""
        for batch in batches:
            skipped = batch.aux.pop(SKIPPED_KEY, None)
            if skipped is not None:  # per reader: the latest count is its total
                self.skipped_shards[int(skipped[0])] = int(skipped[1])
            yield batch

    def _precision_note(self) -> str:
        """ " bf16 weights, ZeRO-1, kernels: mamba-ssm selective_scan" and the like."""
        cfg = self.cfg
        parts = [
            "bf16 weights" if cfg.engine.precision == "bf16" else "fp32 weights",
            *(["bf16 autocast"] if cfg.model.autocast == "bf16" else []),
            f"ZeRO-{cfg.engine.zero_stage}",
        ]
        if self.dist.device.type == "cuda":
            parts.append("kernels: " + (", ".join(self.kernels) or "none (pure PyTorch)"))
        return " (" + ", ".join(parts) + ")"

    def _stop_unless(self, finite: torch.Tensor, what: str) -> None:
        """Raise Diverged on every rank together unless ``finite`` (a bool tensor) holds on
        all. One tiny all-reduce and one synchronisation per call: cheap next to a step.
        """
        bad = (~finite.to(self.dist.device)).any().float()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            saved = self.last_saved or "none yet"
            raise Diverged(
                f"training diverged: the {what} is not finite (on at least one rank); nothing "
                f"non-finite was saved (last checkpoint: {saved}). Resume with --resume "
                f"{self.run_dir}, e.g. with a lower train.lr or train.grad_clip"
            )

    def _weights_finite(self) -> torch.Tensor:
        """1-element tensor: whether every weight this rank holds (its partition under ZeRO-3)
        is finite; one synchronisation for all of them."""
        held = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        checks = [torch.isfinite(t).all() for t in held if t.numel()]
        return torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool)

    def _warmup_note(self) -> str:
        data = self.cfg.data
        if not data.seq_len_warmup:
            return ""
        return (
            f" (seq-len warm-up {data.seq_len_warmup} -> {data.seq_len} by step "
            f"{data.seq_len_warmup_steps})"
        )

    def flops_per_token(self) -> float:
        """Training FLOPs per token at full length with every loss due (nucleo.train.compute)."""
        return self.compute.per_token(self.cfg.data.seq_len, self.objective.passes_at(None))

    def log(self, since: Accumulated, norm: float | None) -> None:
        """Progress line and ``train/*`` metrics: means over the micro-batches since last time."""
        means = _mean_across_ranks(since.sums, since.counts, self.dist)
        lr = float(self.engine.get_lr()[0])
        loss = means.get("loss", math.nan)
        self.progress.update(self.state.step, loss, lr, tokens=self.state.tokens)
        metrics = {f"train/{k}": v for k, v in means.items()}
        if norm is None and self.engine.get_global_grad_norm() is not None:
            norm = float(self.engine.get_global_grad_norm())
        if norm is not None:
            metrics["train/grad_norm"] = norm
        metrics["train/lr"] = lr
        if self.cfg.data.on_bad_shard == "skip":  # every rank takes part in the all-reduce
            skipped = torch.tensor(
                float(sum(self.skipped_shards.values())), device=self.dist.device
            )
            if self.dist.world_size > 1:
                torch.distributed.all_reduce(skipped)
            metrics["train/data/skipped_shards"] = float(skipped)
        metrics["train/tokens"] = self.state.tokens
        metrics["train/flops"] = self.state.flops
        metrics["train/tokens_per_second"] = self.progress.tokens_per_second
        self.tracker.log_metrics(metrics, self.state.step)
        if not math.isfinite(loss):
            raise Diverged(
                f"training diverged: loss is {loss} at step {self.state.step}; last checkpoint: "
                f"{self.last_saved or 'none yet'}. Resume with --resume {self.run_dir}"
            )

    def validate(self) -> None:
        """Evaluate the fixed validation windows; log, print, and warn if it gets expensive."""
        self.progress.pause()
        self.last_val = val = self.validator(self.engine, self.model)
        self.val_seconds += val.get("val/seconds", 0.0)
        self.tracker.log_metrics(val, self.state.step)  # sent at once, in the background
        if val:
            per_kingdom = " ".join(
                f"{k.rsplit('/', 1)[1]} {v:.3f}"
                for k, v in val.items()
                if k.startswith("val/bits_per_base/")
            )
            headline = val.get("val/bits_per_base", val.get("val/loss", math.nan))
            floor, order = val.get("val/floor/bits_per_base"), self.validator.floor_order
            beside = "" if floor is None else f" (Markov-{order} floor {floor:.4f})"
            self.say(
                f"val step {self.state.step} | bits/base {headline:.4f}{beside} | {per_kingdom}"
            )
        trained = self.progress.train_seconds
        if not self._warned_slow_eval and trained > 60 and self.val_seconds > 0.1 * trained:
            self._warned_slow_eval = True
            self.say(
                f"note: validation has taken {100 * self.val_seconds / trained:.0f}% of the "
                "training time; lower eval.windows_per_kingdom or raise eval.every"
            )
        self.progress.resume()

    def checkpoint(self) -> None:
        """Save (after checking every weight is finite: a non-finite state is never saved,
        so it never prunes a good checkpoint)."""
        self._stop_unless(self._weights_finite(), f"model at step {self.state.step}")
        self.progress.pause()
        client = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "flops": self.state.flops,
            # the store may have answered only after start-up (nucleo.train.tracking)
            "mlflow_run_id": self.tracker.run_id or self.state.mlflow_run_id,
            "tracking_uri": self.state.tracking_uri,
            "loader": self.loader.state_dict(),
            "config": self.cfg.to_dict(),
        }
        # metrics up to this step reach the store before it is saved (a healthy store takes
        # them in milliseconds; a hung one costs flush's wait once, then it is known down)
        self.tracker.flush()
        config_text = self.config_yaml.read_text() if self.dist.is_main else ""
        path = save_checkpoint(
            self.engine, self.ckpt_dir, self.state.step, client, config_text,
            self.cfg.checkpoint.keep, self.dist.is_main,
        )  # fmt: skip
        self.last_saved = path.name
        self.say(f"checkpoint {path}")
        self.progress.resume()

    def finish(self) -> None:
        """Final validation and checkpoint (unless just done), then the portable export."""
        cfg, state = self.cfg, self.state
        if not (cfg.eval.every and state.step % cfg.eval.every == 0):
            self.validate()
        if not (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0):
            self.checkpoint()
        if not cfg.checkpoint.export:
            if cfg.tracking.register_as:
                self.say("note: tracking.register_as needs checkpoint.export: nothing registered")
            return
        weights = full_state_dict(self.engine, cfg)  # collective under ZeRO
        if self.dist.is_main:
            trained = {"step": state.step, "tokens": state.tokens, "run_dir": str(self.run_dir)}
            export_dir = export_model(
                weights, cfg, self.tokenizer, self.run_dir / "export", trained
            )
            self.tracker.log_artifact(export_dir / "config.json", "export")
            self.tracker.log_model(export_dir, self.model_writer)  # the run's MLflow model
            self.say(f"export {export_dir}")

    def summary(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.started
        trained = self.progress.train_seconds
        summary = {
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "run_dir": str(self.run_dir),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "flops": self.state.flops,
            "flops_per_token": self.flops_per_token(),
            "parameters": self.params,
            "wall_seconds": round(wall, 1),
            "train_seconds": round(trained, 1),
            "validation_seconds": round(self.val_seconds, 1),
            "tokens_per_second": round(self.progress.train_tokens / max(trained, 1e-9)),
            # over the last log interval: the steady rate, without start-up and warm-up steps
            "recent_tokens_per_second": round(self.progress.tokens_per_second),
            "final_validation": self.last_val,
            "mlflow_run_id": self.tracker.run_id or self.state.mlflow_run_id,
            "tracking_uri": self.tracker.uri,
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.say(
                f"done: {self.state.step} steps, {self.state.tokens:,} tokens in {duration(wall)} "
                f"({summary['tokens_per_second']:,} tok/s training; "
                f"validation {duration(self.val_seconds)})"
            )
        return summary


def fit(
    cfg: RunConfig,
    resume: str | Path | None = None,
    out: TextIO = sys.stdout,
    model_writer: ModelWriter | None = None,
) -> dict[str, Any]:
    """Train ``cfg``; with ``resume`` (a run directory) continue its latest complete checkpoint.
    ``model_writer``: how the final export becomes the run's MLflow model (``Trainer``).

    Returns a summary (final step, tokens, validation metrics, wall time, tokens/s), which is
    also written to ``<run dir>/summary.json``.
    """
    return Trainer(cfg, resume, out, model_writer).fit()
