"""Fine-tuning and linear probes on classification tasks, from a pretrained export or from
scratch with the same architecture; metrics over several seeds; predictions from the result.

    nucleo finetune TASK --export runs/x/export [--init pretrained|scratch] [--mode full|probe]
                    [--seeds 0,1,2] [--rc-conjoin] [--balance weights|sampler|none]
    nucleo finetune TASK --export A --export B --compare --out table.md
    nucleo predict runs/finetune/<run> genomes.fa --out predictions.tsv

A classifier is the backbone's final hidden states, mean-pooled over the sequence's tokens
(padding excluded), then one linear layer: [B, L] tokens -> [B, L, D] -> [B, D] -> [B, C].

- ``full``: backbone and head trained together (AdamW, warm-up then cosine decay).
- ``probe``: the backbone frozen; the embeddings of every sequence computed once and a
  logistic regression (scikit-learn, L2, standardised features) fitted on them. It is folded
  back into the same linear head, so a probe is saved and predicts like a fine-tuned model.
- ``scratch``: the export's architecture and tokenizer with freshly initialised weights (seeded).

``rc_conjoin`` averages the class probabilities of each test sequence and its reverse
complement. ``balance``: ``weights`` (class-weighted loss / balanced logistic regression),
``sampler`` (class-balanced sampling of training batches), ``none``.

Every run is an MLflow run (experiment ``nucleo-finetune`` by default) with its settings,
per-epoch training loss and the test metrics; the saved classifier is a portable export plus
``classifier.json`` and ``head.safetensors``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from nucleo.core.alphabet import reverse_complement_bytes
from nucleo.core.device import resolve as resolve_device
from nucleo.core.progress import duration, rate
from nucleo.downstream.options import BALANCES, INITS, MODES
from nucleo.downstream.tasks import Task, load_task
from nucleo.train.store import resolve_uri, tracked_run


@dataclass
class FinetuneConfig:
    """One fine-tuning setting (seeds are run one after another)."""

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
    out: str = "runs/finetune"
    experiment: str = "nucleo-finetune"
    tracking_uri: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("init", self.init, INITS),
            ("mode", self.mode, MODES),
            ("balance", self.balance, BALANCES),
        ):
            if value not in valid:
                raise ValueError(f"--{name} {value!r}: choose one of {', '.join(valid)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed, e.g. 0,1,2")


# ----------------------------------------------------------------------------- model


class SequenceClassifier(nn.Module):
    """Backbone -> masked mean of final hidden states [B, D] -> linear head [B, C]."""

    def __init__(self, backbone: nn.Module, d_model: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(d_model, n_classes)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(tokens).hidden.float()
        weights = mask[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens, mask))


def _hidden_size(backbone: nn.Module, tokenizer: Any, device: torch.device) -> int:
    probe = torch.from_numpy(np.asarray(tokenizer.encode(b"ACGTACGT"), np.int64))[None].to(device)
    with torch.no_grad():
        return int(backbone(probe).hidden.shape[-1])


def load_backbone(
    export: str | Path, init: str, seed: int, device: torch.device
) -> tuple[nn.Module, Any, dict]:
    """(backbone, tokenizer, export meta): the export's weights, or (``scratch``) its
    architecture freshly initialised from ``seed``."""
    from nucleo.core.schema import from_dict
    from nucleo.train.components import ARCHITECTURES, build_model
    from nucleo.train.export import load_exported

    model, tokenizer, meta = load_exported(export, device)
    if init == "scratch":
        torch.manual_seed(seed)
        entry = ARCHITECTURES.get(meta["arch"])
        model = build_model(
            meta["arch"], from_dict(entry.config, meta["model"], "model"), tokenizer
        )
        model = model.to(device)
    return model, tokenizer, meta


# ----------------------------------------------------------------------------- batches


def encode_all(tokenizer: Any, sequences: Sequence[bytes], max_tokens: int) -> list[np.ndarray]:
    """Token ids of each sequence, cut to its first ``max_tokens`` tokens."""
    return [np.asarray(tokenizer.encode(s), np.int64)[:max_tokens] for s in sequences]


def batches(
    ids: list[np.ndarray], order: np.ndarray, batch: int, pad_id: int, device: torch.device
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(row indices, tokens [b, L], mask [b, L]) right-padded, ``batch`` rows at a time."""
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(len(ids[r]) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(ids[r])] = torch.from_numpy(ids[r])
            mask[i, : len(ids[r])] = True
        yield rows, tokens.to(device), mask.to(device)


