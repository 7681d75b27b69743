"""Config tree: TOML + CLI overrides, type and key errors that name the key."""

import functools
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
            "--model.experts.num",
            "8",
            "--train.batch_size=4096",
            "--model.experts.hidden",
            "64,32",
            "--sharding.pipeline",
            "false",
            "--optim.dense_lr",
            "0.01",
        ]
    )
    assert cfg.model.experts.num == 8
    assert cfg.train.batch_size == 4096
    assert cfg.model.experts.hidden == [64, 32]
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
        (["--model.num_expert", "8"], "did you mean 'model.experts.num'"),
        (["--modle.num_experts", "8"], "did you mean 'model"),
        (["--model.experts.num", "eight"], "--model.experts.num: expected int"),
        (["--sharding.pipeline", "maybe"], "--sharding.pipeline: expected bool"),
        (["--model.experts.hidden", "64,x"], "--model.experts.hidden: expected int"),
        (["--model", "3"], "is a section"),
        (["--model.head", "transformer"], "--model.head: expected shared_bottom | omoe | mmoe"),
        (["--sharding.force", "row_wsie"], "did you mean 'row_wise'"),
        (["--optim.embedding_optimizer", "adam"], "not a fused CPU/GPU optimizer"),
        (["--train.batch_size"], "missing value"),
        (
            ["--model.esmm.escm2_dr", "0.1"],
            "model.esmm.escm2_dr = 0.1: must be >= 0, and > 0 needs",
        ),
        (
            [
                "--model.esmm.enabled",
                "true",
                "--model.esmm.escm2_dr",
                "0.1",
                "--model.esmm.escm2_ips",
                "0.1",
            ],
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
    with pytest.raises(ConfigError, match=r"tasks\[0\].kind: expected binary \| regression, got 3"):
        load_config(["--config", str(p)])


def test_schema_checks(tmp_path):
    bad = _write(tmp_path, '[[features.sparse]]\nname = "x"\nvocab_size = 10\ntable = "item_id"\n')
    with pytest.raises(ConfigError, match="'x' and 'item_id' share table 'item_id'"):
        load_config(["--config", bad])
    dup = _write(tmp_path, '[[features.sparse]]\nname = "user_id"\nvocab_size = 10\n')
    with pytest.raises(ConfigError, match="duplicate feature name"):
        load_config(["--config", dup])
    kind = _write(tmp_path, '[[tasks]]\nname = "t"\nlabel = "t"\nkind = "ranking"\n')
    with pytest.raises(
        ConfigError, match=r"tasks\[3\].kind: expected binary \| regression, got 'ranking'"
    ):
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
        "--model.experts.num",
        "--model.experts.hidden",
        "--sharding.sharding_types",
        "--optim.embedding_optimizer",
        "--data.train_path",
    ]:
        assert key in text
    assert re.search(r"--model.experts.num +int +default=4\n +experts E", text)
    assert "vocab_size" in text and "hash_buckets" in text  # schema entries documented too
    with pytest.raises(SystemExit) as e:
        load_config(["--help"])
    assert e.value.code == 0
    assert "--train.seed" in capsys.readouterr().out


