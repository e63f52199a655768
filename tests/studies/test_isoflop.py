"""IsoFLOP studies: the planner lays each budget's sizes out from the families' own FLOP
formulas, the plan is a sweep, and the fit recovers a known compute-optimal allocation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from data_pipeline.tokenizers import CharTokenizer
from nucleo.cli.main import main
from nucleo.core.schema import ConfigError
from nucleo.studies import isoflop, isoflop_fit
from nucleo.studies.compare import RunRow
from nucleo.studies.sweep import expand, load_spec
from nucleo.train.components import build_model
from nucleo.train.compute import ComputeCounter, count_parameters
from nucleo.train.config import resolve

STUDY = {
    "name": "iso",
    "experiment": "iso",
    "budgets": ["3e11", 1e12],
    "sizes": 3,
    "tokens_per_parameter": 100,
    "min_steps": 20,
    "config": {"data": {"seq_len": 128}, "train": {"micro_batch_size": 4}},
    "families": {
        "hyena": [{"model.d_model": d, "model.n_layers": 2} for d in (8, 16, 24, 32, 48)],
        "transformer": [
            {"model.d_model": d, "model.n_layers": 2, "model.n_heads": 2} for d in (8, 16, 32, 64)
        ],
    },
}


def _study(tmp_path, **changes):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **changes}))
    return path


def test_the_plan_spends_each_budget_with_the_familys_own_flops(tmp_path):
    spec = isoflop.load_study(_study(tmp_path))
    rungs = isoflop.measure_rungs(spec, log=lambda _: None)
    first = rungs[0]  # counted on the meta device: equal to the built model's own counts
    cfg = resolve(
        {"arch": "hyena", "model": {"d_model": 8, "n_layers": 2}, "data": {"seq_len": 128}}
    )
    model = build_model("hyena", cfg.model, CharTokenizer())
    assert first.non_embedding == count_parameters(model)["non_embedding"]
    assert first.flops_per_token == pytest.approx(ComputeCounter(model, 4).per_token(128))
    per_window, batches = isoflop.step_layout(spec)
    assert (per_window, batches) == (128, [4])
    step = 4 * 128
    runs = isoflop.plan(spec, rungs)
    assert [r.budget for r in runs] == [3e11] * 6 + [1e12] * 6  # cheapest budget first
    for run in runs:
        assert abs(run.flops - run.budget) <= run.rung.flops_per_token * step / 2
        assert run.steps >= spec.min_steps
    for budget in spec.budgets:  # consecutive shapes around the one nearest the guessed D/N
        for family in spec.families:
            ladder = [x for x in rungs if x.family == family]
            feasible = [x for x in ladder if budget / (x.flops_per_token * step) >= 20]
            guess = min(feasible, key=lambda x: abs(math.log(
                budget / (x.flops_per_token * x.non_embedding) / 100)))  # fmt: skip
            curve = [r.rung for r in runs if r.budget == budget and r.rung.family == family]
            index = [ladder.index(x) for x in curve]
            assert guess in curve and index == list(range(index[0], index[0] + 3))
    sweep = tmp_path / "plan.yaml"
    sweep.write_text(yaml.safe_dump(isoflop.sweep_spec(spec, runs)))
    points = expand(load_spec(sweep))
    assert len(points) == 12 and all("budget" in p.config.tracking.tags for p in points)
    assert "-budget3e11-" in points[0].name
    assert points[0].config.train.warmup_steps == round(0.1 * points[0].config.train.max_steps)


def test_runs_with_many_tokens_take_larger_micro_batches(tmp_path):
    """micro_batch_sizes: each run takes the largest that still gives target_steps steps."""
    spec = isoflop.load_study(_study(tmp_path, micro_batch_sizes=[16, 4, 8], target_steps=400))
    runs = isoflop.plan(spec, isoflop.measure_rungs(spec, log=lambda _: None))
    assert len({r.micro_batch for r in runs}) >= 2
    for run in runs:
        wanted = run.budget / run.rung.flops_per_token
        fits = [b for b in (4, 8, 16) if wanted / (b * 128) >= 400]
        assert run.micro_batch == (max(fits) if fits else 4)
        assert run.tokens == run.steps * run.micro_batch * 128
    points = isoflop.sweep_spec(spec, runs)["extra"]
    assert [p["train.micro_batch_size"] for p in points] == [r.micro_batch for r in runs]


def test_bad_study_specs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="budgets"):
        isoflop.load_study(_study(tmp_path, budgets=["lots"]))
    with pytest.raises(ConfigError, match="sizes"):
        isoflop.load_study(_study(tmp_path, sizes=2))
    with pytest.raises(ConfigError, match=r"families\.transformer.*fewer than sizes=5"):
        isoflop.load_study(_study(tmp_path, sizes=5))
    with pytest.raises(ConfigError, match="unknown key"):
        isoflop.load_study(_study(tmp_path, budget=[1e12]))
    spec = isoflop.load_study(_study(tmp_path, min_steps=10**6))
    rungs = isoflop.measure_rungs(spec, log=lambda _: None)
    with pytest.raises(ConfigError, match="min_steps"):
        isoflop.plan(spec, rungs)


def _rows(a: float, noise: float, seed: int = 0) -> list[RunRow]:
    """Synthetic isoFLOP curves with N_opt = 0.02 C^a: bits = 1.9 + 0.02 (log10 N/N_opt)^2 ."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in (1e11, 1e12, 1e13):
        best = 0.02 * budget**a
        for step in (-1.0, -0.5, 0.0, 0.5, 1.0):
            n = best * 10 ** (step + 0.1)
            bits = 1.9 + 0.02 * (step + 0.1) ** 2 + rng.normal(0, noise)
            tokens = budget / (6 * n)
            rows.append(
                RunRow(
                    f"r{budget}{step}",
                    f"r{budget}{step}",
                    "e",
                    "FINISHED",
                    "hyena",
                    "ce",
                    int(n),
                    int(n),
                    tokens,
                    budget,
                    bits,
                    tags={"budget": isoflop.budget_label(budget)},
                )
            )
    return rows