@torch.no_grad()
def embed_ids(
    model: SequenceClassifier, ids: list[np.ndarray], batch: int, pad_id: int, device: torch.device
) -> np.ndarray:
    """[n, D] mean-pooled embeddings (eval mode)."""
    model.eval()
    out = np.zeros((len(ids), model.head.in_features), np.float32)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for rows, tokens, mask in batches(ids, order, batch, pad_id, device):
        out[rows] = model.embed(tokens, mask).cpu().numpy()
    return out


@torch.no_grad()
def predict_proba(
    model: SequenceClassifier,
    ids: list[np.ndarray],
    batch: int,
    pad_id: int,
    device: torch.device,
    rc_ids: list[np.ndarray] | None = None,
) -> np.ndarray:
    """[n, C] class probabilities; with ``rc_ids`` the mean of both strands' probabilities."""
    model.eval()
    probs = np.zeros((len(ids), model.head.out_features), np.float64)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for views in [ids] if rc_ids is None else [ids, rc_ids]:
        for rows, tokens, mask in batches(views, order, batch, pad_id, device):
            probs[rows] += torch.softmax(model(tokens, mask).float(), -1).cpu().numpy()
    return probs / (1 if rc_ids is None else 2)


# ----------------------------------------------------------------------------- metrics


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, MCC, macro F1 and AUROC (binary; one-vs-rest macro for more classes)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

    pred = probs.argmax(1)
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "mcc": float(matthews_corrcoef(labels, pred)),
        "f1": float(f1_score(labels, pred, average="macro")),
    }
    present = np.unique(labels)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif probs.shape[1] == 2:
        out["auroc"] = float(roc_auc_score(labels, probs[:, 1]))
    else:
        p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        out["auroc"] = float(roc_auc_score(labels, p, multi_class="ovr", labels=present))
    return out


# ----------------------------------------------------------------------------- training


def _class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


