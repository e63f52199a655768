"""Run configs: YAML, command-line overrides, and errors that name the key and the choices."""

from __future__ import annotations

import pytest

from nucleo.core.registry import Registry, UnknownNameError
from nucleo.core.schema import ConfigError
from nucleo.train.config import load_config, save_config
from tests.conftest import ROOT

DEMO = ROOT / "experiments" / "configs" / "demo.yaml"


def test_defaults_resolve():
    cfg = load_config()
    assert cfg.arch == "transformer" and cfg.losses == ["ce"]
    assert cfg.loss["ce"].weight == 1.0
    assert cfg.train.max_steps > 0 and cfg.engine.zero_stage == 0


def test_yaml_then_flags_then_overrides():
    cfg = load_config(
        DEMO,
        losses="ce",
        overrides=[
            "train.max_steps=50",
            "train.lr=3e-4",
            "model.n_layers=2",
            "data.kingdoms=[viral,plasmid]",
            "loss.ce.weight=0.5",
            "tracking.uri=null",
        ],
    )
    assert cfg.model.d_model == 128  # from the YAML
    assert cfg.model.n_layers == 2 and cfg.train.max_steps == 50
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.data.kingdoms == ["viral", "plasmid"]
    assert cfg.loss["ce"].weight == 0.5 and cfg.tracking.uri is None


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(DEMO, overrides=["train.seed=3", "data.kingdoms=viral,fungi"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override,key,fragment",
    [
        ("train.lrr=1", "train.lrr", "did you mean 'lr'?"),
        ("trian.lr=1", "trian", "valid: arch, losses, model"),
        ("model.width=3", "model.width", "valid keys: size, d_model"),
        ("loss.ce.wieght=1", "loss.ce.wieght", "valid keys: weight"),
        ("loss.cgrr.weight=1", "loss.cgrr", "known: ce, cgr"),
        ("engine.precision=fp16", "engine.precision", "choose one of 'fp32', 'bf16'"),
        ("engine.zero_stage=4", "engine.zero_stage", "choose one of 0, 1, 2, 3"),
        ("train.max_steps=ten", "train.max_steps", "expected an integer"),
        ("train.max_steps=0", "train.max_steps", "must be >= 1"),
        ("model.n_heads=3", "model.n_heads", "not divisible"),
        ("data.seq_len=4", "data.seq_len", "must be >= 8"),
        ("tracking.enabled=maybe", "tracking.enabled", "true or false"),
        ("run.name=../x", "run.name", "plain folder name"),
    ],
)
def test_bad_settings_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert info.value.key == key
    assert fragment in str(info.value)


def test_unknown_architecture_and_loss_list_the_known_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown architecture .hyenna. \(did you mean .hyena.\?\); known: caduceus",
    ):
        load_config(arch="hyenna")
    with pytest.raises(ConfigError, match=r"losses: unknown loss 'cgrr'.*'cgr'.*known: ce, cgr"):
        load_config(losses="ce,cgrr")
    with pytest.raises(ConfigError, match="twice"):
        load_config(losses="ce,ce")


def test_errors_from_a_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz.*bad\.yaml"):
        load_config(bad)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_a_bare_off_is_the_word_not_false():
    """YAML 1.1 reads `off` as False: `--set model.kernels=off`, as the README writes it."""
    assert load_config(arch="mamba", overrides=["model.kernels=off"]).model.kernels == "off"
    with pytest.raises(ConfigError, match=r"model\.kernels"):
        load_config(arch="mamba", overrides=["model.kernels=true"])  # no "on" to map to


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(overrides=["train.max_steps"])


def test_registry_suggests_and_refuses_duplicates():
    reg: Registry = Registry("widget")

    @reg.register("alpha", config=dict)
    class Alpha:
        """An alpha widget."""

    with pytest.raises(UnknownNameError, match="did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha", config=dict)(type("Other", (), {}))
    assert reg.names() == ["alpha"] and next(iter(reg)).summary == "An alpha widget."


def test_every_shipped_config_and_sweep_spec_resolves():
    """The YAML files under experiments/ stay valid as the configs evolve."""
    from nucleo.studies.ablation import load_ablation
    from nucleo.studies.isoflop import load_study
    from nucleo.studies.sweep import expand, load_spec
    from nucleo.train.config import read_yaml

    configs = sorted((ROOT / "experiments" / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)
    specs = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
    assert specs
    studies = [p for p in specs if "families" in read_yaml(p)]  # isoFLOP study specs
    ablations = [p for p in specs if "variants" in read_yaml(p)]  # loss ablation specs
    assert studies and ablations
    for path in studies:
        assert load_study(path).budgets
    for path in ablations:
        assert load_ablation(path).variants
    for path in sorted(set(specs) - set(studies) - set(ablations)):
        assert expand(load_spec(path))
