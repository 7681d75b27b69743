"""The nested ``[model.*]`` sections, and the previous release's flat ``[model]`` keys mapped
onto them by :mod:`mtl_dist.config.compat` (TOML, command line, ``from_dict``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mtl_dist.config import (
    FLAT_MODEL_KEYS,
    ConfigError,
    JobConfig,
    from_dict,
    help_text,
    load_config,
    to_dict,
)
from mtl_dist.config.compat import nest_model_keys

DEFAULT = "configs/default.toml"

NEW_TOML = """
[model]
head = "ple"
[model.experts]
hidden = [32, 16]
activation = "swish"
[model.gate]
temperature = 2.0
entropy_coef = 0.01
[model.ple]
levels = 1
[model.interaction]
kind = "dcn_v2"
cross_layers = 2
[model.embedding]
dropout = 0.1
"""
OLD_TOML = """
[model]
head = "ple"
expert_hidden = [32, 16]
expert_activation = "swish"
gate_temperature = 2.0
gate_entropy_coef = 0.01
ple_levels = 1
interaction = "dcn_v2"
cross_layers = 2
embedding_dropout = 0.1
"""
NEW_CLI = ["--model.gate.top_k", "2", "--model.experts.num", "6", "--model.esmm.enabled",
           "true", "--model.interaction.kind", "fm", "--model.tower.hidden", "8"]  # fmt: skip
OLD_CLI = ["--model.gate_top_k", "2", "--model.num_experts", "6", "--model.esmm", "true",
           "--model.interaction", "fm", "--model.tower_hidden", "8"]  # fmt: skip


def _load(tmp_path, text: str, args: list[str]) -> JobConfig:
    base = Path(DEFAULT).read_text()
    at = base.index("[optim]")  # the default's [model] tables replaced by the test's
    start = base.index("[model]")
    (tmp_path / "c.toml").write_text(base[:start] + base[at:] + text)
    return load_config(["--config", str(tmp_path / "c.toml"), *args])


def test_old_flat_toml_and_cli_give_the_same_config_with_a_warning(tmp_path):
    new = _load(tmp_path, NEW_TOML, NEW_CLI)
    with pytest.warns(FutureWarning, match=r"model.gate_temperature -> model.gate.temperature"):
        old = _load(tmp_path, OLD_TOML, OLD_CLI)
    assert old == new
    assert new.model.gate.temperature == 2.0 and new.model.experts.num == 6
    assert new.model.esmm.enabled and new.model.interaction.kind == "fm"


def test_a_cli_override_warns_once_naming_the_new_key():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(["--config", DEFAULT, "--model.gate_temperature", "3"])
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1 and "model.gate.temperature" in messages[0]


def test_every_flat_key_maps_to_a_key_that_exists():
    model = JobConfig().model
    for old, new in FLAT_MODEL_KEYS.items():
        section, key = new.split(".")
        assert hasattr(getattr(model, section), key), (old, new)


def test_a_flat_checkpoint_dict_loads():
    """What the previous release's to_dict wrote: every [model] key flat."""
    cfg = load_config(["--config", DEFAULT])
    data = to_dict(cfg)
    flat = {k: v for k, v in data["model"].items() if not isinstance(v, dict)}
    for old, new in FLAT_MODEL_KEYS.items():
        section, key = new.split(".")
        flat[old] = data["model"][section][key]
    data["model"] = flat
    with pytest.warns(FutureWarning):
        assert from_dict(data) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_an_old_key_beside_its_new_key_is_refused():
    with pytest.raises(ConfigError, match=r"model.gate_top_k and model.gate.top_k are both set"):
        nest_model_keys({"gate_top_k": 1, "gate": {"top_k": 2}})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[model.gate]\ntemprature = 2.0\n", "unknown config key 'model.gate.temprature' "
         "(did you mean 'temperature'?)"),
        ("[model.gaet]\ntemperature = 2.0\n", "unknown config key 'model.gaet' (did you mean "
         "'gate'?)"),
        ('[model.experts]\nnorm = "layr"\n', "model.experts.norm: expected none | batch | "
         "layer, got 'layr' (did you mean 'layer'?)"),
        ('[model.interaction]\nkind = "dcn_v3"\n', "(did you mean 'dcn_v2'?)"),
        ("[model.gate]\ntop_k = 1.5\n", "model.gate.top_k: expected an integer"),
    ],
)  # fmt: skip
def test_nested_toml_keys_are_checked_at_every_level(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, '[model]\nhead = "mmoe"\n' + text, [])
    assert needle in str(e.value)


def test_nested_cli_keys_suggest_the_close_match():
    with pytest.raises(ConfigError, match=r"did you mean 'model.gate.temperature'"):
        load_config(["--config", DEFAULT, "--model.gate.temprature", "2"])
    with pytest.raises(ConfigError, match=r"is a section"):
        load_config(["--config", DEFAULT, "--model.gate", "2"])


def test_help_lists_every_nested_model_key():
    text = help_text()
    for new in FLAT_MODEL_KEYS.values():
        assert f"--model.{new} " in text, new
    assert "--model.head " in text and "--model.dense_batch_norm " in text


def test_a_config_built_in_python_has_its_choice_keys_checked():
    from mtl_dist.config import ExpertsConfig, validate

    cfg = load_config(["--config", DEFAULT])
    cfg.model.experts = ExpertsConfig(norm="layr")
    with pytest.raises(ConfigError, match=r"model.experts.norm: expected none \| batch \| layer"):
        validate(cfg)