def train_full(
    model: SequenceClassifier,
    ids: list[np.ndarray],
    labels: np.ndarray,
    cfg: FinetuneConfig,
    seed: int,
    pad_id: int,
    device: torch.device,
    log: Any = None,
) -> list[float]:
    """Train backbone and head; returns the mean training loss of each epoch."""
    n_classes = model.head.out_features
    rng = np.random.default_rng(seed)
    weight = None
    if cfg.balance == "weights":
        weight = torch.tensor(_class_weights(labels, n_classes), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps_per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    sample_p = None
    if cfg.balance == "sampler":
        w = _class_weights(labels, n_classes)[labels]
        sample_p = w / w.sum()
    epoch_losses, step, started = [], 0, time.perf_counter()
    tokens_done = 0
    for epoch in range(cfg.epochs):
        model.train()
        if sample_p is not None:
            order = rng.choice(len(ids), size=len(ids), p=sample_p)
        else:
            order = rng.permutation(len(ids))
        total_loss, seen = 0.0, 0
        target = torch.from_numpy(labels).to(device)
        for rows, tokens, mask in batches(ids, order, cfg.batch_size, pad_id, device):
            loss = loss_fn(model(tokens, mask).float(), target[torch.from_numpy(rows).to(device)])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            step += 1
            total_loss += float(loss.detach()) * len(rows)
            seen += len(rows)
            tokens_done += int(mask.sum())
            if log is not None and (step % 20 == 0 or step == total):
                elapsed = time.perf_counter() - started
                eta = elapsed / step * (total - step)
                log(
                    f"  step {step}/{total} (epoch {epoch + 1}) | loss {total_loss / seen:.4f} | "
                    f"{rate(tokens_done / elapsed)} tok/s | elapsed {duration(elapsed)} | "
                    f"eta {duration(eta)}"
                )
        epoch_losses.append(total_loss / max(seen, 1))
    return epoch_losses


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
    return f"{task_name}-{label}-{cfg.init}-{cfg.mode}-seed{seed}"


def finetune_once(
    cfg: FinetuneConfig,
    task: Task,
    seed: int,
    say: Any = print,
    parent_run: str | None = None,
    cache: dict[tuple, np.ndarray] | None = None,
) -> RunResult:
    """Train (or probe) one seed on ``task``'s train split, evaluate on its test split, save
    the classifier under ``cfg.out/<run name>`` and log it all to MLflow. ``cache`` keeps a
    pretrained probe's training embeddings across seeds (they do not depend on the seed)."""

    device = resolve_device(cfg.device, "--device")
    torch.manual_seed(seed)
    backbone, tokenizer, meta = load_backbone(cfg.export, cfg.init, seed, device)
    d_model = _hidden_size(backbone, tokenizer, device)
    model = SequenceClassifier(backbone, d_model, len(task.classes)).to(device)
    train, test = task.splits["train"], task.splits["test"]
    train_ids = encode_all(tokenizer, train.sequences, cfg.max_tokens)
    test_ids = encode_all(tokenizer, test.sequences, cfg.max_tokens)
    rc_ids = (
        encode_all(tokenizer, [reverse_complement_bytes(s) for s in test.sequences], cfg.max_tokens)
        if cfg.rc_conjoin
        else None
    )
    name = run_name(cfg, task.name, seed)
    tags = {"nucleo.kind": "finetune", "nucleo.task": task.name}
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
    uri = resolve_uri(cfg.tracking_uri)
    with tracked_run(uri, cfg.experiment, name, tags) as (client, rid):
        params = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "tracking_uri")}
        params.update(
            seed=seed,
            task_name=task.name,
            classes=",".join(task.classes),
            n_train=len(train),
            n_test=len(test),
            arch=meta["arch"],
            pretrained_losses=",".join(meta.get("run_config", {}).get("losses", [])),
        )
        for key, value in params.items():
            client.log_param(rid, key, str(value)[:500])
        started = time.perf_counter()
        if cfg.mode == "full":
            losses = train_full(
                model, train_ids, train.labels, cfg, seed, tokenizer.pad_id, device, say
            )
            for epoch, value in enumerate(losses, start=1):
                client.log_metric(rid, "train/loss", value, step=epoch)
        else:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            key = (
                cfg.export,
                cfg.init,
                cfg.task,
                cfg.max_tokens,
                seed if cfg.init == "scratch" else -1,
            )
            if cache is not None and key in cache:
                train_x = cache[key]
            else:
                train_x = embed_ids(model, train_ids, cfg.batch_size * 2, tokenizer.pad_id, device)
                if cache is not None:
                    cache[key] = train_x
            weight, bias = fit_probe(train_x, train.labels, len(task.classes), cfg, seed)
            with torch.no_grad():
                model.head.weight.copy_(torch.from_numpy(weight))
                model.head.bias.copy_(torch.from_numpy(bias))
        seconds = time.perf_counter() - started
        probs = predict_proba(model, test_ids, cfg.batch_size * 2, tokenizer.pad_id, device, rc_ids)
        result = metrics(test.labels, probs)
        for key, value in result.items():
            if not math.isnan(value):
                client.log_metric(rid, f"test/{key}", value)
        client.log_metric(rid, "train/seconds", seconds)
        out = save_classifier(model, cfg, task, meta, seed, Path(cfg.out) / name)
        client.log_artifact(rid, str(out / "classifier.json"))
        return RunResult(seed, result, seconds, str(out), rid)


