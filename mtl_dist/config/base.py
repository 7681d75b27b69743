"""What every config file shares: the error type, ``opt`` fields, and the helpers that turn one
tuple of allowed names into the ``--help`` text, the check and its error message."""

from __future__ import annotations

import difflib
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key at fault."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line meaning shown by ``--help``."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def one_of(names: tuple[str, ...] | list[str], sep: str = " | ", **notes: str) -> str:
    """The allowed ``names`` as help text, each followed by its note where it has one.

    Example::

        one_of(("sum", "mean"))  # 'sum | mean'
        one_of(("error", "mask"), sep=" or ")  # 'error or mask'
        one_of(("fp32", "fp16"), fp16="(half the memory)")  # 'fp32 | fp16 (half the memory)'
    """
    unknown = set(notes) - set(names)
    assert not unknown, f"notes for names that are not allowed: {sorted(unknown)}"
    return sep.join(f"{n} {notes[n]}" if n in notes else n for n in names)


def suggest(key: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` with the closest of ``choices``, else the valid ones."""
    choices = list(choices)
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


def check_choices(*items: tuple[str, str, tuple[str, ...]]) -> None:
    """Each ``(label, value, allowed)``: refuse a value outside ``allowed``, with the close
    match."""
    for label, value, allowed in items:
        if value not in allowed:
            raise ConfigError(
                f"{label} must be {one_of(allowed)}, got {value!r}" + suggest(value, allowed)
            )


def claim_name(names: set[str], name: str, where: str) -> None:
    """A feature's ``name``: required, and not one already in ``names`` (added to them).

    Raises:
        ConfigError: naming ``where`` (e.g. ``features.sparse[2] (user_id)``)."""
    if not name:
        raise ConfigError(f"{where}: 'name' is required")
    if name in names:
        raise ConfigError(f"{where}: duplicate feature name")
    names.add(name)
