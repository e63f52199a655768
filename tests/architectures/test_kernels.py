"""Loud kernels and one device decision.

``model.kernels``: on CPU the kernel packages are never imported; on CUDA ``auto`` falls back
with one line carrying the import error and the install command, ``required`` stops with the
same reason, ``off`` never loads; kernel constraints are checked when the config resolves.
Devices: ``auto`` everywhere, one-line errors for CUDA asked for and absent, DeepSpeed's
accelerator agreeing with the model's device. (The kernels against the pure-PyTorch paths on
a GPU: the ``gpu`` tests in test_architectures.py and test_selective_scan.py.)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from architectures import kernels
from architectures.kernels import CAUSAL_CONV1D, FLASH_ATTN, SELECTIVE_SCAN, check_kernels, use
from architectures.transformer import flash_unsuitable
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.core.device import DeviceError, resolve, resolve_for_training
from nucleo.core.schema import ConfigError
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.engine import deepspeed_config
from tests.conftest import ROOT

CUDA = torch.device("cuda")  # a device object needs no GPU; nothing is allocated on it here
BROKEN = 'raise ImportError("libcudart.so.12: cannot open shared object file")\n'


@pytest.fixture
def broken_causal_conv1d(tmp_path, monkeypatch):
    """An installed causal-conv1d whose import fails the way a CUDA mismatch does."""
    package = tmp_path / "causal_conv1d"
    package.mkdir()
    (package / "__init__.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "causal_conv1d", raising=False)
    kernels.forget()
    yield
    kernels.forget()


def _model(arch: str, *sets: str):
    cfg = load_config(arch=arch, overrides=["model.d_model=32", "model.n_layers=1", *sets])
    return build_model(arch, cfg.model, CharTokenizer())


def test_on_cpu_no_kernel_package_is_imported():
    kernels.forget()
    for kernel in kernels.KERNELS.values():
        assert use(kernel, torch.device("cpu"), "auto") is None
    assert kernels._LOADED == {}
    model = _model("mamba")
    assert check_kernels(model, torch.device("cpu"), "auto") == []
    model(torch.randint(0, 4, (1, 12)))  # the pure-PyTorch path runs


def test_auto_falls_back_once_with_the_import_error_and_how_to_install(
    broken_causal_conv1d, caplog
):
    assert CAUSAL_CONV1D.installed()
    with caplog.at_level(logging.WARNING, logger="nucleo"):
        for _ in range(3):
            assert use(CAUSAL_CONV1D, CUDA, "auto") is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "nucleo"]
    assert "causal-conv1d not used (ImportError: libcudart.so.12" in line
    assert "PyTorch's depthwise conv1d" in line
    assert "pip install -e '.[gpu]' --no-build-isolation" in line


def test_required_stops_with_the_reason(broken_causal_conv1d):
    with pytest.raises(
        ConfigError, match=r"model\.kernels: required, but causal-conv1d.*libcudart"
    ):
        use(CAUSAL_CONV1D, CUDA, "required")


def test_off_never_loads(broken_causal_conv1d):
    assert use(CAUSAL_CONV1D, CUDA, "off") is None and kernels._LOADED == {}


def test_required_on_cpu_is_refused_before_training():
    model = _model("mamba", "model.kernels=required")
    with pytest.raises(ConfigError, match="CUDA-only"):
        check_kernels(model, torch.device("cpu"), "required")
    assert [k.name for k in kernels.kernels_of(model)] == ["causal_conv1d", "selective_scan"]
    assert kernels.kernels_of(_model("hyena")) == []  # nothing to require
    assert check_kernels(_model("hyena"), torch.device("cpu"), "required") == []


def test_a_missing_package_is_not_installed_and_says_so(monkeypatch, caplog):
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"):
        monkeypatch.setitem(sys.modules, name, None)
    kernels.forget()
    with caplog.at_level(logging.WARNING, logger="nucleo"):
        assert use(SELECTIVE_SCAN, CUDA, "auto") is None
    assert "mamba-ssm not used (ModuleNotFoundError" in caplog.text
    assert "chunked pure-PyTorch selective scan" in caplog.text
    kernels.forget()


@pytest.mark.parametrize(
    "arch,sets,key",
    [
        ("mamba", ["model.d_conv=5"], "model.d_conv"),
        ("caduceus", ["model.d_conv=1"], "model.d_conv"),
        ("mamba", ["model.d_state=512"], "model.d_state"),
        ("transformer", ["model.d_model=32", "model.n_heads=8"], "model.n_heads"),  # heads of 4
        ("hybrid", ["model.pattern=[hyena,mamba]", "model.mamba.d_conv=6"], "model.mamba.d_conv"),
    ],
)
def test_kernel_constraints_are_checked_when_the_config_resolves(arch, sets, key):
    with pytest.raises(ConfigError) as err:
        load_config(arch=arch, overrides=[*sets, "model.kernels=required"])
    assert err.value.key == key and "model.kernels=auto" in str(err.value)
    load_config(arch=arch, overrides=sets)  # auto: that layer runs in PyTorch instead


def test_under_auto_an_unsuitable_layer_falls_back_without_importing(caplog):
    kernels.forget()
    model = _model("mamba", "model.d_conv=5")
    mixer = model.blocks[0].mixer
    assert mixer.conv_unsuitable and "widths 2-4" in mixer.conv_unsuitable
    with caplog.at_level(logging.WARNING, logger="nucleo"):
        assert use(CAUSAL_CONV1D, CUDA, "auto", mixer.conv_unsuitable) is None
    assert "widths 2-4" in caplog.text and "pip install" not in caplog.text
    assert kernels._LOADED == {}
    model(torch.randint(0, 4, (1, 12)))


def test_flash_attention_constraints():
    assert flash_unsuitable(64, torch.bfloat16) is None
    assert "multiples of 8" in flash_unsuitable(36)
    assert "multiples of 8" in flash_unsuitable(512)
    assert "bf16" in flash_unsuitable(64, torch.float32)
    assert FLASH_ATTN.package == "flash-attn"


# ------------------------------------------------------------------------------------ devices


def test_device_choices_and_one_line_errors():
    assert resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"--device: 'gpu' is not a device; choose auto, cpu"):
        resolve("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"--device: cuda:1 asked for, but PyTorch sees no"):
            resolve("cuda:1")


def test_training_device_agrees_with_deepspeeds_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert resolve_for_training("auto", 0) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"engine\.device=cuda but DS_ACCELERATOR=cpu"):
        resolve_for_training("cuda", 0)
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    with pytest.raises(DeviceError, match="DS_ACCELERATOR=xpu: nucleo trains on cpu or cuda"):
        resolve_for_training("auto", 0)
    monkeypatch.delenv("DS_ACCELERATOR")
    assert resolve_for_training("cpu", 0) == torch.device("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # the decision, for DeepSpeed to read
    with pytest.raises(ConfigError, match=r"engine.device: 'cuda:1' is not valid"):
        load_config(overrides=["engine.device=cuda:1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cuda_asked_for_on_a_cpu_machine_is_a_one_line_error(tmp_path, capsys):
    assert main(["embed", "x", "y.fa", "--device", "cuda", "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nucleo: error: --device: cuda asked for") and "\n" not in err
    cmd = [sys.executable, "launch/pretrain.py", "--set", "engine.device=cuda"]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "nucleo: error: engine.device: cuda asked for, but PyTorch sees no CUDA GPU "
        f"(torch {torch.__version__}, a CPU-only build); use cpu or auto"
    ]


def test_extra_deepspeed_settings_merge_and_may_not_contradict_nucleos():
    cfg = load_config(
        overrides=["engine.deepspeed={zero_optimization: {stage3_param_persistence_threshold: 0}}",
                   "engine.zero_stage=3"]
    )  # fmt: skip
    ds = deepspeed_config(cfg.train, cfg.engine, 1)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    with pytest.raises(ConfigError, match=r"engine.deepspeed.bf16: set by nucleo from engine."):
        load_config(overrides=["engine.deepspeed={bf16: {enabled: true}}"])


def test_flash_attention_needs_bf16_activations_under_required():
    model = _model("transformer", "model.n_heads=4")  # heads of 8
    with pytest.raises(ConfigError, match="fp32 activations"):
        check_kernels(model, CUDA, "required", bf16=False)
    kernels.forget()
    assert check_kernels(model, CUDA, "auto", bf16=False) == []  # quietly SDPA, nothing loaded
    assert kernels._LOADED == {}
