"""The field checks of the config sections: every failure is a ValueError naming the field (as a dotted path),
the value and the fix, in the one form ``<path>=<value> is invalid: <fix>``, the value quoted by :func:`shorten`
(its repr, bounded: a user's value may be huge), as every message of the config loader quotes one.

A ``Literal`` annotation is the only list of a field's valid values: :func:`literal_choices` reads it (once per
class) and :func:`check_choices` checks every such field of a section, so no choice is written twice.

Example:
    check_positive("optim.lr", self.lr)
    check_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
    check_choices(self, "loss")          # loss.name, loss.agg, ... against their Literal annotations

Design notes: docs/design/config.md
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import typing
from typing import Any, Literal

__all__ = ["shorten", "fail", "check_positive", "check_range", "check_choice", "check_choices", "literal_choices"]


def shorten(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters: a long string keeps its head and tail
    around '...', a collection its first items and levels (without walking the rest, so a shared structure of
    millions of leaves costs nothing). Values of normal length (a path, a number, a short list) come out whole."""
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset, r.maxfrozenset = 4, 8, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = max(limit - 20, 10)
    try:
        text = r.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<int of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fail(field_name: str, value: Any, fix: str) -> typing.NoReturn:
    raise ValueError(f"{field_name}={shorten(value)} is invalid: {fix}")


def check_positive(field_name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        fail(field_name, value, f"must be {'>= 0' if allow_zero else '> 0'}")


def check_range(field_name: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False) -> None:
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above or (isinstance(value, float) and math.isnan(value)):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        fail(field_name, value, f"must lie in {lb}{lo}, {hi}{rb}")


def check_choice(field_name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        fail(field_name, value, f"choose one of {', '.join(shorten(c) for c in choices)}")


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple]:
    """Each ``Literal``-annotated field of the dataclass ``cls`` -> its valid values, in annotation order."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is Literal}


def check_choices(section: Any, prefix: str) -> None:
    """Every ``Literal`` field of the dataclass instance ``section`` holds one of its annotation's values;
    the message names the field as ``<prefix>.<name>``."""
    for name, choices in literal_choices(type(section)).items():
        check_choice(f"{prefix}.{name}", getattr(section, name), choices)
