"""End to end: ``deepspeed launch/pretrain.py`` on the bundled genomes, in 1 and 2 processes.

Each run is a real DeepSpeed launch (gloo on CPU) of a tiny transformer for a few dozen steps:
loss must fall, MLflow must hold the run, checkpoints and the export must exist, a resumed run
must end bit-identical to an uninterrupted one, and the MLflow run must continue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from nucleo.train.checkpoint import complete_tags
from nucleo.train.config import load_config
from nucleo.train.export import load_exported, state_from_checkpoint
from tests.conftest import ROOT, launch_env

pytestmark = pytest.mark.slow

DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
    "data.seq_len=128", "train.micro_batch_size=8", "train.max_steps=40",
    "train.lr=3e-3", "train.warmup_steps=5", "train.log_every=5",
    "eval.every=20", "eval.windows_per_kingdom=4", "checkpoint.every=20",
]  # fmt: skip


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pretrain(
    shards: Path,
    root: Path,
    *args: str,
    procs: int = 1,
    extra: list[str] = (),
    base: list[str] = TINY,
):
    sets = [*base, f"data.shards={shards}", f"run.root={root}", *extra]
    port = _port()
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        str(procs),
        "--master_port",
        str(port),
        "launch/pretrain.py",
        *args,
    ]
    for item in sets:
        cmd += ["--set", item]
    env = launch_env(procs)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's CPU all-reduce workspaces (67 MB per rank) must not outlive the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return result.stdout + result.stderr


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root.resolve() / 'mlflow.db'}")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _nucleo_export_equals(run_dir: Path, out: Path) -> None:
    """``nucleo export RUN_DIR`` (the offline path, from the checkpoint files) gives the fp32
    master weights that the run's own export holds, bit for bit."""
    exported = load_exported(run_dir / "export")[0].state_dict()
    result = subprocess.run(
        [sys.executable, "-m", "nucleo", "export", str(run_dir), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    offline = load_exported(out)[0].state_dict()
    for key, value in exported.items():
        assert offline[key].dtype == value.dtype == torch.float32, key
        assert torch.equal(offline[key], value), key


def _cut_and_resume(shards: Path, root: Path, name: str, *args: str, procs: int, base, extra):
    """Copy run ``name`` as it was after its first checkpoint, resume the copy to the end, and
    require the same final weights as the run that never stopped."""
    cut = root / f"{name}-cut"
    shutil.copytree(root / name, cut)
    first, *later = complete_tags(cut / "checkpoints")
    for tag in later:
        shutil.rmtree(cut / "checkpoints" / tag)
    shutil.rmtree(cut / "export")
    (cut / "summary.json").unlink()
    output = pretrain(shards, root, *args, "--resume", str(cut), procs=procs, base=base,
                      extra=[*extra, "tracking.enabled=false"])  # fmt: skip
    assert "resumed" in output and f"step {int(first.split('_')[1])}" in output
    full = load_exported(root / name / "export")[0].state_dict()
    resumed = load_exported(cut / "export")[0].state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resume diverged"
    return output


def test_one_process_trains_tracks_checkpoints_and_exports(sample_shards, tmp_path):
    output = pretrain(sample_shards, tmp_path, extra=["run.name=one", "tracking.register_as=tiny",
                                                      "tracking.system_metrics=2"])  # fmt: skip
    run_dir = tmp_path / "one"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 40 and summary["tokens"] == 40 * 8 * 128
    assert "step 40/40" in output and "tok/s" in output and "eta" in output

    client = _client(tmp_path)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["nucleo.arch"] == "transformer"
    assert run.data.params["train.max_steps"] == "40"
    assert run.data.tags["git.commit"]
    loss = _history(client, run.info.run_id, "train/loss")
    assert len(loss) == 8 and loss[-1][1] < loss[0][1] - 0.2, loss
    bpb = _history(client, run.info.run_id, "val/bits_per_base")
    assert [s for s, _ in bpb] == [0, 20, 40] and bpb[-1][1] < bpb[0][1] - 0.5, bpb
    for kingdom in ("archaea", "bacteria", "viral", "mitochondrion"):
        assert _history(client, run.info.run_id, f"val/bits_per_base/{kingdom}")
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_second", "train/ce"):
        assert _history(client, run.info.run_id, key), key
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "export"}
    _model_data_and_machine_are_tracked(client, run.info.run_id, sample_shards, run_dir, tmp_path)

    ckpt = run_dir / "checkpoints"
    assert complete_tags(ckpt) == ["step_00000020", "step_00000040"]
    model, _tokenizer, meta = load_exported(run_dir / "export")
    assert meta["trained"]["step"] == 40
    reference = state_from_checkpoint(ckpt, "step_00000040", load_config(run_dir / "config.yaml"))
    exported = model.state_dict()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)


