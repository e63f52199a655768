"""Fine-tuning and linear probes on classification tasks, from a pretrained export or from
scratch with the same architecture; metrics over several seeds.

    nucleo finetune TASK --export runs/x/export [--init pretrained|scratch] [--mode full|probe]
                    [--seeds 0,1,2] [--rc-conjoin] [--balance weights|sampler|none]
                    [--precision fp32|bf16] [--zero-stage 0-3]
    deepspeed --num_gpus 2 launch/finetune.py TASK --export runs/x/export     # several ranks

- ``full``: backbone and head trained together through the training engine of pretraining
  (``nucleo.train``): the same DeepSpeed engine (AdamW, warm-up then cosine decay to 0, gradient
  clipping, ZeRO stages, bf16 weights), the same optimizer step (``nucleo.train.steps``), with
  the classifier (``nucleo.downstream.classifier``) as the model and ``ClassificationObjective``
  as the objective. Under several processes each rank takes its share of every batch.
- ``probe``: the backbone frozen; the embeddings of every sequence computed once and a
  logistic regression (scikit-learn, L2, standardised features) fitted on them. It is folded
  back into the same linear head, so a probe is saved and predicts like a fine-tuned model.
- ``scratch``: the export's architecture and tokenizer with freshly initialised weights (seeded).

``rc_conjoin`` averages the class probabilities of each test sequence and its reverse
complement. ``balance``: ``weights`` (class-weighted loss / balanced logistic regression),
``sampler`` (class-balanced sampling of training batches), ``none``.

Every run is an MLflow run (experiment ``nucleo-finetune`` by default, through
``nucleo.train.store``) with its settings, per-epoch training loss and the test metrics, logged
by rank 0; the saved classifier is a portable export plus ``classifier.json`` and
``head.safetensors``. ``nucleo.downstream.finetune_compare`` runs the pretrained-vs-scratch
table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.progress import duration, rate
from nucleo.core.types import LossOutput
from nucleo.downstream.classifier import (
    SequenceClassifier,
    embed_ids,
    encode_all,
    hidden_size,
    metrics,
    pad,
    predict_proba,
    save_classifier,
)
from nucleo.downstream.options import BALANCES, INITS, MODES
from nucleo.downstream.tasks import Task, load_task
from nucleo.train.engine import DistInfo, EngineConfig, TrainConfig, build_engine, setup_distributed
from nucleo.train.export import full_state_dict, load_exported
from nucleo.train.steps import Accumulated, optimizer_step
from nucleo.train.store import model_name_problem, resolve_uri, tracked_run


@dataclass
class FinetuneConfig:
    """One fine-tuning setting (seeds are run one after another). precision and zero_stage are
    the training engine's (``engine.precision``, ``engine.zero_stage`` of pretraining)."""

    task: str
    export: str
    init: str = "pretrained"
    mode: str = "full"
    seeds: list[int] = field(default_factory=lambda: [0])
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    balance: str = "weights"
    rc_conjoin: bool = False
    probe_c: float = 1.0
    max_tokens: int = 1024
    device: str = "auto"
    precision: str = "fp32"
    zero_stage: int = 0
    out: str = "runs/finetune"
    experiment: str = "nucleo-finetune"
    tracking_uri: str | None = None
    label: str = ""
    register_as: str | None = None  # registered model: each saved classifier a new version
    layer: int = -1  # probe: pool the states of this layer (0 embedding, -1 the final ones)

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("init", self.init, INITS),
            ("mode", self.mode, MODES),
            ("balance", self.balance, BALANCES),
            ("precision", self.precision, ("fp32", "bf16")),
        ):
            if value not in valid:
                raise ValueError(f"--{name} {value!r}: choose one of {', '.join(valid)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage {self.zero_stage}: choose 0, 1, 2 or 3")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed, e.g. 0,1,2")
        if self.layer != -1 and self.mode != "probe":
            raise ValueError(f"--layer {self.layer}: probes only (--mode probe); full "
                             "fine-tuning trains the whole backbone")  # fmt: skip
        if self.register_as is not None and (problem := model_name_problem(self.register_as)):
            raise ValueError(f"--register-as: {problem}")

    def engine(self) -> EngineConfig:
        """The training engine's settings: device (auto, cpu, or cuda: each rank its own
        GPU), ZeRO stage and precision."""
        device = "cuda" if self.device.startswith("cuda") else self.device
        return EngineConfig(device=device, zero_stage=self.zero_stage, precision=self.precision)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the objective


