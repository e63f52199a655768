"""Extension by plugins: a separately installed distribution (tests/fixtures/plugin) adds an
architecture, a loss, a tokenizer and a task through entry points, without touching nucleo;
the registries find them, ``nucleo list`` shows them, one DeepSpeed training run uses all of
the first three (and the compute counter uses the family's own FLOP formula), and ``nucleo tasks
build`` builds the task. A broken plugin is a warning, not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # pip-builds and installs a distribution; trains it

PLUGIN = ROOT / "tests" / "fixtures" / "plugin"
SAMPLE = ROOT / "data_pipeline" / "sample"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin distribution, pip-installed (a real wheel build) into a temporary folder."""
    site = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-src")
    subprocess.run(["cp", "-r", f"{PLUGIN}/.", str(build)], check=True)  # builds write egg-info
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(build)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert list(site.glob("nucleo_tinyconv-*.dist-info/entry_points.txt"))
    return site


def _nucleo(site: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "nucleo", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_nucleo_list_shows_the_plugins_components(plugin_site):
    result = _nucleo(plugin_site, "list")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("tinyconv", "tiny_ce", "char2", "gc_content"):
        assert f"  {name} " in result.stdout, name


def test_a_plugin_family_loss_and_tokenizer_train_and_export(plugin_site, sample_shards, tmp_path):
    result = _nucleo(
        plugin_site, "pretrain", "--arch", "tinyconv", "--losses", "tiny_ce",
        "--set", "data.tokenizer=char2", "--set", f"data.shards={sample_shards}",
        "--set", "data.seq_len=64", "--set", "train.max_steps=3", "--set", "train.log_every=1",
        "--set", "train.micro_batch_size=4", "--set", "train.warmup_steps=1",
        "--set", "eval.every=0", "--set", "checkpoint.every=3", "--set", "run.name=plug",
        "--set", f"run.root={tmp_path / 'runs'}", "--set", "model.kernel=3",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "plug"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3
    assert summary["flops"] > 0  # from ConvMixer.flops, with no warning about a missing formula
    assert "has no formula" not in result.stderr
    export = json.loads((run / "export" / "config.json").read_text())
    assert export["arch"] == "tinyconv" and export["model"]["kernel"] == 3
    assert json.loads((run / "export" / "nucleo_tokenizer.json").read_text())["type"] == "char2"


def test_a_plugin_task_builds(plugin_site, tmp_path):
    genomes = [SAMPLE / "viral" / "lambda.fasta.gz", SAMPLE / "viral" / "NC_001802.fna.gz"]
    args = ["tasks", "build", "gc_content", "--out", str(tmp_path / "gc")]
    args += ["--option", "genomes=" + json.dumps([str(g) for g in genomes])]
    args += ["--option", "train_per_class=10", "--option", "test_per_class=5"]
    result = _nucleo(plugin_site, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "task gc_content: 2 classes" in result.stdout
    info = json.loads((tmp_path / "gc" / "task.json").read_text())
    assert info["classes"] == ["at_rich", "gc_rich"]
    bad = _nucleo(plugin_site, "tasks", "build", "gc_content", "--out", str(tmp_path / "x"),
                  "--shards", "somewhere")  # fmt: skip
    assert bad.returncode == 2
    assert "task gc_content takes no option shards; it takes genomes, length" in bad.stderr


def test_a_broken_plugin_is_a_one_line_warning(tmp_path):
    """A plugin whose module fails to import does not take nucleo down."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nucleo.losses]\nbroken = broken_plugin_module\n")
    (site / "broken_plugin_module.py").write_text("raise ImportError('needs a missing library')\n")
    result = _nucleo(site, "list")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss plugin 'broken' (broken_plugin_module, from broken-plugin) was not loaded" in (
        result.stderr
    )
    assert "  ce " in result.stdout