def test_defaults_are_a_valid_tree():
    cfg = JobConfig()
    assert cfg.model.experts.hidden == [256, 128]
    assert (
        cfg.model.experts.hidden is not JobConfig().model.experts.hidden
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
        (["--model.experts.hidden", "64,0"], "model.experts.hidden[1] = 0: must lie in [1, 2^63)"),
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


# --------------------------------------------------------------------------- choices defined once

CHOICE_KEYS = [
    ("model.head", "HEADS"),
    ("model.experts.activation", "EXPERT_ACTIVATIONS"),
    ("model.experts.norm", "EXPERT_NORMS"),
    ("model.interaction.kind", "INTERACTIONS"),
    ("model.interaction.output", "INTERACTION_OUTPUTS"),
    ("optim.dense_optimizer", "OPTIMIZERS"),
    ("optim.embedding_optimizer", "EMBEDDING_OPTIMIZERS"),
    ("optim.embedding_weight_decay_mode", "WEIGHT_DECAY_MODES"),
    ("optim.dense_schedule", "SCHEDULES"),
    ("optim.embedding_schedule", "SCHEDULES"),
    ("embedding.data_type", "DATA_TYPES"),
    ("loss.balancer", "BALANCERS"),
    ("monitor.on_polarization", "ON_POLARIZATION"),
    ("data.dense_nan", "DENSE_NANS"),
    ("train.device", "DEVICES"),
    ("train.precision", "PRECISIONS"),
    ("train.on_nonfinite", "ON_NONFINITE"),
]
# what a name needs besides itself to make a valid job
NEEDS = {"pepnet": ["--model.pepnet.domain_features", "device_type"]}


def _help_line(key: str) -> str:
    lines = help_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  --{key} "))
    return lines[at + 1]


@pytest.mark.parametrize(("key", "const"), CHOICE_KEYS)
def test_every_allowed_name_is_accepted_and_in_the_help(key, const):
    import mtl_dist.config as config

    names = getattr(config, const)
    assert names and len(set(names)) == len(names)
    line = _help_line(key)
    for value in names:
        assert re.search(rf"(?<!\w){re.escape(value)}(?!\w)", line), (key, value, line)
        cfg = load_config(["--config", DEFAULT, f"--{key}", value, *NEEDS.get(value, [])])
        assert functools.reduce(getattr, key.split("."), cfg) == value


@pytest.mark.parametrize(
    ("key", "typo", "needle"),
    [
        (
            "model.head",
            "mmeo",
            "--model.head: expected shared_bottom | omoe | mmoe | ple | stem | aitm | dbmtl | pepnet, got 'mmeo' (did you mean 'mmoe'?)",
        ),
        (
            "model.experts.norm",
            "layr",
            "--model.experts.norm: expected none | batch | layer, got 'layr'",
        ),
        ("model.interaction.kind", "dcn_v3", "(did you mean 'dcn_v2'?)"),
        ("loss.balancer", "gradnrom", "loss.balancer: unknown balancer 'gradnrom' (did you mean"),
        (
            "optim.dense_schedule",
            "cosin",
            "optim.dense_schedule: expected constant | cosine | step | exponential, got 'cosin' "
            "(did you mean 'cosine'?)",
        ),
        ("train.precision", "bf61", "train.precision: expected auto | fp32 | bf16 | fp16, got"),
        ("train.on_nonfinite", "skp", "(did you mean 'skip'?)"),
        ("optim.embedding_optimizer", "adam", "(rowwise_adagrad | adagrad | sgd)"),
    ],
)
def test_a_wrong_name_is_refused_naming_the_key_and_the_close_match(key, typo, needle):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", DEFAULT, f"--{key}", typo])
    assert needle in str(e.value)


def test_the_error_lists_the_same_names_as_the_constant():
    from mtl_dist.config import EXPERT_NORMS, HEADS

    with pytest.raises(ConfigError) as e:
        load_config(["--config", DEFAULT, "--model.experts.norm", "x"])
    assert f"expected {' | '.join(EXPERT_NORMS)}," in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", DEFAULT, "--model.head", "zzz"])
    assert f"(valid: {', '.join(sorted(HEADS))})" in str(e.value)


# --------------------------------------------------------------------------- validate()'s families


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        # model_checks.check_head: a head's own keys against the tasks / features
        (["--model.head", "aitm", "--model.aitm.chain", "click,watch_time"],
         "model.aitm.chain ['click', 'watch_time']: needs 2 or more distinct binary tasks"),
        (["--model.head", "pepnet"], "model.head = pepnet needs model.pepnet.domain_features"),
        (["--model.head", "dbmtl", "--model.dbmtl.parents", "click:conversion,conversion:click"],
         "model.dbmtl.parents: a cycle"),
        # model_checks.check_esmm
        (["--model.esmm.enabled", "true", "--model.esmm.cvr_task", "watch_time"],
         "model.esmm.cvr_task: task 'watch_time' must be binary"),
        # model_checks.check_experts
        (["--model.experts.self_gate", "true"], "model.experts.self_gate mixes each task's own"),
        (["--model.experts.feature_gate_rank", "4", "--model.gate.top_k", "2"],
         "model.experts.feature_gate_rank = 4: must be >= 0 and, > 0, not with top-k"),
        # model_checks.check_gates
        (["--model.gate.dselect_k", "2", "--model.gate.noisy", "true"],
         "model.gate.dselect_k = 2 needs model.gate.dselect_gamma > 0 and replaces the softmax gate: "
         "not with model.gate.noisy"),
        (["--model.gate.top_k", "5"], "model.gate.top_k: 5 must lie in [0, model.experts.num]"),
        # model_checks.check_embedding_regularisers
        (["--optim.embedding_weight_decay", "0.01", "--optim.embedding_optimizer", "sgd"],
         "optim.embedding_weight_decay = 0.01: must be >= 0, and > 0 needs embedding_optimizer"),
        # checks.check_loss / check_optim / check_train
        (["--loss.cagrad_c", "1"], "loss.cagrad_c must lie in [0, 1), got 1.0"),
        (["--optim.schedule_gamma", "2"], "optim.schedule_step_size must be >= 1 and schedule_gamma"),
        (["--train.early_stop_patience", "2"], "train.early_stop_patience needs train.best_metric"),
        (["--train.best_metric", "watch_time/auc"], "did you mean 'watch_time/mae'"),
    ],
)  # fmt: skip
def test_family_rules_name_their_keys(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", DEFAULT, *args])
    assert needle in str(e.value)


MINIMAL = """
[[features.sparse]]
name = "user_id"
vocab_size = 10
{extra_feature}
[[tasks]]
name = "click"
label = "click"
"""


def test_interaction_needs_enough_fields(tmp_path):
    p = tmp_path / "one.toml"
    p.write_text(MINIMAL.format(extra_feature=""))
    with pytest.raises(
        ConfigError, match=r"model.interaction.kind = fm needs a sparse feature and 2"
    ):
        load_config(["--config", str(p), "--model.interaction.kind", "fm"])
    assert load_config(["--config", str(p)]).model.interaction.kind == "none"


def test_feature_and_task_rules_name_the_entry(tmp_path):
    managed = '[[features.sparse]]\nname = "m"\nhash_buckets = 100\ncollision = "managed"\n'
    p = _write(tmp_path, managed)
    with pytest.raises(ConfigError, match=r"features.sparse\[\d+\] \(m\): collision = 'managed' "
                                          r"tables shard row_wise only"):  # fmt: skip
        load_config(["--config", p, "--sharding.force", "table_wise"])
    with pytest.raises(ConfigError, match=r"\(m\): a collision = 'managed' feature cannot have"):
        load_config(["--config", p, "--model.head", "stem"])
    cond = _write(tmp_path, '[[tasks]]\nname = "t"\nlabel = "t"\ncondition = "watch_time"\n')
    with pytest.raises(
        ConfigError, match=r"tasks\[3\] \(t\): condition 'watch_time' must name another binary"
    ):
        load_config(["--config", cond])


def test_filter_syntax_is_not_checked_by_validate():
    """The filters' syntax moved out of validate() (``mtl_dist.config`` imports nothing else
    from mtl_dist): ``RowFilter.parse`` checks it where the reader is built."""
    cfg = load_config(["--config", DEFAULT, "--data.val_filter", "hour <"])
    assert cfg.data.val_filter == "hour <"


def test_to_dict_from_dict_round_trip():
    from mtl_dist.config import from_dict, to_dict

    cfg = load_config(["--config", DEFAULT, "--model.experts.hidden", "32,16"])
    assert from_dict(to_dict(cfg)) == cfg and to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


# --------------------------------------------------------------------------- the package's shape


def test_config_package_is_small_pieces_importing_only_itself():
    """Every file of mtl_dist/config is at most ~400 lines, every function at most 80, and it
    imports nothing from mtl_dist outside ``mtl_dist.config``."""
    import ast

    root = Path(__file__).resolve().parents[1] / "mtl_dist" / "config"
    files = sorted(root.glob("*.py"))
    assert files and not (root.parent / "config.py").exists()
    for path in files:
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 80, f"{path.name}: {node.name}"
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                assert not mod.startswith("mtl_dist") or mod.startswith("mtl_dist.config"), mod
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("mtl_dist") for a in node.names), path.name