@dataclass
class ClassBatch:
    """A micro-batch of labelled sequences: tokens and mask [b, L] (right-padded), labels [b]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> ClassBatch:
        return ClassBatch(self.tokens.to(device), self.mask.to(device), self.labels.to(device))


class ClassificationObjective:
    """Cross-entropy of the class logits (class-weighted when ``weight`` is given), with the
    interface of pretraining's objective: ``(forward, batch, model, step) -> LossOutput``."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        self.weight = weight

    def __call__(
        self, forward: Any, batch: ClassBatch, model: nn.Module, step: int | None = None
    ) -> LossOutput:
        logits = forward(batch.tokens, batch.mask).float()
        weight = None if self.weight is None else self.weight.to(logits.device)
        loss = F.cross_entropy(logits, batch.labels, weight=weight)
        accuracy = (logits.argmax(-1) == batch.labels).float().mean()
        return LossOutput(loss, {"loss": loss.detach(), "accuracy": accuracy.detach()})


def _class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


def _rank_batches(
    ids: list[np.ndarray], labels: np.ndarray, order: np.ndarray, batch: int, pad_id: int,
    dist: DistInfo,
) -> Iterator[ClassBatch]:  # fmt: skip
    """This rank's share of each global batch of ``batch`` rows of ``order`` (right-padded, on
    the CPU); a rank whose share of the last batch is empty repeats the batch's first row, so
    every rank takes part in every step's all-reduce."""
    for start in range(0, len(order), batch):
        rows = order[start : start + batch][dist.rank :: dist.world_size]
        if len(rows) == 0:
            rows = order[start : start + 1]
        tokens, mask = pad(ids, rows, pad_id)
        yield ClassBatch(tokens, mask, torch.from_numpy(labels[rows]))


# ----------------------------------------------------------------------------- training


def train_full(
    model: SequenceClassifier,
    ids: list[np.ndarray],
    labels: np.ndarray,
    cfg: FinetuneConfig,
    seed: int,
    pad_id: int,
    dist: DistInfo,
    log: Any = None,
) -> tuple[Any, SimpleNamespace, list[float]]:
    """Train backbone and head through the DeepSpeed engine; returns (engine, its settings as
    ``full_state_dict`` reads them, the mean training loss of each epoch on this rank)."""
    n_classes = model.head.out_features
    rng = np.random.default_rng(seed)
    weight = None
    if cfg.balance == "weights":
        weight = torch.tensor(_class_weights(labels, n_classes), dtype=torch.float32)
    steps_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    train = TrainConfig(
        max_steps=total, micro_batch_size=math.ceil(cfg.batch_size / dist.world_size),
        lr=cfg.lr, min_lr_ratio=0.0, warmup_steps=max(1, int(cfg.warmup_fraction * total)),
        weight_decay=cfg.weight_decay, betas=[0.9, 0.999], grad_clip=1.0, seed=seed,
    )  # fmt: skip
    engine_cfg = cfg.engine()
    engine = build_engine(model, train, engine_cfg, dist)
    objective = ClassificationObjective(weight)
    sample_p = None
    if cfg.balance == "sampler":
        w = _class_weights(labels, n_classes)[labels]
        sample_p = w / w.sum()
    epoch_losses, step, started, tokens_done = [], 0, time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        engine.train()
        if sample_p is not None:
            order = rng.choice(len(ids), size=len(ids), p=sample_p)
        else:
            order = rng.permutation(len(ids))
        total_loss, seen = 0.0, 0
        for batch in _rank_batches(ids, labels, order, cfg.batch_size, pad_id, dist):
            loss = optimizer_step(
                engine, objective, engine.module, iter([batch]), grad_accum=1, step=step,
                seed=seed, rank=dist.rank, device=dist.device, metrics=Accumulated(),
            )  # fmt: skip
            step += 1
            total_loss += float(loss) * len(batch.labels)
            seen += len(batch.labels)
            tokens_done += int(batch.mask.sum())
            if log is not None and (step % 20 == 0 or step == total):
                elapsed = time.perf_counter() - started
                eta = elapsed / step * (total - step)
                log(
                    f"  step {step}/{total} (epoch {epoch + 1}) | loss {total_loss / seen:.4f} | "
                    f"{rate(tokens_done / elapsed)} tok/s | elapsed {duration(elapsed)} | "
                    f"eta {duration(eta)}"
                )
        if not math.isfinite(total_loss):
            raise FloatingPointError(
                f"fine-tuning diverged in epoch {epoch + 1}: the loss is not finite; lower --lr"
            )
        epoch_losses.append(total_loss / max(seen, 1))
    return engine, SimpleNamespace(engine=engine_cfg, train=train), epoch_losses


