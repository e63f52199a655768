"""Schedule, parameter groups, DeepSpeed config, progress line and tracking (no launcher)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

import pytest
from mlflow.tracking import MlflowClient

from nucleo.core.progress import Progress, duration, rate
from nucleo.train.components import ARCHITECTURES
from nucleo.train.config import load_config
from nucleo.train.engine import TrainConfig, deepspeed_config, lr_lambda, parameter_groups
from nucleo.train.tracking import Tracker, TrackingConfig


def test_warmup_then_cosine_to_the_floor():
    train = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(train)
    assert f(0) < f(5) < f(9) < 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=1e-6)
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)


def test_no_decay_for_norms_and_tied_embeddings():
    cfg = load_config(overrides=["model.d_model=32", "model.n_layers=1"])
    model = ARCHITECTURES.build("transformer", cfg.model, vocab_size=9)
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert model.embed.weight in no_decay["params"]
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_deepspeed_batch_arithmetic():
    cfg = load_config(
        overrides=[
            "train.micro_batch_size=4",
            "train.grad_accum=3",
            "engine.zero_stage=2",
            "engine.precision=bf16",
        ]
    )
    ds = deepspeed_config(cfg.train, cfg.engine, world_size=2)
    assert ds["train_batch_size"] == 24
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]


def test_progress_line_has_step_loss_throughput_and_eta():
    out = io.StringIO()
    progress = Progress(total_steps=100, start_step=0, tokens_per_step=1000, stream=out)
    progress.update(10, 1.2345, 1e-3)
    line = out.getvalue()
    for part in ("step 10/100", "loss 1.2345", "tok/s", "eta", "lr 1.00e-03"):
        assert part in line
    assert duration(125) == "2m05s" and duration(3725) == "1h02m" and rate(14123) == "14.1k"


def _bare_model(folder, path, spec):
    """A model writer without a flavour: the Tracker's part is MLflow's logged model."""
    path.mkdir()
    (path / "MLmodel").write_text(f"model_id: {spec.model_id}\nsource: {folder}\n")


def _unwritable_model(folder, path, spec):
    raise OSError("no space left on device")


def test_tracker_logs_params_metrics_artifacts_models_and_the_machine(tmp_path, capsys):
    """Besides params, metrics and artifacts: the model (registered as ``register_as``; a
    writer that fails is skipped at once, it is not the store) and system metrics, sampled at
    the latest training step."""
    cfg = TrackingConfig(experiment="t", register_as="m", system_metrics=0.1)
    tracker = Tracker(cfg, tmp_path, enabled=True)
    run_id = tracker.start("run-a", None, {"nucleo.arch": "transformer"})
    tracker.log_params({"train": {"lr": 0.001, "betas": [0.9, 0.95]}})
    for step in range(3):
        tracker.log_metrics({"train/loss": 2.0 - step, "val/bits_per_base/viral": 1.9}, step)
    (tmp_path / "config.yaml").write_text("arch: transformer\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    time.sleep(0.3)  # a few samples of the machine
    tracker.log_model(tmp_path / "export", _bare_model)
    tracker.log_model(tmp_path / "export", _unwritable_model)
    started = time.monotonic()
    tracker.end()
    assert time.monotonic() - started < 5
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.betas"] == "0.9,0.95"
    assert run.data.tags["nucleo.arch"] == "transformer" and run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [2.0, 1.0, 0.0]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    models = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert sorted(m.status for m in models) == ["FAILED", "READY"]
    (version,) = client.search_model_versions("name='m'")
    assert version.run_id == run_id and int(version.version) == 1
    cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert 2 in {m.step for m in cpu} <= {0, 2}  # before training: step 0
    err = capsys.readouterr().err
    assert "registered as models:/m/1" in err and "no space left on device" in err
    assert "skipped" in err and "unreachable" not in err


def test_a_broken_store_warns_once_and_lets_training_go_on(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = TrackingConfig(uri=f"sqlite:///{blocker}/x/mlflow.db", timeout=2)
    tracker = Tracker(cfg, tmp_path, enabled=True)
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tracker.start("r", None, {}) is None
    for step in range(100):
        tracker.log_metrics({"a": 1.0}, step)  # never waits
    tracker.log_model(tmp_path, lambda *_: None)  # queued; a store that is down is not waited for
    tracker.end()
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.count("unreachable") == 1 and "training goes on" in err
    assert "did not take the run's last" in err


@pytest.mark.slow
def test_an_unreachable_server_costs_start_up_seconds_not_minutes(tmp_path, capsys):
    """A closed port: MLflow's own retries took ~255 s before; now start gives up within
    tracking.timeout and keeps retrying in the background."""
    tracker = Tracker(TrackingConfig(uri="http://127.0.0.1:9", timeout=3), tmp_path, True)
    started = time.monotonic()
    assert tracker.start("r", None, {}) is None
    tracker.log_metrics({"a": 1.0}, 1)
    tracker.end()
    assert time.monotonic() - started < 15
    assert "unreachable" in capsys.readouterr().err


def test_rank_other_than_zero_logs_nothing(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path, enabled=False)
    assert tracker.start("r", None, {}) is None
    tracker.log_metrics({"a": 1.0}, 1)
    tracker.end()
    assert not (tmp_path / "mlflow.db").exists()


def test_threads_are_shared_between_local_processes(monkeypatch):
    from nucleo.core.runtime import configure_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "8")  # inherited from a parent: must not survive
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(4)))
    assert configure_threads() == 2
    import os

    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert configure_threads() == 3


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from nucleo.train.store import resolve_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_uri(None, tmp_path, "sqlite:///old.db") == "sqlite:///old.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri(None, tmp_path, "sqlite:///old.db") == "http://127.0.0.1:5000"
    assert resolve_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


@pytest.mark.slow
def test_a_store_failing_mid_run_keeps_the_metrics_and_sends_them_when_it_is_back(tmp_path, capsys):
    tracker = Tracker(TrackingConfig(timeout=15), tmp_path, enabled=True)
    run_id = tracker.start("r", None, {})
    tracker.log_metrics({"a": 0.0}, 0)
    tracker.flush()
    db = tmp_path / "mlflow.db"
    db.rename(tmp_path / "away.db")  # the store disappears under the run
    db.mkdir()
    for step in range(1, 4):
        tracker.log_metrics({"a": float(step)}, step)
        tracker.flush()  # returns at once while the store is down
    deadline = time.monotonic() + 10
    while "unreachable" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.1)  # the thread has noticed

    def come_back() -> None:
        db.rmdir()
        (tmp_path / "away.db").rename(db)

    threading.Timer(3.0, come_back).start()  # back only while the run's end waits for it
    started = time.monotonic()
    tracker.end()
    assert time.monotonic() - started < 8  # retried every 2 s meanwhile, not after minutes
    history = MlflowClient(tracking_uri=tracker.uri).get_metric_history(run_id, "a")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    assert "answers again" in capsys.readouterr().err


def test_metrics_logged_while_a_batch_is_in_flight_are_sent_too(tmp_path):
    """A slow store: metrics that arrive while a batch is being sent were dropped with it (the
    last validation of a run went missing on a loaded CI machine)."""
    tracker = Tracker(TrackingConfig(timeout=20), tmp_path, enabled=True)
    run_id = tracker.start("r", None, {})
    send = tracker._client.log_batch
    in_flight = threading.Event()

    def slow_send(*args, **kwargs):
        in_flight.set()
        time.sleep(0.5)
        return send(*args, **kwargs)

    tracker._client.log_batch = slow_send
    tracker.log_metrics({"a": 0.0}, 0)
    assert in_flight.wait(5)
    for step in range(1, 4):
        tracker.log_metrics({"a": float(step)}, step)
    tracker.end()
    history = MlflowClient(tracking_uri=tracker.uri).get_metric_history(run_id, "a")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_a_store_on_a_full_disk_is_named_so_and_a_failed_run_does_not_wait_for_it(
    tmp_path, small_disk, capsys
):
    """The run directory (and its SQLite store) on a disk that fills: the warning says the
    disk is full, not that the store is unreachable, and the failing run ends in seconds."""
    disk = small_disk("2m")
    if disk is None:
        pytest.skip("needs a tmpfs mount (root)")
    tracker = Tracker(TrackingConfig(timeout=20), disk, enabled=True)
    assert tracker.start("r", None, {})
    (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 4096))
    for step in range(2000):
        tracker.log_metrics({f"m{i}": float(i) for i in range(20)}, step)
    deadline = time.monotonic() + 20
    while "MLflow store" not in (err := capsys.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cannot write: its disk is full" in err and "unreachable" not in err, err
    started = time.monotonic()
    tracker.end("FAILED")
    assert time.monotonic() - started < 5


def test_resuming_a_run_missing_from_the_store_opens_a_linked_new_run(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path, enabled=True)
    new_id = tracker.start("r", "0123456789abcdef0123456789abcdef", {"nucleo.arch": "x"})
    assert new_id and new_id != "0123456789abcdef0123456789abcdef"
    tracker.end()
    run = MlflowClient(tracking_uri=tracker.uri).get_run(new_id)
    assert run.data.tags["nucleo.resumed_from_run"] == "0123456789abcdef0123456789abcdef"


SHM_PROBE = """
import os, sys, torch
import nucleo.train.engine as engine
seen = {}
unlink = engine._unlink_shm_buffer
def record(device):
    seen["created"] = os.path.exists(engine.shm_buffer_path(0))
    unlink(device)