def _model_data_and_machine_are_tracked(client, run_id, shards, run_dir, tmp_path) -> None:
    """The run's MLflow model (the export, registered as ``tracking.register_as``), its shard
    set as the training dataset, and system metrics sampled while it trained."""
    import hashlib

    from mlflow.artifacts import download_artifacts

    run = client.get_run(run_id)
    (output,) = run.outputs.model_outputs
    version = client.get_model_version("tiny", "1")
    assert version.run_id == run_id and client.get_logged_model(output.model_id).status == "READY"
    folder = Path(download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "dl")))
    assert (folder / "MLmodel").is_file() and "python_function" in (folder / "MLmodel").read_text()
    copied = folder / "artifacts" / "export" / "config.json"  # the serving contract
    assert copied.read_text() == (run_dir / "export" / "config.json").read_text()

    (entry,) = run.inputs.dataset_inputs
    manifest = json.loads((shards / "manifest.json").read_text())
    listed = sorted((s["path"], s["sha256"]) for k in manifest["kingdoms"].values()
                    for split in k.values() for s in split["shards"])  # fmt: skip
    digest = hashlib.sha256("".join(f"{p}\t{h}\n" for p, h in listed).encode()).hexdigest()
    assert entry.dataset.name == "sample" and entry.dataset.digest == digest[:16]
    assert json.loads(entry.dataset.source)["uri"] == shards.resolve().as_uri()
    assert {(t.key, t.value) for t in entry.tags} == {("mlflow.data.context", "training")}

    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        samples = _history(client, run_id, key)
        assert samples and all(v >= 0 for _, v in samples), key
        assert {s for s, _ in samples} <= set(range(41)), samples  # at training steps
    assert _history(client, run_id, "system/system_memory_usage_megabytes")[-1][1] > 0


@pytest.mark.parametrize("procs", [2])  # 1 process: the BPE kill-and-resume test below
def test_resume_continues_exactly_where_it_stopped(sample_shards, tmp_path, procs):
    output = pretrain(sample_shards, tmp_path, procs=procs, extra=["run.name=full"])
    # two processes train together
    assert output.count("exits successfully") == 2 and "2 rank(s)" in output
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["tokens"] == 40 * 2 * 8 * 128  # both ranks' micro-batches in every step
    client = _client(tmp_path)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["nucleo.world_size"] == "2"
    assert run.data.params["derived.global_batch_windows"] == "16"
    loss = _history(client, run.info.run_id, "train/loss")
    assert loss[-1][1] < loss[0][1] - 0.2
    # The same run interrupted after its step-20 checkpoint ends identical:
    output = _cut_and_resume(sample_shards, tmp_path, "full", procs=procs, base=TINY, extra=[])
    assert "step 25/40" in output and "step 5/40" not in output