def fit_probe(
    train_x: np.ndarray, labels: np.ndarray, n_classes: int, cfg: FinetuneConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardised embeddings, folded into (weight [C, D], bias [C])
    of a linear head on the raw embeddings."""
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(
        C=cfg.probe_c,
        max_iter=3000,
        class_weight="balanced" if cfg.balance != "none" else None,
        random_state=seed,
    )
    clf.fit((train_x - mean) / std, labels)
    coef = np.zeros((n_classes, train_x.shape[1]))
    intercept = np.zeros(n_classes)
    present = clf.classes_
    if n_classes == 2 and len(present) == 2:
        # scikit-learn keeps one row for two classes: logit(1) - logit(0)
        coef[1], intercept[1] = clf.coef_[0], clf.intercept_[0]
    else:
        coef[present], intercept[present] = clf.coef_, clf.intercept_
        intercept[np.setdiff1d(np.arange(n_classes), present)] = -1e4
    weight = coef / std
    bias = intercept - (coef * (mean / std)).sum(1)
    return weight.astype(np.float32), bias.astype(np.float32)


# ----------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """Test metrics of one seed, with where the classifier was saved."""

    seed: int
    metrics: dict[str, float]
    train_seconds: float
    path: str
    run_id: str | None = None


def run_name(cfg: FinetuneConfig, task_name: str, seed: int) -> str:
    label = cfg.label or Path(cfg.export).parent.name or "model"
    layer = "" if cfg.layer == -1 else f"-layer{cfg.layer}"
    return f"{task_name}-{label}-{cfg.init}-{cfg.mode}{layer}-seed{seed}"


@contextmanager
def tracked_on_main(
    dist: DistInfo, uri: str, experiment: str, name: str, tags: dict[str, str]
) -> Iterator[tuple[Any, str | None]]:
    """``tracked_run`` on rank 0; (None, None) on the other ranks."""
    if not dist.is_main:
        yield None, None
        return
    with tracked_run(uri, experiment, name, tags) as run:
        yield run


def _probe(
    model: SequenceClassifier, cfg: FinetuneConfig, train_ids: list[np.ndarray],
    labels: np.ndarray, seed: int, pad_id: int, device: torch.device,
    cache: dict[tuple, np.ndarray] | None,
) -> None:  # fmt: skip
    """Fit the probe on frozen embeddings and fold it into the head. ``cache`` keeps a
    pretrained probe's training embeddings across seeds (they do not depend on the seed)."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    seed_key = seed if cfg.init == "scratch" else -1
    key = (cfg.export, cfg.init, cfg.task, cfg.max_tokens, cfg.layer, seed_key)
    if cache is not None and key in cache:
        train_x = cache[key]
    else:
        train_x = embed_ids(model, train_ids, cfg.batch_size * 2, pad_id, device)
        if cache is not None:
            cache[key] = train_x
    weight, bias = fit_probe(train_x, labels, model.head.out_features, cfg, seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))


