"""Argument checks shared by the constructors: small pure functions that return the value
normalized (numpy and 0-d torch numbers as Python ``float``/``int``, a tuple of patterns as a
list) or raise.

Every error names the argument, shows what was given and says what is allowed: ``TypeError``
when the type is wrong (the message adds the type given), ``ValueError`` when the type is right
and the value is not.

Examples:
    >>> finite_number("gain", 2, "a finite number > 0", above=0)
    2.0
    >>> pattern_list("exclude", "rnn*")
    Traceback (most recent call last):
    ...
    TypeError: exclude must be a list of glob patterns, got the string 'rnn*'; write exclude=['rnn*']
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Mapping, Optional

import torch

__all__ = [
    "as_integer",
    "as_real",
    "boolean",
    "choice",
    "finite_number",
    "gate_counts",
    "given",
    "integer",
    "norm_order",
    "optional_integer",
    "optional_string",
    "pattern_list",
    "real_number",
]


def given(value: object) -> str:
    """``value`` as a type error shows it: its repr and its type, e.g. ``'1.0' (str)``."""
    return f"{value!r} ({type(value).__name__})"


def _real_tensor(value: object) -> bool:
    """Whether ``value`` is a 0-d torch tensor of a real dtype (not bool, not complex)."""
    return (
        isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.dtype.is_complex
    )


def as_real(value: object) -> Optional[float]:
    """``value`` as a float when it is a real number (an int, a float, a numpy real scalar or a 0-d
    torch tensor of a real dtype; not a bool, although ``True`` is an ``int`` in Python), else ``None``.
    An integer beyond the float range becomes an infinity.

    Examples:
        >>> as_real(3), as_real(torch.tensor(0.5)), as_real(True), as_real("1"), as_real(-10**400)
        (3.0, 0.5, None, None, -inf)
    """
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _real_tensor(value)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int too large for a float
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]


def as_integer(value: object) -> Optional[int]:
    """``value`` as an int when it is an integer (an int, a numpy integer or a 0-d torch tensor of
    an integer dtype; not a bool, not a float such as ``5.0``), else ``None``.

    Examples:
        >>> as_integer(5), as_integer(torch.tensor(5)), as_integer(5.0), as_integer(False)
        (5, 5, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral) or (_real_tensor(value) and not value.dtype.is_floating_point):  # type: ignore[union-attr]
        return int(value)  # type: ignore[call-overload]
    return None


def real_number(name: str, value: object, allowed: str) -> float:
    """``value`` as a float (see :func:`as_real`).

    Raises:
        TypeError: ``value`` is not a real number; the message says ``name`` must be ``allowed``.
    """
    number = as_real(value)
    if number is None:
        raise TypeError(f"{name} must be {allowed}, got {given(value)}")
    return number


def finite_number(name: str, value: object, allowed: str, *, above: float = -math.inf, below: float = math.inf) -> float:
    """``value`` as a float; it must be a finite real number strictly between ``above`` and ``below``.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite, or out of range; both say ``name`` must be ``allowed``.
    """
    number = real_number(name, value, allowed)
    if not (math.isfinite(number) and above < number < below):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def optional_integer(
    name: str, value: object, allowed: str, *, minimum: int, maximum: Optional[int] = None
) -> Optional[int]:
    """``None``, or ``value`` as an int (see :func:`as_integer`) in ``[minimum, maximum]``.

    Raises:
        TypeError: neither ``None`` nor an integer.
        ValueError: an integer out of range; both say ``name`` must be ``allowed``.
    """
    if value is None:
        return None
    number = as_integer(value)
    if number is None:
        raise TypeError(f"{name} must be {allowed}, got {given(value)}")
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def integer(name: str, value: object, allowed: str, *, minimum: int) -> int:
    """``value`` as an int (see :func:`as_integer`), at least ``minimum``.

    Raises:
        TypeError: not an integer (``None`` included).
        ValueError: below ``minimum``; both say ``name`` must be ``allowed``.
    """
    number = None if value is None else optional_integer(name, value, allowed, minimum=minimum)
    if number is None:
        raise TypeError(f"{name} must be {allowed}, got {given(value)}")
    return number