def test_the_fit_recovers_the_optimal_sizes_and_exponents():
    (fit,) = isoflop_fit.fit_all(_rows(0.5, 0.0005), bootstrap=300, seed=0)
    for curve in fit.curves:
        assert curve.inside and curve.convex > 0.9
        assert math.log10(curve.n_opt) == pytest.approx(
            math.log10(0.02 * curve.budget**0.5), abs=0.1
        )
        assert curve.n_ci[0] < curve.n_opt < curve.n_ci[1]
        assert curve.d_opt == pytest.approx(curve.budget / (6 * curve.n_opt), rel=0.01)
    assert fit.a.value == pytest.approx(0.5, abs=0.05)
    assert fit.a.ci[0] < 0.5 < fit.a.ci[1]
    assert fit.b.value == pytest.approx(0.5, abs=0.05)  # C = 6 N D: a + b = 1


def test_seed_noise_widens_intervals_that_residuals_alone_make_too_narrow():
    exact = isoflop_fit.fit_all(_rows(0.5, 0.0), bootstrap=200, seed=0)[0].curves[0]
    noisy = isoflop_fit.fit_all(_rows(0.5, 0.0), bootstrap=200, seed=0, seed_noise=0.003)
    curve = noisy[0].curves[0]
    assert curve.n_opt == pytest.approx(exact.n_opt)  # the point estimate does not move
    width = math.log10(curve.n_ci[1] / curve.n_ci[0])
    assert width > 0.05 and width > 10 * math.log10(exact.n_ci[1] / exact.n_ci[0])


def test_token_counts_of_draws_far_outside_the_sizes_stay_finite():
    """A bootstrap draw of N_opt at 10^400 (a nearly flat parabola) gives log10 D, not a
    math domain error from 10**400 overflowing (found on the real CPU study's 1,000 draws)."""
    table = (np.array([3.0, 4.0, 5.0]), np.array([4.5, 5.4, 6.3]))
    assert isoflop_fit.log_tokens_at(1e12, 400.0, table) == pytest.approx(12 - (6.3 + 0.9 * 395))
    assert isoflop_fit.log_tokens_at(1e12, -400.0, table) > 300
    assert isoflop_fit.tokens_at(1e12, -400.0, table) == math.inf
    assert isoflop_fit.tokens_at(1e12, 4.0, table) == pytest.approx(1e12 / 10**5.4)


def test_a_curve_without_a_minimum_says_so():
    rows = [r for r in _rows(0.5, 0.0) if r.tags["budget"] == "1e11"]
    for r in rows:  # bigger is always worse: a downward-opening or monotone curve
        r.bits = 1.9 + 0.01 * math.log10(r.non_embedding) - 0.002 * math.log10(r.non_embedding) ** 2
    (fit,) = isoflop_fit.fit_all(rows, bootstrap=50, seed=0)
    (curve,) = fit.curves
    assert curve.n_opt is None and fit.a.value is None
    assert "| hyena | 1e+11 | 5 |" in isoflop_fit.curve_table([fit])


@pytest.mark.slow
def test_scaling_isoflop_reads_the_store_and_writes_the_report(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("iso", (tmp_path / "art").as_uri())
    for row in _rows(0.5, 0.0005):
        rid = client.create_run(exp, run_name=row.name).info.run_id
        client.log_batch(
            rid,
            metrics=[Metric(k, v, 0, 1) for k, v in {"val/bits_per_base": row.bits,
                     "train/tokens": row.tokens, "train/flops": row.flops}.items()],
            params=[Param("derived.non_embedding_parameters", str(row.non_embedding))],
            tags=[RunTag(k, v) for k, v in {**row.tags, "nucleo.arch": "hyena",
                  "nucleo.losses": "ce", "nucleo.sweep": "iso"}.items()],
        )  # fmt: skip
        client.set_terminated(rid, "FINISHED")
    out = tmp_path / "iso.md"
    args = ["scaling", "isoflop", "--experiment", "iso", "--tracking-uri", uri, "--out", str(out)]
    floor = tmp_path / "markov.json"
    bits = {"0": {"all": 1.99}, "3": {"all": 1.95}, "5": {"all": 1.97}}
    window = {"seq_len": 512, "windows_per_kingdom": 32, "seed": 0}
    floor.write_text(json.dumps({"validation": {**window, "bits_per_base": bits}}))
    assert main([*args, "--sweep", "iso", "--bootstrap", "100", "--floor", str(floor)]) == 0
    text = out.read_text()
    assert "| hyena | 3 of 3 |" in text and "![isoFLOP curves](iso.png)" in text
    assert "k-mer Markov floor: 1.9500 bits/base (order 3" in text
    assert json.loads(out.with_suffix(".json").read_text())["hyena"]["a"]["value"] == (
        pytest.approx(0.5, abs=0.05)
    )
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert main([*args, "--sweep", "other"]) == 2
    assert "no finished run with a 'budget' tag" in capsys.readouterr().err
