"""Loss ablations: equal FLOPs per run (a loss with another backbone pass trains for fewer
steps), and paired differences over seeds with t intervals."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from nucleo.cli.main import main
from nucleo.core.schema import ConfigError
from nucleo.studies import ablation
from nucleo.studies.compare import RunRow
from nucleo.studies.sweep import expand, load_spec

SPEC = {
    "name": "abl",
    "experiment": "abl",
    "budget": "1e10",
    "baseline": "ce",
    "seeds": [0, 1, 2],
    "config": {"data": {"seq_len": 64}, "train": {"micro_batch_size": 4}},
    "models": {"hyena": {"model.d_model": 16, "model.n_layers": 2}},
    "variants": {
        "ce": {"losses": "ce"},
        "ce+rc": {"losses": "ce,rc"},
        "rep": {"losses": "ce", "data.repeat_weight": 0.1},
    },
}


def _spec(tmp_path, **changes):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    return path


def test_every_variant_spends_the_same_flops(tmp_path):
    spec = ablation.load_ablation(_spec(tmp_path))
    planned = {p.variant: p for p in ablation.plan(spec)}
    assert planned["ce"].passes == 1 and planned["ce+rc"].passes == 2
    assert planned["ce+rc"].flops_per_token == pytest.approx(2 * planned["ce"].flops_per_token)
    assert abs(planned["ce+rc"].steps - planned["ce"].steps / 2) <= 1
    for p in planned.values():
        assert p.flops == pytest.approx(1e10, rel=0.01)
    sweep = tmp_path / "plan.yaml"
    sweep.write_text(yaml.safe_dump(ablation.sweep_spec(spec, list(planned.values()))))
    points = expand(load_spec(sweep))
    assert len(points) == 9
    assert {p.config.tracking.tags["variant"] for p in points} == {"ce", "ce+rc", "rep"}
    assert {p.config.data.repeat_weight for p in points} == {1.0, 0.1}


def test_bad_ablation_specs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="baseline"):
        ablation.load_ablation(_spec(tmp_path, baseline="nope"))
    with pytest.raises(ConfigError, match="seeds"):
        ablation.load_ablation(_spec(tmp_path, seeds=[0]))
    with pytest.raises(ConfigError, match="budget"):
        ablation.load_ablation(_spec(tmp_path, budget="much"))


def _row(variant: str, seed: int, bits: float, kingdom: float) -> RunRow:
    metrics = {"val/bits_per_base": bits, "val/bits_per_base/viral": kingdom}
    return RunRow(
        f"{variant}{seed}", f"hyena-{variant}-seed{seed}", "e", "FINISHED", "hyena", "ce", 1, 1,
        1.0, 1.0, bits, {"viral": kingdom}, metrics, {"variant": variant},
    )  # fmt: skip


def test_paired_differences_and_their_intervals():
    base = [1.90, 1.95, 1.92]
    rows = [_row("ce", s, b, b) for s, b in enumerate(base)]
    for name, shifts in (("good", (-0.010, -0.012, -0.011)), ("noise", (0.02, -0.03, 0.01))):
        rows += [_row(name, s, b + d, b) for s, (b, d) in enumerate(zip(base, shifts, strict=True))]
    diffs = ablation.differences(rows, "ce")["hyena"]
    good = diffs["good"]["all bases"]
    assert good.per_seed == pytest.approx([-0.010, -0.012, -0.011])
    half = 4.303 * 0.001 / math.sqrt(3)
    assert (good.mean, good.low, good.high) == pytest.approx((-0.011, -0.011 - half, -0.011 + half))
    assert good.verdict == "better"
    assert diffs["noise"]["all bases"].verdict == "no difference resolved"
    assert diffs["good"]["viral"].mean == pytest.approx(0.0)  # per kingdom, paired too
    regions = {"models": [{"name": "m", "rows": [
        {"kingdom": "a", "class": "cds1", "repeat": "all", "bases": 10, "nats": 10 * math.log(2)},
        {"kingdom": "b", "class": "cds1", "repeat": "all", "bases": 30, "nats": 90 * math.log(2)},
        {"kingdom": "b", "class": "cds1", "repeat": "repeat", "bases": 5, "nats": 1.0},
    ]}]}  # fmt: skip
    assert ablation.region_figures(regions) == {"m": {"region cds1": pytest.approx(2.5)}}


@pytest.mark.slow
def test_ablation_report_reads_the_store(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("abl", (tmp_path / "art").as_uri())
    for variant, shift in (("ce", 0.0), ("ce+rc", 0.01)):
        for seed in range(3):
            rid = client.create_run(exp, run_name=f"hyena-{variant}-seed{seed}").info.run_id
            bits = 1.9 + 0.01 * seed + shift
            client.log_batch(
                rid,
                metrics=[Metric("val/bits_per_base", bits, 0, 1),
                         Metric("val/bits_per_base/viral", bits, 0, 1)],
                params=[Param("derived.non_embedding_parameters", "1000")],
                tags=[RunTag("variant", variant), RunTag("nucleo.arch", "hyena"),
                      RunTag("nucleo.losses", "ce"), RunTag("nucleo.sweep", "abl")],
            )  # fmt: skip
            client.set_terminated(rid, "FINISHED")
    out = tmp_path / "abl.md"
    args = ["ablation", "report", "--experiment", "abl", "--tracking-uri", uri, "--out", str(out)]
    assert main([*args, "--sweep", "abl"]) == 0
    text = out.read_text()
    assert "| hyena | ce+rc | all bases | 1.9100 | +0.0100 [+0.0100, +0.0100]" in text
    assert "worse" in text and "## Per kingdom" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["hyena"]["ce+rc"]["all bases"]["mean"] == pytest.approx(0.01)
    assert out.with_suffix(".png").stat().st_size > 5_000
    assert main([*args, "--baseline", "nope"]) == 2
    assert "--baseline 'nope'" in capsys.readouterr().err