def test_resume_continues_the_mlflow_run(sample_shards, tmp_path):
    pretrain(sample_shards, tmp_path, extra=["run.name=grow", "train.max_steps=20"])
    first = json.loads((tmp_path / "grow" / "summary.json").read_text())["mlflow_run_id"]
    # A new run into the same directory is refused, pointing at --resume (nothing overwritten).
    cmd = [sys.executable, "launch/pretrain.py", "--set", f"data.shards={sample_shards}",
           "--set", f"run.root={tmp_path}", "--set", "run.name=grow"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    pretrain(
        sample_shards, tmp_path, "--resume", str(tmp_path / "grow"), extra=["train.max_steps=30"]
    )
    summary = json.loads((tmp_path / "grow" / "summary.json").read_text())
    assert summary["mlflow_run_id"] == first and summary["step"] == 30
    client = _client(tmp_path)
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.tags["nucleo.resumed_at_step"] == "20"
    steps = [s for s, _ in _history(client, first, "train/loss")]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert "train.max_steps: 20 -> 30" in run.data.tags["nucleo.resume_changes"]
    # Resuming the finished run again trains nothing and leaves its checkpoint as it was.
    marker = tmp_path / "grow" / "checkpoints" / "step_00000030" / "COMPLETE"
    before = marker.read_text(), marker.stat().st_mtime_ns
    pretrain(
        sample_shards, tmp_path, "--resume", str(tmp_path / "grow"), extra=["train.max_steps=30"]
    )
    assert (marker.read_text(), marker.stat().st_mtime_ns) == before


SHORT_HYENA_SMALL = [
    "model.size=tiny", "model.max_len=256", "data.seq_len=256", "data.seq_len_warmup=64",
    "data.seq_len_warmup_steps=8", "data.num_workers=1", "train.max_steps=20",
    "train.micro_batch_size=4", "train.grad_accum=2", "train.warmup_steps=5",
    "train.log_every=5", "eval.every=10", "eval.windows_per_kingdom=4", "checkpoint.every=10",
]  # fmt: skip


def test_hyena_small_config_in_bf16_zero1_on_two_processes_resumes_and_exports(
    sample_shards, tmp_path
):
    """The README's GPU/Slurm config (hyena, ce+rc, bf16 weights, ZeRO-1), shortened: it
    trains in two processes, resumes exactly, and exports the fp32 masters on both paths."""
    config = ["--config", "experiments/configs/hyena_small.yaml"]
    output = pretrain(sample_shards, tmp_path, *config, procs=2, base=SHORT_HYENA_SMALL,
                      extra=["run.name=hs"])  # fmt: skip
    on = launch_env(2)["DS_ACCELERATOR"]
    assert f"2 rank(s) on {on} (bf16 weights, ZeRO-1" in output, output[-2000:]
    summary = json.loads((tmp_path / "hs" / "summary.json").read_text())
    client = _client(tmp_path)
    loss = _history(client, summary["mlflow_run_id"], "train/loss")
    assert len(loss) == 4 and loss[-1][1] < loss[0][1] - 0.1, loss
    assert _history(client, summary["mlflow_run_id"], "train/rc")
    bpb = summary["final_validation"]["val/bits_per_base"]
    assert 1.0 < bpb < 2.9, bpb  # learned something (3.1 at initialisation)
    _cut_and_resume(sample_shards, tmp_path, "hs", *config, procs=2, base=SHORT_HYENA_SMALL,
                    extra=[])  # fmt: skip
    _nucleo_export_equals(tmp_path / "hs", tmp_path / "hs-offline")


def test_caduceus_in_bf16_zero3_on_two_processes_resumes_and_exports(sample_shards, tmp_path):
    """The state-space family under ZeRO-3 (parameters partitioned across the two processes,
    bf16 weights): ``--arch caduceus`` alone picks its objective, masked-LM; the loss falls,
    validation scores fixed masks, a resumed run ends identical, both exports agree."""
    base = ["model.d_model=32", "model.n_layers=2", *TINY[3:]]
    extra = [
        "engine.zero_stage=3",
        "engine.precision=bf16",
        "engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
    ]
    output = pretrain(sample_shards, tmp_path, "--arch", "caduceus", procs=2, base=base,
                      extra=[*extra, "run.name=cad"])  # fmt: skip
    assert "mlm" in output and "(bf16 weights, ZeRO-3" in output
    summary = json.loads((tmp_path / "cad" / "summary.json").read_text())
    client = _client(tmp_path)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["losses"] == "mlm", run.data.params.get("losses")
    loss = _history(client, run.info.run_id, "train/mlm")
    assert loss[-1][1] < loss[0][1] - 0.2, loss
    val = _history(client, run.info.run_id, "val/mlm/bits_per_token")
    assert [s for s, _ in val] == [0, 20, 40] and val[-1][1] < val[0][1] - 0.3, val
    assert _history(client, run.info.run_id, "train/mlm/accuracy")
    model, _tokenizer, meta = load_exported(tmp_path / "cad" / "export")
    assert meta["arch"] == "caduceus" and not model.causal
    _cut_and_resume(sample_shards, tmp_path, "cad", "--arch", "caduceus", procs=2, base=base,
                    extra=extra)  # fmt: skip
    _nucleo_export_equals(tmp_path / "cad", tmp_path / "cad-offline")


HYENA = ["model.d_model=32", "model.n_layers=2", "model.max_len=128"]
FAMILY_MODELS = {
    "mamba": ["model.d_model=32", "model.n_layers=2"],
    "multires": ["model.d_model=32", "model.n_layers=2", "model.max_len=128"],
    "hybrid": ["model.d_model=32", "model.n_layers=3", "model.hyena.max_len=128",
               "model.attention.n_heads=2"],
}  # fmt: skip
# each launch covers another precision path (all: tests/studies/test_precision.py)
FAMILY_PRECISION = {
    "mamba": ["engine.precision=bf16", "engine.zero_stage=2"],
    "multires": ["engine.precision=bf16", "engine.zero_stage=1"],
    "hybrid": ["model.autocast=bf16"],
}


@pytest.mark.parametrize("arch", sorted(FAMILY_MODELS))
def test_every_causal_family_trains_through_deepspeed(sample_shards, tmp_path, arch):
    """``deepspeed launch/pretrain.py --arch A --losses ce`` on the genomes: loss falls, the
    export loads. (transformer and hyena are covered above, caduceus with mlm.)"""
    base = [*FAMILY_MODELS[arch], *TINY[3:]]
    base = [s.replace("max_steps=40", "max_steps=30") for s in base]
    pretrain(sample_shards, tmp_path, "--arch", arch, "--losses", "ce", base=base,
             extra=["run.name=fam", "eval.every=30", "checkpoint.every=30",
                    *FAMILY_PRECISION[arch]])  # fmt: skip
    summary = json.loads((tmp_path / "fam" / "summary.json").read_text())
    client = _client(tmp_path)
    loss = _history(client, summary["mlflow_run_id"], "train/loss")
    assert loss[-1][1] < loss[0][1] - 0.2, loss
    model, _tokenizer, meta = load_exported(tmp_path / "fam" / "export")
    assert meta["arch"] == arch and model.causal


@pytest.mark.parametrize(
    "arch,losses,procs", [("hyena", "ce,rc,cgr", 2), ("transformer", "ce,ph", 1)]
)  # (ce,rc in one process: tests/studies/test_sweep.py)
def test_combined_losses_train_through_deepspeed(
    sample_shards, masked_shards, tmp_path, arch, losses, procs
):
    """``deepspeed launch/pretrain.py --arch hyena --losses ce,rc,cgr`` (and ce,ph): each
    component's curve reaches MLflow, with its time per call; ph at its cadence. The hyena run
    trains on a real soft-masked genome with repeats down-weighted (data.repeat_weight=0.1, rc
    keeping its own 1.0) and validates repeat and other bases apart."""
    model = HYENA if arch == "hyena" else TINY[:3]
    base = [s.replace("max_steps=40", "max_steps=20") for s in [*model, *TINY[3:]]]
    extra = ["run.name=mix", "eval.every=20", "checkpoint.every=20", "loss.ph.every=5"]
    shards = sample_shards
    if arch == "hyena":
        shards = masked_shards
        extra += ["data.repeat_weight=0.1", "loss.rc.repeat_weight=1.0"]
    pretrain(shards, tmp_path, "--arch", arch, "--losses", losses, procs=procs,
             base=base, extra=extra)  # fmt: skip
    summary = json.loads((tmp_path / "mix" / "summary.json").read_text())
    client = _client(tmp_path)
    run_id = summary["mlflow_run_id"]
    total = _history(client, run_id, "train/loss")
    assert total[-1][1] < total[0][1], total
    for name in losses.split(","):
        assert _history(client, run_id, f"train/{name}"), name
        assert _history(client, run_id, f"train/time/{name}"), name
        assert [s for s, _ in _history(client, run_id, f"val/{name}")] == [0, 20], name
    if "ph" in losses:
        assert _history(client, run_id, "train/ph/seconds")
        assert _history(client, run_id, "train/ph/h1")
        assert not _history(client, run_id, "val/repeat/bits_per_base")  # no mask kept
    else:
        assert _history(client, run_id, "train/cgr/fcgr")
        share = _history(client, run_id, "val/repeat_fraction")[-1][1]
        repeat = _history(client, run_id, "val/repeat/bits_per_base")[-1][1]
        other = _history(client, run_id, "val/non_repeat/bits_per_base")[-1][1]
        overall = _history(client, run_id, "val/bits_per_base")[-1][1]
        assert 0.05 < share < 0.6
        assert share * repeat + (1 - share) * other == pytest.approx(overall, rel=1e-5)


def _launch(shards: Path, root: Path, *args: str, extra: list[str], base: list[str]):
    """``deepspeed launch/pretrain.py`` in its own process group, not waited for."""
    cmd = [DEEPSPEED, "--num_gpus", "1", "--master_port", str(_port()), "launch/pretrain.py"]
    cmd += list(args)
    for item in [*base, f"data.shards={shards}", f"run.root={root}", *extra]:
        cmd += ["--set", item]
    env = launch_env(1)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def test_bpe_run_with_mixture_and_rc_is_killed_and_resumes_without_repeating_data(
    sample_shards, sample_bpe, tmp_path
):
    """The data pipeline's done-when run, on the sample: a BPE tokenizer, a temperature kingdom
    mixture, RC augmentation and a seq-len warm-up; killed (SIGKILL) after a checkpoint, then
    resumed: it must end bit-identical to the uninterrupted run, which it can only do if the
    loader continues exactly where the checkpoint left it (no window repeated or skipped).
    Validation is in bits per base, and the run and its export carry the tokenizer."""
    base = [s.replace("max_steps=40", "max_steps=120") for s in TINY]
    base = [s.replace("eval.every=20", "eval.every=60") for s in base]
    extra = [
        "data.tokenizer=bpe", f"data.tokenizer_options.path={sample_bpe}",
        "data.mixture=temperature", "data.mixture_alpha=0.3", "data.rc_prob=0.5",
        "data.seq_len_warmup=32", "data.seq_len_warmup_steps=30", "train.grad_accum=2",
    ]  # fmt: skip
    pretrain(sample_shards, tmp_path, "--losses", "ce", base=base, extra=[*extra, "run.name=full"])

    proc = _launch(sample_shards, tmp_path, "--losses", "ce", base=base,
                   extra=[*extra, "run.name=killed"])  # fmt: skip
    ckpt = tmp_path / "killed" / "checkpoints"
    try:
        deadline = time.time() + 300
        while not complete_tags(ckpt) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert not (tmp_path / "killed" / "summary.json").exists()
    killed_at = complete_tags(ckpt)[-1]
    output = pretrain(sample_shards, tmp_path, "--resume", str(tmp_path / "killed"),
                      "--losses", "ce", base=base, extra=extra)  # fmt: skip
    assert f"step {int(killed_at.split('_')[1])}" in output and "resumed" in output

    full = load_exported(tmp_path / "full" / "export")[0].state_dict()
    resumed, tokenizer, meta = load_exported(tmp_path / "killed" / "export")
    assert all(torch.equal(full[k], resumed.state_dict()[k]) for k in full), "resume diverged"
    assert tokenizer.name == "bpe" and meta["vocab_size"] == 256
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    # warm-up: steps 0-14 at 32 tokens, 15-29 at 64, then 128 (16 windows per step)
    assert summary["tokens"] == 16 * (15 * 32 + 15 * 64 + 90 * 128)
    client = _client(tmp_path)
    run = summary["mlflow_run_id"]
    bpb = _history(client, run, "val/bits_per_base")
    assert [s for s, _ in bpb] == [0, 60, 120] and bpb[-1][1] < bpb[0][1], bpb
    assert {a.path for a in client.list_artifacts(run)} >= {"tokenizer.json", "config.yaml"}
    params = client.get_run(run).data.params
    assert 0 < float(params["derived.kingdom_mixture.viral"]) < 0.5


def test_a_corrupt_shard_stops_the_run_by_name_or_is_skipped_and_counted(sample_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    bad = sorted((shards / "bacteria").glob("train-*.tar"))[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 10])
    base = [s.replace("max_steps=40", "max_steps=10") for s in TINY]
    cmd_extra = ["eval.every=0", "checkpoint.every=0"]
    with pytest.raises(AssertionError, match=rf"shard {re.escape(str(bad))} is unreadable"):
        pretrain(shards, tmp_path, base=base, extra=[*cmd_extra, "run.name=stop"])
    pretrain(shards, tmp_path, base=base,
             extra=[*cmd_extra, "run.name=skip", "data.on_bad_shard=skip"])  # fmt: skip
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    skipped = _history(_client(tmp_path), summary["mlflow_run_id"], "train/data/skipped_shards")
    assert skipped and skipped[-1][1] >= 1, skipped
