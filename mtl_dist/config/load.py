"""From TOML and the command line to a validated :class:`JobConfig`, and back to plain data.

Values come from, in order: the dataclass defaults, a TOML file (``--config X.toml``), then
``--section.key value`` overrides. Unknown keys are refused with the closest valid key
(``difflib``); values of the wrong type name the key. ``--help`` lists every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import tomllib

from mtl_dist.config.base import ConfigError, one_of, suggest
from mtl_dist.config.checks import validate
from mtl_dist.config.compat import nest_model_keys, nest_model_override
from mtl_dist.config.data import SequenceFeature, SparseFeature, TaskSpec
from mtl_dist.config.job import JobConfig
from mtl_dist.config.model import ModelConfig

# --------------------------------------------------------------------------- building from dicts


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_literal(value: Any, tp: Any, where: str) -> Any:
    """``value`` if it is one of the names the ``Literal`` type ``tp`` allows, else a
    :class:`ConfigError` naming ``where``, the allowed names and the close match."""
    allowed = typing.get_args(tp)
    if value not in allowed:
        raise ConfigError(
            f"{where}: expected {one_of(allowed)}, got {value!r}" + suggest(str(value), allowed)
        )
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (from TOML) against type ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return check_literal(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: unsupported union type")  # pragma: no cover - not used
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = _hints(cls)
    if cls is ModelConfig:  # the previous release's flat keys, for one release
        data = nest_model_keys(data, where or "model")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            raise ConfigError(f"unknown config key '{path}'" + suggest(key, list(hints)))
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def load_toml(path: str | Path) -> JobConfig:
    """Load a config file; errors name the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return _build(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def from_dict(data: dict[str, Any]) -> JobConfig:
    """A validated :class:`JobConfig` from :func:`to_dict`'s plain data (e.g. a checkpoint's)."""
    cfg = _build(JobConfig, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (written beside the run's outputs)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- command line


def _parse_cli_value(text: str, tp: Any, key: str) -> Any:
    """Turn a command-line string into a value of ``tp`` (``256,128`` is a list of ints)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return check_literal(text, tp, f"--{key}")
    try:
        if tp is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item_tp):
                raise ConfigError(
                    f"--{key}: a list of tables is set in the TOML file, not on the command line"
                )
            parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
            return [_parse_cli_value(p, item_tp, key) for p in parts]
    except ConfigError:
        raise
    except ValueError:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"--{key}: expected {name}, got {text!r}") from None
    raise ConfigError(f"--{key}: cannot be set from the command line")  # pragma: no cover


def apply_override(cfg: JobConfig, dotted: str, text: str) -> None:
    """Set ``cfg.<dotted>`` from a command-line string, checking key and type."""
    obj: Any = cfg
    dotted = nest_model_override(dotted)
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        prefix = ".".join(parts[:i])
        if part not in hints:
            leaves = [key for key, *_ in _walk(JobConfig)]
            close = difflib.get_close_matches(dotted, leaves, n=1, cutoff=0.5)
            hint = (
                f" (did you mean '{close[0]}'?)"
                if close
                else suggest(part, [f"{prefix}.{k}" if prefix else k for k in hints])
            )
            raise ConfigError(f"unknown config key '--{dotted}'{hint}")
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(
                    f"--{dotted} is a section; set one of its keys, e.g. --{dotted}.<key>"
                )
            setattr(obj, part, _parse_cli_value(text, tp, dotted))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{dotted}: '{part}' has no sub-keys")


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf key of a config dataclass."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, key + ".")
        else:
            yield key, tp, getattr(defaults, f.name), f.metadata.get("help", "")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "choice"
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list[{getattr(item, '__name__', item)}]"
    return getattr(tp, "__name__", str(tp))


def help_text(prog: str = "python -m mtl_dist.train") -> str:
    """Every config key with its type, default and meaning (what ``--help`` prints)."""
    lines = [
        "usage: torchrun --nproc_per_node N -m mtl_dist.train [--config FILE.toml] [--section.key VALUE ...]",
        "",
        "Values: dataclass defaults < TOML file < command-line overrides. Lists: --model.experts.hidden 256,128",
        "",
        "config keys:",
    ]
    for key, tp, default, help_ in _walk(JobConfig):
        lines.append(f"  --{key:<36} {_type_name(tp):<12} default={default!r}")
        lines.append(f"      {help_}")
    entries = (
        (SparseFeature, "features.sparse[]"),
        (SequenceFeature, "features.sequence[]"),
        (TaskSpec, "tasks[]"),
    )
    for cls, name in entries:
        lines.append(f"\n  {name} entries (TOML only):")
        for key, tp, default, help_ in _walk(cls):
            lines.append(f"    {key:<18} {_type_name(tp):<8} default={default!r}  {help_}")
    return "\n".join(lines)


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Parse ``[--config FILE] [--section.key VALUE ...]`` into a validated :class:`JobConfig`.

    ``--help`` prints :func:`help_text` and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    known, rest = parser.parse_known_args(argv)
    cfg = load_toml(known.config) if known.config else JobConfig()
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key value"
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"--{key}: missing value")
            i += 1
            value = rest[i]
        apply_override(cfg, key, value)
        i += 1
    validate(cfg)
    return cfg
