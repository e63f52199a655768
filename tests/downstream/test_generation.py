"""Fast generation: cached and uncached sampling give the same tokens for a seed (sampling and
greedy, prompts of different lengths), greedy at temperature 0 from the command line, and a
family without incremental state falls back to recomputing."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from architectures.layers import Block, LanguageModel, ModelConfig
from data_pipeline.readers import read_sequences
from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.downstream.generate import sample
from nucleo.studies.precision import TINY
from nucleo.train.components import build_model
from nucleo.train.config import load_config
from nucleo.train.export import export_model, load_exported
from tests.architectures.test_architectures import CAUSAL, _model

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [b"ACG", b"ACGTTGCAAC", b""]  # three lengths, one empty (a uniform first base)


@pytest.mark.parametrize("arch", CAUSAL)
def test_cached_and_uncached_sampling_give_the_same_tokens(arch):
    model, tok = _model(arch, TINY[arch]), CharTokenizer()
    for temperature in (1.0, 0.0):
        settings = {"temperature": temperature, "top_k": 3, "seed": 5, "window": 64}
        cached = sample(model, tok, 3, 16, PROMPTS, **settings)
        assert cached == sample(model, tok, 3, 16, PROMPTS, cache=False, **settings)
        assert [len(s) for s in cached] == [16] * 3 and all(set(s) <= set(b"ACGT") for s in cached)
    # greedy: a sequence batched with shorter prompts is what it is alone
    alone = sample(model, tok, 1, 16, PROMPTS[1], temperature=0.0, window=64)
    assert alone[0] == cached[1]


class _Pointwise(nn.Module):
    """A mixer without incremental state (as a plugin's may be)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Plain(LanguageModel):
    def __init__(self) -> None:
        cfg = ModelConfig(d_model=16, n_layers=1)
        super().__init__(cfg, 9, [Block(_Pointwise(16), 16, 2.0)])


def test_a_family_without_incremental_state_falls_back_with_one_line(caplog):
    torch.manual_seed(0)
    model, tok = _Plain().eval(), CharTokenizer()
    with caplog.at_level(logging.WARNING, logger="nucleo"):
        cached = sample(model, tok, 2, 12, b"ACGT", seed=3)
    assert "no cache" in caplog.text and "_Pointwise has no prefill/step" in caplog.text
    assert cached == sample(model, tok, 2, 12, b"ACGT", seed=3, cache=False)


def test_temperature_zero_is_greedy_from_the_command_line(tmp_path):
    cfg = load_config(arch="transformer", overrides=TINY["transformer"])
    torch.manual_seed(0)
    model = build_model(cfg.arch, cfg.model, CharTokenizer())
    export = export_model(model.state_dict(), cfg, CharTokenizer(), tmp_path / "export")
    runs = {}
    for name, extra in {"a": ["--seed", "1"], "b": ["--seed", "2", "--no-cache"]}.items():
        out = tmp_path / f"{name}.fa"
        argv = ["generate", str(export), "--out", str(out), "--num", "3", "--length", "20",
                "--prompt", "ACGT", "--temperature", "0", "--batch-size", "2", *extra]  # fmt: skip
        assert main(argv) == 0
        runs[name] = [bytes(r.seq) for r in read_sequences(out)]
    loaded, tok, _ = load_exported(export)
    (want,) = sample(loaded, tok, 1, 20, b"ACGT", temperature=0.0)
    assert runs["a"] == runs["b"] == [want] * 3  # no seed, no cache makes a difference
    with pytest.raises(SystemExit) as stopped:
        main(["generate", str(export), "--out", str(tmp_path / "x.fa"), "--temperature", "-1"])
    assert stopped.value.code == 2
    with pytest.raises(ValueError, match="temperature"):
        sample(loaded, tok, 1, 5, temperature=-0.5)
