"""Numeric input checks shared by the Python API's settings, the CLI's options and the server: a NaN, an infinity,
a negative or out-of-range value becomes one `InputError` naming the setting and the range it takes."""

from __future__ import annotations

import math
from numbers import Integral, Real

from personascope.errors import InputError

#: The least positive sampling temperature: below it logits / temperature overflow to inf and NaN.
MIN_TEMPERATURE = 0.01
#: The repetition penalty's range: near 0 it overflows the logits as a tiny temperature does.
REPETITION_PENALTY_RANGE = (0.1, 10.0)
#: Seeds torch's generators take without overflow (signed 64-bit).
SEED_RANGE = (-(2**63), 2**63 - 1)


def _text(bound: float) -> str:
    return f"{bound:g}" if abs(bound) < 1e15 else str(bound)  # whole seeds, not 9.22337e+18


def _bounds(low: float | None, high: float | None, open_low: bool) -> str:
    if low is not None and high is not None:
        return f"must be in {'(' if open_low else '['}{_text(low)}, {_text(high)}]"
    if low is not None:
        return f"must be {'above' if open_low else 'at least'} {_text(low)}"
    return f"must be at most {_text(high)}" if high is not None else "must be a finite number"


def check_number(name: str, value: float, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False) -> float:
    """`value` when it is a finite number in `[low, high]` (`(low, high]` with `open_low`), else `InputError`.

    Example:
        >>> check_number("top_p", 0.9, 0, 1, open_low=True)
        0.9
    """
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{name} {value!r} is not a finite number")
    if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
        raise InputError(f"{name} {value!r} {_bounds(low, high, open_low)}")
    return value


def check_count(name: str, value: int, low: int = 1, high: int | None = None) -> int:
    """`value` when it is a whole number in `[low, high]` (default: at least 1), else `InputError`."""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise InputError(f"{name} {value!r} must be a whole number")
    check_number(name, value, low, high)
    return int(value)


def check_temperature(name: str, value: float) -> float:
    """0 (greedy) or a finite temperature of at least `MIN_TEMPERATURE`."""
    if value != 0:
        check_number(name, value, MIN_TEMPERATURE)
    return value


def check_sampling(*, temperature: float, top_p: float, repetition_penalty: float = 1.0, seed: int = 0,
                   max_new_tokens: int = 1) -> None:
    """The checks of one decoding's settings, each named by its field."""
    check_temperature("temperature", temperature)
    check_number("top_p", top_p, 0, 1, open_low=True)
    check_number("repetition_penalty", repetition_penalty, *REPETITION_PENALTY_RANGE)
    check_count("seed", seed, *SEED_RANGE)
    check_count("max_new_tokens", max_new_tokens)
