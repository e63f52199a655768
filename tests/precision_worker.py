"""The precision x ZeRO matrix, run in its own process(es) by tests/test_precision.py.

For each combination ``arch:stage:precision`` (precision: fp32, bf16 = DeepSpeed bf16 weights
with fp32 masters, autocast = fp32 weights under ``model.autocast=bf16``) this builds the
family's tiny model, wraps it in a real DeepSpeed engine (no launcher for one process; the
``deepspeed`` launcher for several) and checks, on windows of real yeast DNA:

- training: 6 steps, finite losses and gradient norms, the loss falls;
- the weights the engine holds have the precision's dtype;
- validation: an eval-mode forward is finite;
- resume: a checkpoint after step 3, reloaded into a fresh engine and trained to step 6 on the
  same batches, ends with the same weights as the run that never stopped;
- export: the fp32 weights from the masters (``full_state_dict``) equal those ``nucleo export``
  reads from the checkpoint files offline (``state_from_checkpoint``), and the exported fp32
  model gives the engine's outputs (within bf16 rounding).

Rank 0 prints one JSON line per combination (``{"combo": ..., "ok": ..., ...}``); a failure
is reported with its message and the next combination runs.

    python tests/precision_worker.py OUT_DIR hyena:1:bf16 mamba:3:autocast ...
    deepspeed --num_gpus 2 tests/precision_worker.py OUT_DIR ...
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nucleo.runtime import configure_threads

configure_threads()

import torch  # noqa: E402

from data_pipeline.readers import read_sequences  # noqa: E402
from data_pipeline.tokenizers import CharTokenizer  # noqa: E402
from nucleo.checkpoint import load_checkpoint, save_checkpoint, tag_for  # noqa: E402
from nucleo.components import build_model  # noqa: E402
from nucleo.config import load_config  # noqa: E402
from nucleo.engine import build_engine, setup_distributed  # noqa: E402
from nucleo.export import full_state_dict, state_from_checkpoint  # noqa: E402
from nucleo.objective import Objective  # noqa: E402
from nucleo.types import Batch  # noqa: E402

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
YEAST = Path(__file__).resolve().parents[1] / "data_pipeline/sample/fungi/ScerR64_I.fna.gz"


def settings(arch: str, stage: int, precision: str) -> list[str]:
    """Overrides for one combination (ZeRO-3 partitions even these tiny parameters)."""
    engine_precision = "bf16" if precision == "bf16" else "fp32"
    return [
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
        out.append({"loss": float(result.loss), "grad_norm": float(norm or math.nan)})
    return out


def run_combo(combo: str, root: Path, dist_holder: list) -> dict:
    arch, stage, precision = combo.split(":")
    cfg = load_config(arch=arch, overrides=settings(arch, int(stage), precision))
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

    engine.eval()
    with torch.no_grad():
        probe = windows(99)
        outputs = engine(probe.tokens)
        eval_loss = float(objective(engine, probe, model).loss)

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
            export_logit_gap=gap,
            export_logit_scale=scale,
        )
    if dist.is_main:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]
    root, combos = Path(args[0]), args[1:]
    root.mkdir(parents=True, exist_ok=True)
    holder: list = []
    for combo in combos:
        started = time.perf_counter()
        try:
            result = run_combo(combo, root, holder)
            rank = holder[0].rank if holder else 0
        except Exception as err:  # reported, and the next combination runs
            rank = int(os.environ.get("RANK", 0))
            trace = traceback.format_exc(limit=-3).replace("\n", " | ")
            result = {"combo": combo, "error": f"{type(err).__name__}: {err}", "trace": trace}
        result["seconds"] = round(time.perf_counter() - started, 2)
        if rank == 0:
            print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