def norm_order(name: str, value: object) -> float:
    """The p of a p-norm as a float: a number > 0, ``math.inf``, or the string ``"inf"`` (as torch accepts).

    Raises:
        TypeError: neither a real number nor a string.
        ValueError: a number <= 0 or NaN, or another string.

    Examples:
        >>> norm_order("clip_norm_type", "inf"), norm_order("clip_norm_type", 1)
        (inf, 1.0)
    """
    allowed = "a number > 0, math.inf or 'inf' (the p of the p-norm)"
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "+inf"):
            return math.inf
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    number = real_number(name, value, allowed)
    if not number > 0:  # NaN too
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def boolean(name: str, value: object) -> bool:
    """``value``, which must be ``True`` or ``False`` (a string such as ``"no"`` is refused, not read as true).

    Raises:
        TypeError: anything but a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {given(value)}")
    return value


def optional_string(name: str, value: object, allowed: str) -> Optional[str]:
    """``value`` unchanged when it is ``None`` or a string.

    Raises:
        TypeError: anything else; the message says ``name`` must be ``allowed``.
    """
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be {allowed}, got {given(value)}")
    return value


def choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` as one of the lower-case strings ``choices``, in any case (``"Skip"`` is ``"skip"``),
    as the scheme names and ``clip`` are read.

    Raises:
        TypeError: not a string.
        ValueError: a string that is not one of ``choices``, with the closest one if any.

    Examples:
        >>> choice("on_nonfinite", "Skip", ("warn", "skip", "raise"))
        'skip'
        >>> choice("on_nonfinite", "rasie", ("warn", "skip", "raise"))
        Traceback (most recent call last):
        ...
        ValueError: on_nonfinite must be one of 'warn', 'skip', 'raise', got 'rasie'. Did you mean 'raise'?
    """
    allowed = f"one of {', '.join(map(repr, choices))}"
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {allowed}, got {given(value)}")
    if value.lower() not in choices:
        closest = difflib.get_close_matches(value.lower(), choices, n=1)
        hint = f". Did you mean {closest[0]!r}?" if closest else ""
        raise ValueError(f"{name} must be {allowed}, got {value!r}{hint}")
    return value.lower()


def _pattern(name: str, pattern: object) -> str:
    """One glob pattern of the argument ``name``: a non-empty string."""
    if not isinstance(pattern, str):
        raise TypeError(f"{name} patterns must be non-empty strings (globs over names), got {given(pattern)}")
    if not pattern:
        raise ValueError(f"{name} patterns must be non-empty strings (globs over names), got ''")
    return pattern


def pattern_list(name: str, value: object) -> Optional[list[str]]:
    """``None`` (also for an empty list), or ``value``, a list or tuple of non-empty glob patterns, as a list.

    One bare string is refused: iterating it would give one pattern per character.

    Raises:
        TypeError: a string, anything but a list or tuple, or a pattern that is not a string.
        ValueError: an empty pattern.
    """
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of glob patterns, got the string {value!r}; write {name}=[{value!r}]")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be None or a list of glob patterns (non-empty strings), got {given(value)}")
    return [_pattern(name, pattern) for pattern in value] or None


def gate_counts(name: str, value: object) -> Optional[dict[str, int]]:
    """``None`` (also for an empty dict), or ``value``, a mapping of glob pattern -> gate count (an
    integer >= 1: the number of gate blocks stacked along the matrix's rows), as a dict.

    Raises:
        TypeError: not a mapping, a pattern that is not a string, or a gate count that is not an integer.
        ValueError: an empty pattern or a gate count below 1.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{name} must be None or a dict of glob pattern -> gate count, e.g. {name}={{'cell.W_hh': 4}}, got {given(value)}"
        )
    allowed = "an integer >= 1 (4 for LSTM-like gates, 3 for GRU-like, 1 for a plain RNN)"
    counts: dict[str, int] = {}
    for pattern, gates in value.items():
        prefix = f"{name} pattern {_pattern(name, pattern)!r}: the gate count must be {allowed}"
        count = as_integer(gates)
        if count is None:
            raise TypeError(f"{prefix}, got {given(gates)}")
        if count < 1:
            raise ValueError(f"{prefix}, got {gates!r}")
        counts[pattern] = count
    return counts or None
