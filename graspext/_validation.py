"""Argument checks shared by every config and option class: one wording for one kind of mistake."""

from __future__ import annotations

import math
import numbers


def integer(value, name: str, minimum: int) -> int:
    """``value`` as an int, or ValueError "``name`` must be an int >= ``minimum``" (True/False are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def positive(value, name: str) -> float:
    """``value`` as a float, or ValueError "``name`` must be a positive finite number"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
