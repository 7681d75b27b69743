"""Config tree: TOML + CLI overrides, type and key errors that name the key."""

import re
from pathlib import Path

import pytest

from mtl_dist.config import ConfigError, JobConfig, help_text, load_config

DEFAULT = "configs/default.toml"


def test_toml_then_overrides():
    cfg = load_config(
        [
            "--config",
            DEFAULT,
            "--model.num_experts",
            "8",
            "--train.batch_size=4096",
            "--model.expert_hidden",
            "64,32",
            "--sharding.pipeline",
            "false",
            "--optim.dense_lr",
            "0.01",
        ]
    )
    assert cfg.model.num_experts == 8
    assert cfg.train.batch_size == 4096
    assert cfg.model.expert_hidden == [64, 32]
    assert cfg.sharding.pipeline is False
    assert cfg.optim.dense_lr == pytest.approx(0.01)
    # untouched values come from the TOML file, not the dataclass defaults
    assert cfg.train.log_every == 20
    assert [t.name for t in cfg.tasks] == ["click", "conversion", "watch_time"]
    shared = [f.name for f in cfg.features.sparse if f.table_name == "item_id"]
    assert shared == ["item_id", "hist_item_ids"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model.num_expert", "8"], "did you mean 'model.num_experts'"),
        (["--modle.num_experts", "8"], "did you mean 'model"),
        (["--model.num_experts", "eight"], "--model.num_experts: expected int"),
        (["--sharding.pipeline", "maybe"], "--sharding.pipeline: expected bool"),
        (["--model.expert_hidden", "64,x"], "--model.expert_hidden: expected int"),
        (["--model", "3"], "is a section"),
        (["--model.head", "transformer"], "model.head: unknown head 'transformer'"),
        (["--sharding.force", "row_wsie"], "did you mean 'row_wise'"),
        (["--optim.embedding_optimizer", "adam"], "not a fused CPU/GPU optimizer"),
        (["--train.batch_size"], "missing value"),
        (["--model.escm2_dr", "0.1"], "model.escm2_dr = 0.1: must be >= 0, and > 0 needs"),
        (
            ["--model.esmm", "true", "--model.escm2_dr", "0.1", "--model.escm2_ips", "0.1"],
            "choose one form of ESCM2's risk",
        ),
    ],
)
def test_cli_errors_name_the_key(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", DEFAULT, *args])
    assert needle in str(e.value)


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(Path(DEFAULT).read_text() + "\n" + text)
    return str(p)


def test_toml_unknown_key_and_wrong_type(tmp_path):
    p = tmp_path / "u.toml"
    p.write_text("[optim]\ndense_lrr = 0.1\n")
    with pytest.raises(
        ConfigError, match=r"u.toml: unknown config key 'optim.dense_lrr' \(did you mean 'dense_lr'"
    ):
        load_config(["--config", str(p)])
    p = tmp_path / "t.toml"
    p.write_text('[train]\nbatch_size = "big"\n')
    with pytest.raises(
        ConfigError, match=r"t.toml: train.batch_size: expected an integer, got 'big'"
    ):
        load_config(["--config", str(p)])
    p.write_text('[[tasks]]\nname = "click"\nlabel = "click"\nkind = 3\n')
    with pytest.raises(ConfigError, match=r"tasks\[0\].kind: expected str"):
        load_config(["--config", str(p)])


def test_schema_checks(tmp_path):
    bad = _write(tmp_path, '[[features.sparse]]\nname = "x"\nvocab_size = 10\ntable = "item_id"\n')
    with pytest.raises(ConfigError, match="'x' and 'item_id' share table 'item_id'"):
        load_config(["--config", bad])
    dup = _write(tmp_path, '[[features.sparse]]\nname = "user_id"\nvocab_size = 10\n')
    with pytest.raises(ConfigError, match="duplicate feature name"):
        load_config(["--config", dup])
    kind = _write(tmp_path, '[[tasks]]\nname = "t"\nlabel = "t"\nkind = "ranking"\n')
    with pytest.raises(ConfigError, match=r"tasks\[3\] \(t\): kind must be binary or regression"):
        load_config(["--config", kind])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(["--config", str(tmp_path / "nope.toml")])
    p = tmp_path / "b.toml"
    p.write_text("[train\n")
    with pytest.raises(ConfigError, match="b.toml: not valid TOML"):
        load_config(["--config", str(p)])


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    text = help_text()
    for key in [
        "--train.batch_size",
        "--model.num_experts",
        "--model.expert_hidden",
        "--sharding.sharding_types",
        "--optim.embedding_optimizer",
        "--data.train_path",
    ]:
        assert key in text
    assert re.search(r"--model.num_experts +int +default=4\n +experts E", text)
    assert "vocab_size" in text and "hash_buckets" in text  # schema entries documented too
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    assert "--train.seed" in capsys.readouterr().out


def test_defaults_are_a_valid_tree():
    cfg = JobConfig()
    assert cfg.model.expert_hidden == [256, 128]
    assert (
        cfg.model.expert_hidden is not JobConfig().model.expert_hidden
    )  # no shared mutable default


def test_gauc_best_metric_needs_gauc_by():
    args = ["--config", DEFAULT, "--train.best_metric", "click/gauc"]
    with pytest.raises(ConfigError, match=r"train.best_metric = 'click/gauc'.*set train.gauc_by"):
        load_config([*args, "--train.early_stop_patience", "2"])
    cfg = load_config([*args, "--train.gauc_by", "user_id", "--train.early_stop_patience", "2"])
    assert cfg.train.best_metric == "click/gauc"


def test_undefined_best_metric_is_no_improvement_and_never_formatted():
    from mtl_dist.loop.selection import BestTracker, fmt_metric

    cfg = load_config(["--config", DEFAULT, "--train.best_metric", "conversion/auc",
                       "--train.early_stop_patience", "2"])  # fmt: skip
    tracker = BestTracker(cfg.train)
    why = {"conversion": {"auc": "one class only: 0 positive(s) among 9 labelled rows"}}
    assert not tracker.update(10, {"conversion": {"logloss": 0.3}})
    assert tracker.undefined_note(10, {"conversion": {}}, why) == (
        "[best] conversion/auc undefined at step 10 (one class only: 0 positive(s) among 9 "
        "labelled rows): counted as no improvement"
    )
    assert not tracker.update(20, {"conversion": {"auc": float("nan")}})
    assert tracker.stop and tracker.value is None
    assert tracker.describe_best().startswith("none: undefined")
    assert fmt_metric(None) == fmt_metric(float("nan")) == "undefined"
    tracker.load({"value": float("nan"), "step": 3, "since": 0})
    assert tracker.update(30, {"conversion": {"auc": 0.7}}) and tracker.value == 0.7


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data.hash_seed", "-1"], "data.hash_seed = -1: must lie in [0, 2^64)"),
        (["--data.hash_seed", str(2**64)], f"data.hash_seed = {2**64}: must lie in [0, 2^64)"),
        (["--train.seed", "-1"], "train.seed = -1: must lie in [0, 2^32)"),
        (["--train.seed", str(2**32)], f"train.seed = {2**32}: must lie in [0, 2^32)"),
        (["--train.log_every", "0"], "train.log_every = 0: must lie in [1, 2^63)"),
        (["--train.epochs", "0"], "train.epochs = 0: must lie in [1, 2^63)"),
        (["--data.num_workers", "-2"], "data.num_workers = -2: must lie in [0, 2^63)"),
        (["--monitor.gate_every", "-1"], "monitor.gate_every = -1: must lie in [0, 2^63)"),
        (["--model.expert_hidden", "64,0"], "model.expert_hidden[1] = 0: must lie in [1, 2^63)"),
    ],
)
def test_integer_keys_out_of_range_are_refused_naming_key_and_range(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", DEFAULT, *args])
    assert needle in str(e.value)


def test_integer_range_edges_are_accepted(tmp_path):
    cfg = load_config(["--config", DEFAULT, "--data.hash_seed", str(2**64 - 1),
                       "--train.seed", str(2**32 - 1)])  # fmt: skip
    assert cfg.data.hash_seed == 2**64 - 1 and cfg.train.seed == 2**32 - 1
    bad = _write(tmp_path, '[[features.sparse]]\nname = "x"\nvocab_size = -5\n')
    with pytest.raises(ConfigError, match=r"features.sparse\[\d+\] \(x\)"):
        load_config(["--config", bad])
