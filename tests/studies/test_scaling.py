"""Scaling-law fits (nucleo.studies.scaling) and the run table (nucleo.studies.compare)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from nucleo.cli.main import main
from nucleo.studies.compare import RunRow, collect, parse_tags
from nucleo.studies.scaling import fit_law, frontier

KINGDOMS = ("viral", "bacteria")


def _law_n(n, e=1.7, a=20.0, alpha=0.35):
    return e + a * np.power(n, -alpha)


def test_l_of_n_recovers_a_known_law_and_its_interval_covers_it():
    n = np.geomspace(2e4, 1e6, 6)
    exact = fit_law(n, _law_n(n), bootstrap=0)
    assert exact.params["alpha"] == pytest.approx(0.35, abs=1e-3)
    assert exact.params["E"] == pytest.approx(1.7, abs=1e-3)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.002, n.size))
    noisy = fit_law(n, _law_n(n) * noise, bootstrap=24, seed=1)
    lo, hi = noisy.ci["alpha"]
    assert lo <= 0.35 <= hi and hi - lo > 0.0 and noisy.resamples > 12
    assert exact.identifiable and noisy.identifiable


def test_a_flat_curve_is_flagged_as_not_identifiable():
    """Losses that barely move with N (as small DNA models at a tiny budget do) fit almost any
    small alpha: the fit must say so rather than report an exponent."""
    n = np.geomspace(2e4, 1e6, 5)
    flat = 1.92 - 0.004 * np.log10(n / 2e4) + np.array([0.001, -0.002, 0.002, -0.001, 0.0])
    law = fit_law(n, flat, bootstrap=16)
    assert not law.identifiable


def test_l_of_n_and_d_recovers_both_exponents_and_the_compute_optimal_slope():
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(2e4, 1e6, 4), np.geomspace(1e6, 3e7, 3)))
    loss = 1.6 + 30 * n**-0.4 + 200 * d**-0.3
    law = fit_law(n, loss, d=d, bootstrap=0)
    assert law.form == "N,D"
    assert law.params["alpha"] == pytest.approx(0.4, abs=1e-3)
    assert law.params["beta"] == pytest.approx(0.3, abs=1e-3)
    assert law.predict(np.array([1e5]), np.array([1e7]))[0] == pytest.approx(
        1.6 + 30 * 1e5**-0.4 + 200 * 1e7**-0.3, rel=1e-4
    )


def test_a_fit_needs_three_sizes_and_says_so():
    with pytest.raises(ValueError, match="3 distinct model sizes"):
        fit_law([1e4, 1e4, 1e5], [2.0, 1.99, 1.9])
    with pytest.raises(ValueError, match="2 token budgets"):
        fit_law([1e4, 3e4, 1e5], [2.0, 1.95, 1.9], d=[1e6, 1e6, 1e6])


def _row(name: str, flops: float, bits: float) -> RunRow:
    return RunRow(name, name, "x", "FINISHED", "a", "ce", 1, 1, 1.0, flops, bits)


def test_the_frontier_keeps_each_run_that_beats_every_cheaper_one():
    rows = [_row("a", 1, 2.0), _row("b", 2, 2.1), _row("c", 3, 1.9), _row("d", 4, 1.95)]
    assert [r.name for r in frontier(rows)] == ["a", "c"]


def _store(tmp_path):
    """A store with two groups x four sizes x three budgets of synthetic finished runs, a sweep
    parent (no metrics) and an unfinished run; both must be left out of fits and tables."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("scal", (tmp_path / "art").as_uri())
    client.create_run(exp, run_name="sweep-parent", tags={"nucleo.sweep_parent": "true"})
    for arch, alpha in (("hyena", 0.3), ("transformer", 0.4)):
        for n in (2e4, 6e4, 2e5, 6e5):
            for d in (1e6, 3e6, 1e7):
                bits = 1.6 + 25 * n**-alpha + 150 * d**-0.3
                run = client.create_run(exp, run_name=f"{arch}-{int(n)}-{int(d)}")
                rid = run.info.run_id
                params = {
                    "derived.non_embedding_parameters": int(n),
                    "derived.parameters": int(n) + 99,
                }
                metrics = {"val/bits_per_base": bits, "train/tokens": d, "train/flops": 7 * n * d}
                metrics |= {
                    f"val/bits_per_base/{k}": bits + 0.1 * i for i, k in enumerate(KINGDOMS)
                }
                metrics["val/ce"] = bits * 0.69
                tags = {"nucleo.arch": arch, "nucleo.losses": "ce", "nucleo.sweep": "s"}
                client.log_batch(
                    rid,
                    metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()],
                    params=[Param(k, str(v)) for k, v in params.items()],
                    tags=[RunTag(k, v) for k, v in tags.items()],
                )
                client.set_terminated(rid, "FINISHED")
    client.create_run(exp, run_name="still-running")
    return uri


@pytest.mark.slow
def test_scaling_fit_and_compare_read_the_store(tmp_path, capsys):
    uri = _store(tmp_path)
    rows = collect(uri, ["scal"], parse_tags(["nucleo.arch=hyena"]))
    assert len(rows) == 12 and {r.arch for r in rows} == {"hyena"}
    assert rows[0].kingdoms == pytest.approx(
        {"viral": rows[0].bits, "bacteria": rows[0].bits + 0.1}
    )

    out = tmp_path / "report" / "scaling.md"
    args = ["scaling", "fit", "--experiment", "scal", "--tracking-uri", uri, "--out", str(out)]
    assert main([*args, "--bootstrap", "8", "--sweep", "s"]) == 0
    text = out.read_text()
    assert "| hyena [ce] | 4 | 10,000,000 |" in text  # L(N) at the budget most runs share
    assert "N_opt exponent" in text and "| viral |" in text
    fits = json.loads(out.with_suffix(".json").read_text())["fits"]
    by_group = {f["group"]: f for f in fits}
    nd = by_group["transformer [ce]"]["law_nd"]["params"]
    assert nd["alpha"] == pytest.approx(0.4, abs=0.01) and nd["beta"] == pytest.approx(
        0.3, abs=0.01
    )
    assert by_group["hyena [ce]"]["optimal_exponent"] == pytest.approx(0.3 / 0.6, abs=0.02)
    assert by_group["hyena [ce]"]["flops_per_token_per_param"] == pytest.approx(7.0)
    # bigger models are better: the plain per-decade slope is negative
    assert by_group["hyena [ce]"]["slope"] < 0 and "bits/base per 10x N" in text
    for png in ("scaling_compute.png", "scaling_kingdoms.png"):
        assert (out.parent / png).stat().st_size > 10_000
    client = MlflowClient(tracking_uri=uri)
    (fit_run,) = client.search_runs(
        [client.get_experiment_by_name("scal").experiment_id], "tags.`nucleo.kind` = 'scaling-fit'"
    )
    artifacts = {a.path for a in client.list_artifacts(fit_run.info.run_id, "scaling")}
    assert "scaling/scaling.md" in artifacts and "scaling/scaling_compute.png" in artifacts

    capsys.readouterr()
    assert main(["compare", "--experiment", "scal", "--tracking-uri", uri, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 24  # neither the parent, the fit run nor the running run
    assert {"val/ce", "val/bits_per_base/viral", "flops", "non_embedding"} <= set(table[0])
    assert main(["compare", "--tracking-uri", uri, "--tag", "nucleo.arch=transformer"]) == 0
    md = capsys.readouterr().out
    assert md.count("| transformer-") == 12 and "hyena-" not in md
    assert main(["compare", "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "no MLflow experiment ['nope']" in capsys.readouterr().err