def finetune_once(
    cfg: FinetuneConfig,
    task: Task,
    seed: int,
    say: Any = print,
    parent_run: str | None = None,
    cache: dict[tuple, np.ndarray] | None = None,
) -> RunResult:
    """Train (or probe) one seed on ``task``'s train split, evaluate on its test split, save
    the classifier under ``cfg.out/<run name>`` and log it all to MLflow (rank 0)."""
    dist = setup_distributed(cfg.engine())
    device = dist.device
    torch.manual_seed(seed)
    pretrained = cfg.init == "pretrained"
    backbone, tokenizer, meta = load_exported(cfg.export, device, weights=pretrained)
    d_model = hidden_size(backbone, tokenizer, device)
    model = SequenceClassifier(backbone, d_model, len(task.classes), cfg.layer).to(device)
    train, test = task.splits["train"], task.splits["test"]
    train_ids = encode_all(tokenizer, train.sequences, cfg.max_tokens)
    test_ids = encode_all(tokenizer, test.sequences, cfg.max_tokens)
    rc_ids = None
    if cfg.rc_conjoin:
        rc = [reverse_complement_bytes(s) for s in test.sequences]
        rc_ids = encode_all(tokenizer, rc, cfg.max_tokens)
    name = run_name(cfg, task.name, seed)
    tags = {"nucleo.kind": "finetune", "nucleo.task": task.name}
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
    uri = resolve_uri(cfg.tracking_uri)
    with tracked_on_main(dist, uri, cfg.experiment, name, tags) as (client, rid):
        if client is not None:
            params = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "tracking_uri")}
            params.update(
                seed=seed, task_name=task.name, classes=",".join(task.classes),
                n_train=len(train), n_test=len(test), arch=meta["arch"],
                world_size=dist.world_size,
                pretrained_losses=",".join(meta.get("run_config", {}).get("losses", [])),
            )  # fmt: skip
            for key, value in params.items():
                client.log_param(rid, key, str(value)[:500])
        started = time.perf_counter()
        engine = None
        if cfg.mode == "full":
            log = say if dist.is_main else None
            engine, settings, losses = train_full(
                model, train_ids, train.labels, cfg, seed, tokenizer.pad_id, dist, log
            )
            if client is not None:
                for epoch, value in enumerate(losses, start=1):
                    client.log_metric(rid, "train/loss", value, step=epoch)
        else:
            _probe(model, cfg, train_ids, train.labels, seed, tokenizer.pad_id, device, cache)
        seconds = time.perf_counter() - started
        probs = predict_proba(
            model, test_ids, cfg.batch_size * 2, tokenizer.pad_id, device, rc_ids, engine
        )
        result = metrics(test.labels, probs)
        if engine is not None:  # gather the fp32 weights (collective under ZeRO)
            weights = full_state_dict(engine, settings)
            if dist.is_main:
                fresh, _, _ = load_exported(cfg.export, "cpu", weights=False)
                model = SequenceClassifier(fresh, d_model, len(task.classes))
                model.load_state_dict(weights)
        info = {
            "task": task.name, "classes": task.classes, "rc_conjoin": cfg.rc_conjoin,
            "max_tokens": cfg.max_tokens, "init": cfg.init, "mode": cfg.mode, "seed": seed,
            "from_export": str(cfg.export), "precision": cfg.precision,
            "pretrained_losses": meta.get("run_config", {}).get("losses", []),
        }  # fmt: skip
        out = Path(cfg.out) / name
        if client is not None:
            for key, value in result.items():
                if not math.isnan(value):
                    client.log_metric(rid, f"test/{key}", value)
            client.log_metric(rid, "train/seconds", seconds)
            save_classifier(model, cfg.export, info, out)
            client.log_artifact(rid, str(out / "classifier.json"))
            _log_model(client, rid, out, cfg.register_as, say)
        return RunResult(seed, result, seconds, str(out), rid)


def _log_model(client: Any, rid: str, folder: Path, register_as: str | None, say: Any) -> None:
    """The saved classifier as the run's MLflow model (a pyfunc, ``runs:/<run>/model``), and a
    new version of ``register_as`` when given. The classifier is already on disk: a store
    that fails here costs the model's MLflow copy (a warning), not the fine-tuning."""
    from nucleo.downstream.pyfunc import log_pyfunc

    try:
        _uri, version = log_pyfunc(client, rid, folder, register_as)
    except Exception as err:  # any failure of the store; the saved classifier stays
        brief = (str(err).strip().splitlines() or [""])[0][:200]
        say(f"  warning: MLflow did not take the classifier as a model ({brief}); see {folder}")
        return
    registered = f", registered as models:/{register_as}/{version}" if version else ""
    say(f"  MLflow model runs:/{rid}/model{registered}")


# ----------------------------------------------------------------------------- seeds


def summarize(results: list[RunResult]) -> dict[str, tuple[float, float]]:
    """metric -> (mean, sample standard deviation) over seeds."""
    out = {}
    for key in results[0].metrics:
        values = np.array([r.metrics[key] for r in results], float)
        out[key] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return out


def run_seeds(
    cfg: FinetuneConfig, task: Task | None = None, say: Any = print, parent_run: str | None = None
) -> list[RunResult]:
    """``finetune_once`` for every seed of ``cfg``."""
    task = task or load_task(cfg.task)
    results = []
    cache: dict[tuple, np.ndarray] = {}
    for seed in cfg.seeds:
        say(
            f"finetune {task.name} | {cfg.label or cfg.export} | {cfg.init} {cfg.mode} | "
            f"seed {seed}"
        )
        result = finetune_once(cfg, task, seed, say, parent_run, cache)
        m = result.metrics
        say(
            f"  test accuracy {m['accuracy']:.4f} | MCC {m['mcc']:.4f} | F1 {m['f1']:.4f} | "
            f"AUROC {m['auroc']:.4f} | {duration(result.train_seconds)} | {result.path}"
        )
        results.append(result)
    return results
