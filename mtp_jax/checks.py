"""Value checks for config keys, and the error every bad key raises (a leaf module: the model's
settings and the config loader both declare their checks with it).

A check is `(ok, accepted)`: a predicate and the words an error uses for what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Check = tuple[Callable[[Any], bool], str]


class ConfigError(ValueError):
    """A config key has an unknown name or an unacceptable value."""


def fail(key: str, value: Any, accepted: str) -> None:
    """Raises the ConfigError that names `key`, its value and what is accepted."""
    raise ConfigError(f"config key {key!r} has value {value!r}; accepted: {accepted}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def ok(v):
        return _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)

    rng = f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
    return ok, "an integer" + (rng if lo is not None else "")


def number(lo: float | None = None, hi: float | None = None, open_lo: bool = False) -> Check:
    def ok(v):
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        if lo is not None and (v <= lo if open_lo else v < lo):
            return False
        return hi is None or v <= hi

    if lo is None:
        return ok, "a number"
    bound = f"> {lo}" if open_lo else f">= {lo}"
    return ok, f"a number {bound}" + (f" and <= {hi}" if hi is not None else "")


def choice(options: Sequence[str]) -> Check:
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def boolean() -> Check:
    return (lambda v: isinstance(v, bool)), "true or false"


def string() -> Check:
    return (lambda v: isinstance(v, str)), "a string"


def mesh_axis() -> Check:
    return (lambda v: _is_int(v) and (v == -1 or v >= 1)), (
        "a positive integer or -1 (the devices left over)"
    )


def weights() -> Check:
    return (
        lambda v: (
            isinstance(v, tuple)
            and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in v)
        ),
        "a tuple of non-negative numbers, one per MTP depth (or empty)",
    )