def save_classifier(
    model: SequenceClassifier, cfg: FinetuneConfig, task: Task, meta: dict, seed: int, out: Path
) -> Path:
    """The classifier as a portable export (config.json, model.safetensors, tokenizer.json of
    the backbone) plus head.safetensors and classifier.json (classes, pooling, settings)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(Path(cfg.export) / name, out / name)
    save_model(model.backbone, str(out / "model.safetensors"))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(out / "head.safetensors"),
    )
    info = {
        "format": "nucleo-classifier/1",
        "task": task.name,
        "classes": task.classes,
        "pooling": "mean",
        "rc_conjoin": cfg.rc_conjoin,
        "max_tokens": cfg.max_tokens,
        "init": cfg.init,
        "mode": cfg.mode,
        "seed": seed,
        "from_export": str(cfg.export),
        "pretrained_losses": meta.get("run_config", {}).get("losses", []),
    }
    (out / "classifier.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_classifier(
    path: str | Path, device: str | torch.device = "auto"
) -> tuple[SequenceClassifier, Any, dict]:
    """(classifier in eval mode, tokenizer, classifier.json) of a saved fine-tuned model."""
    from nucleo.train.export import load_exported

    root = Path(path)
    info_path = root / "classifier.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: not found; is {root} a `nucleo finetune` output?")
    info = json.loads(info_path.read_text())
    device = resolve_device(device)
    backbone, tokenizer, _meta = load_exported(root, device)
    head = load_file(str(root / "head.safetensors"))
    model = SequenceClassifier(backbone, head["weight"].shape[1], head["weight"].shape[0])
    model.head.load_state_dict(head)
    return model.to(device).eval(), tokenizer, info


# ----------------------------------------------------------------------------- seeds, compare


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


def compare_settings(
    exports: Sequence[tuple[str, str]], scratch: bool = True
) -> list[tuple[str, str, str, str]]:
    """(label, export, init, mode) rows of the pretrained-vs-scratch comparison: each export
    fine-tuned and probed, plus (``scratch``) the first export's architecture from scratch
    (fine-tuned, and probed as a random-features baseline)."""
    rows = []
    for label, export in exports:
        rows.append((label, export, "pretrained", "full"))
        rows.append((label, export, "pretrained", "probe"))
    if not scratch:
        return rows
    first = exports[0][1]
    rows.append(("scratch", first, "scratch", "full"))
    rows.append(("scratch", first, "scratch", "probe"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: task, model, init, mode, seeds, then mean ± sd of each metric."""
    head = "| task | model | init | mode | seeds | accuracy | MCC | F1 | AUROC | train s/seed |"
    lines = [head, "|" + "---|" * 10]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    ordered = sorted(
        rows,
        key=lambda r: (tasks.index(r["task"]), r["init"] == "scratch", labels.index(r["label"]),
                       r["mode"]),
    )  # fmt: skip
    for r in ordered:
        s = r["summary"]
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("accuracy", "mcc", "f1", "auroc")]
        lines.append(
            f"| {r['task']} | {r['label']} | {r['init']} | {r['mode']} | {r['seeds']} | "
            + " | ".join(cells)
            + f" | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def compare(
    tasks: Sequence[str],
    exports: Sequence[tuple[str, str]],
    base: FinetuneConfig,
    out: str | Path | None = None,
    say: Any = print,
    scratch: bool = True,
) -> list[dict[str, Any]]:
    """Every task x compare_settings row over base.seeds; a markdown table (and JSON beside
    it) at ``out``; an MLflow parent run holding the table, one child run per seed.

    Rows already in ``out``'s JSON with the same task, model, init, mode and seeds are kept,
    not rerun: an interrupted comparison resumes, and a later one (another export,
    ``scratch=False``) adds its rows to the same table."""

    table: list[dict[str, Any]] = []
    if out is not None and Path(out).with_suffix(".json").is_file():
        table = json.loads(Path(out).with_suffix(".json").read_text()).get("rows", [])
    done = {(r["task"], r["label"], r["init"], r["mode"], r["seeds"]) for r in table}
    uri = resolve_uri(base.tracking_uri)
    tags = {"nucleo.kind": "finetune-compare"}
    with tracked_run(uri, base.experiment, "finetune-compare", tags) as (client, parent):
        client.log_param(parent, "tasks", ",".join(tasks))
        client.log_param(parent, "exports", ",".join(e for _, e in exports))
        client.log_param(parent, "seeds", ",".join(map(str, base.seeds)))
        for task_path in tasks:
            task = load_task(task_path)
            say(task.describe())
            for label, export, init, mode in compare_settings(exports, scratch):
                if (task.name, label, init, mode, len(base.seeds)) in done:
                    say(f"  {task.name} | {label} | {init} {mode}: in {out} already, kept")
                    continue
                cfg = FinetuneConfig(
                    **{
                        **asdict(base),
                        "task": task_path,
                        "export": export,
                        "init": init,
                        "mode": mode,
                        "label": label,
                    }
                )
                results = run_seeds(cfg, task, say, parent)
                table.append(
                    {
                        "task": task.name,
                        "label": label,
                        "init": init,
                        "mode": mode,
                        "seeds": len(results),
                        "summary": summarize(results),
                        "per_seed": [asdict(r) for r in results],
                        "seconds": float(np.mean([r.train_seconds for r in results])),
                    }
                )
                if out is not None:
                    _write_compare(out, table, tasks, exports, base)
        text = format_table(table)
        client.log_text(parent, text, "compare.md")
    if out is not None:
        _write_compare(out, table, tasks, exports, base)
    return table