engine._unlink_shm_buffer = record
engine.setup_distributed(engine.EngineConfig(device="cpu"))
total = torch.ones(3)
torch.distributed.all_reduce(total)
print(seen["created"], os.path.exists(engine.shm_buffer_path(0)), total.sum().item())
"""


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory")
def test_deepspeeds_shared_memory_workspace_does_not_outlive_the_process():
    """DeepSpeed leaves 67 MB per rank in /dev/shm after every run unless its name is unlinked."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, "-c", SHM_PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "False", "3.0"]


ALLOCATOR_PROBE = """
import sys, torch
from nucleo.core.runtime import configure_allocator
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
print(configure_allocator(sys.argv[1]))
x = torch.ones(64 * 2**20)  # 256 MB: above glibc's mmap threshold
del x
print(rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_cached_allocator_keeps_freed_memory_and_system_returns_it():
    """ "cached" keeps a freed 256 MB activation for reuse; glibc's default unmaps it."""
    rss = {}
    for mode in ("system", "cached"):
        out = subprocess.run(
            [sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        took, rss[mode] = out.stdout.split()
        assert took == "True"
    assert float(rss["cached"]) > float(rss["system"]) + 200, rss
    from nucleo.core.runtime import configure_allocator

    with pytest.raises(ValueError, match="'cached' or 'system'"):
        configure_allocator("jemalloc")


def test_stale_jit_build_locks_are_found(tmp_path, monkeypatch):
    """A killed DeepSpeed start leaves a JIT lock that hangs every later start: it is named."""
    import time

    from nucleo.train.engine import stale_jit_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    new = tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (old, new):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert stale_jit_locks() == [str(old)]


def test_a_world_of_one_made_up_by_a_parent_is_not_inherited(monkeypatch):
    """RANK & co. that a parent made up for its own world of one (a sweep's parent, a script
    that trained, the test process) are replaced in a child; a launcher's are kept."""
    from nucleo.train.engine import _SOLO, _inherited_solo_world

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29517")
    monkeypatch.setenv(_SOLO, "1:29517")  # pid 1 made it: not this process
    assert _inherited_solo_world()
    monkeypatch.setenv(_SOLO, f"{os.getpid()}:29517")  # this process made it
    assert not _inherited_solo_world()
    monkeypatch.setenv(_SOLO, "1:29517")
    monkeypatch.setenv("MASTER_PORT", "29600")  # a launcher set its own rendezvous
    assert not _inherited_solo_world()
