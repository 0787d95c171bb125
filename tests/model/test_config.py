"""Presets reproduce the published Tanuki sizes; invalid configs fail with a message naming the fix;
every shipped config file loads."""

import json

import pytest
import yaml

from model import PRESETS, ModelConfig, Transformer
from model.config import read_config_file
from model.train import RunConfig
from tests.conftest import REPO, mujina_model


def test_tanuki_8b_is_7_5b_parameters():
    cfg = ModelConfig.from_preset("tanuki-8b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (32, 4096, 14336, 65000)
    assert round(cfg.num_params() / 1e9, 1) == 7.5


def test_tanuki_8x8b_is_47b_total_13b_active():
    cfg = ModelConfig.from_preset("tanuki-8x8b")
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (8, 2)
    assert round(cfg.num_params() / 1e9) == 47
    assert round(cfg.num_active_params() / 1e9) == 13


def test_small_preset_is_between_20_and_50m():
    assert 20e6 <= ModelConfig.from_preset("small").num_params() <= 50e6


@pytest.mark.parametrize("spec", ["debug", "small"])
def test_counts_agree_with_allocated_model(spec):
    for moe in (None, {"num_experts": 4, "top_k": 2}):
        cfg = ModelConfig.from_dict({"preset": spec, "moe": moe, "num_layers": 1})
        net = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in net.parameters())


def test_active_count_matches_touched_parameters():
    # Reference: a dense model with top_k x FFN width has exactly the parameters one token touches,
    # minus the router.
    cfg = ModelConfig.from_dict({"preset": "debug", "moe": {"num_experts": 8, "top_k": 2}})
    dense_k = ModelConfig.from_dict({"preset": "debug", "intermediate_size": 2 * cfg.intermediate_size})
    router = cfg.num_layers * cfg.hidden_size * 8
    assert cfg.num_active_params() == dense_k.num_params() + router


@pytest.mark.parametrize("overrides, words", [
    ({"hidden_size": 100, "num_heads": 8}, ["hidden_size=100", "num_heads=8", "divisible"]),
    ({"num_kv_heads": 3}, ["num_kv_heads=3", "divide"]),
    ({"moe": {"num_experts": 2, "top_k": 3}}, ["top_k=3", "num_experts=2"]),
    ({"hidden_sise": 64}, ["unknown key", "hidden_sise", "hidden_size"]),
    ({"moe": {"experts": 8}}, ["unknown key", "experts", "num_experts"]),
    ({"num_layers": 0}, ["num_layers", "positive"]),
])
def test_invalid_configs_name_the_field(overrides, words):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict({"preset": "debug", **overrides})
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'tanuki-70b'.*tanuki-8x8b"):
        ModelConfig.from_preset("tanuki-70b")


def test_info_cli_json_and_errors(tmp_path):
    info = json.loads(mujina_model("info", "tanuki-8x8b", "--json").stdout)
    assert info["total_params"] == ModelConfig.from_preset("tanuki-8x8b").num_params()
    assert info["active_params"] == ModelConfig.from_preset("tanuki-8x8b").num_active_params()
    f = tmp_path / "m.yaml"
    f.write_text("preset: debug\nmoe: {num_experts: 4, top_k: 1}\n")
    info = json.loads(mujina_model("info", str(f), "--json").stdout)
    assert info["total_params"] > info["active_params"]
    bad = mujina_model("info", "nope", check=False)
    assert bad.returncode == 2 and "neither a preset" in bad.stderr


def _training_configs():
    # configs/ also holds other programs' files (project.yaml: tests/coordinator; personas lists:
    # tests/worker); a training config is a mapping with a model or a checkpoint to start from.
    docs = {p: yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))}
    return [p for p, d in docs.items() if isinstance(d, dict) and {"model", "init_from"} & set(d)]


@pytest.mark.parametrize("path", _training_configs(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    data = read_config_file(path)
    if data.get("init_from"):  # a config that continues from a checkpoint: give it a real one
        ckpt = tmp_path / "init"
        mujina_model("init", "--preset", "debug", "--out", str(ckpt))
        data["init_from"] = str(ckpt)
    cfg = RunConfig.from_dict(data)
    assert cfg.model_config().num_params() > 0


def test_presets_all_valid():
    for name in PRESETS:
        assert ModelConfig.from_preset(name).num_params() > 0


def test_yaml_exponent_floats_are_numbers_and_types_are_checked(tmp_path):
    # PyYAML reads 3e-4 as a string; the config must still take it as a float.
    f = tmp_path / "run.yaml"
    f.write_text("model: {preset: debug, rope_theta: 5e4}\noptim: {lr: 3e-4, min_lr: 1e-5}\n")
    cfg = RunConfig.from_dict(read_config_file(f))
    assert cfg.optim.lr == 3e-4 and cfg.model_config().rope_theta == 5e4
    with pytest.raises(ValueError, match="train.steps must be an int, got '10'"):
        RunConfig.from_dict({"model": {"preset": "debug"}, "train": {"steps": "10"}})
    with pytest.raises(ValueError, match="model.num_layers must be an int"):
        RunConfig.from_dict({"model": {"preset": "debug", "num_layers": 2.5}})
