"""Argument checks shared by the constructors; each error says what is allowed."""

from __future__ import annotations

import math
from typing import Optional


def is_finite_number(value: object) -> bool:
    """A finite int or float, and not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_finite(name: str, value: float) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_positive_int_or_none(name: str, value: Optional[int]) -> None:
    """Raise unless ``value`` is ``None`` or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


def check_pattern_list(name: str, patterns: object) -> None:
    """Raise unless ``patterns`` is ``None`` or a list of non-empty strings (not one bare string)."""
    if isinstance(patterns, str):
        raise ValueError(f"{name} must be a list of patterns, got the string {patterns!r}; write [{patterns!r}]")
    for pattern in patterns or ():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{name} patterns must be non-empty strings, got {pattern!r}")