def _command_line() -> str:
    """This process's command as a user types it (``nucleo finetune ...`` rather than the path
    of nucleo's ``__main__``)."""
    program = Path(sys.argv[0]).name
    if program in ("__main__.py", "nucleo"):
        return " ".join(["nucleo", *sys.argv[1:]])
    return " ".join(["python", sys.argv[0], *sys.argv[1:]])


def _write_compare(
    out: str | Path,
    table: list[dict],
    tasks: Sequence[str],
    exports: Sequence[tuple[str, str]],
    base: FinetuneConfig,
) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_table(table) + "\n")
    record = {
        "command": _command_line(),
        "tasks": list(tasks),
        "exports": [list(e) for e in exports],
        "settings": {k: v for k, v in asdict(base).items() if k not in ("task", "export")},
        "rows": table,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- predict


def predict_file(
    classifier: str | Path,
    path: str | Path,
    batch: int = 64,
    device: str = "auto",
    warn: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, str, np.ndarray]]:
    """(record id, predicted class, probabilities [C]) per record of a FASTA/GenBank file,
    streamed, in batches of ``batch`` records; the classifier's rc_conjoin setting applies.

    The classifier is loaded before this returns (a bad one fails before anything is
    written); records more than half N are named through ``warn`` (default: stderr).
    """
    from data_pipeline.readers import read_sequences
    from nucleo.downstream.inference import MOSTLY_N, n_fraction

    dev = resolve_device(device)
    model, tokenizer, info = load_classifier(classifier, dev)
    classes = info["classes"]
    say = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))

    def flush(pending: list[tuple[str, bytes]]) -> Iterator[tuple[str, str, np.ndarray]]:
        seqs = [s for _, s in pending]
        ids = encode_all(tokenizer, seqs, info["max_tokens"])
        rc = None
        if info.get("rc_conjoin"):
            rc = encode_all(
                tokenizer, [reverse_complement_bytes(s) for s in seqs], info["max_tokens"]
            )
        probs = predict_proba(model, ids, batch, tokenizer.pad_id, dev, rc)
        for (rid, _), p in zip(pending, probs, strict=True):
            yield rid, classes[int(p.argmax())], p

    def predictions() -> Iterator[tuple[str, str, np.ndarray]]:
        pending: list[tuple[str, bytes]] = []
        for record in read_sequences(path):
            seq = bytes(record.seq)
            if n_fraction(seq) > MOSTLY_N:
                say(f"{record.id}: {100 * n_fraction(seq):.0f}% N: its prediction says little")
            pending.append((record.id, seq))
            if len(pending) == batch:
                yield from flush(pending)
                pending = []
        if pending:
            yield from flush(pending)

    return predictions()
