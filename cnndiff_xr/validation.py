"""Checks of user-given parameters: one function per kind of value, one exception type per kind of mistake.

Every public function validates its arguments here before doing any work, so that a mistake is reported the same
way wherever it is made, naming the parameter, what it accepts and what it got:

* :class:`ParameterTypeError` -- a value of the wrong type (``batch_size=2.5``, ``progress="yes"``). It is both a
  ``TypeError`` and a ``ValueError``: callers written against either keep working.
* :class:`ParameterValueError` -- the right type, out of range (``batch_size=0``, ``interval=1.5``).
* :class:`ChoiceError` -- a string option that is not one of its choices (``norm="weird"``).
* :class:`UnknownLabelError` -- a layer, set or dimension name that is not in the data (also a ``KeyError``).

All four derive from :class:`ParameterError`. The module imports nothing from the package: both halves use it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "ParameterError",
    "ParameterTypeError",
    "ParameterValueError",
    "ChoiceError",
    "UnknownLabelError",
    "check_bool",
    "check_choice",
    "check_int",
    "check_optional_int",
    "check_count",
    "check_n_units",
    "check_fraction",
]

S = TypeVar("S", bound=str)


class ParameterError(ValueError):
    """A parameter that cannot be used; the message names it, what it accepts, and what was given."""


class ParameterTypeError(ParameterError, TypeError):
    """A parameter of the wrong type (a ``TypeError`` and, for callers that catch it so, a ``ValueError``)."""


class ParameterValueError(ParameterError):
    """A parameter of the right type whose value is out of range."""


class ChoiceError(ParameterValueError):
    """A string option that is not one of its allowed choices."""


class UnknownLabelError(KeyError, ParameterValueError):
    """A layer, set or other label that is not in the data (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_description(minimum: int | None) -> str:
    if minimum == 0:
        return "a non-negative int"
    if minimum == 1:
        return "a positive int"
    return "an int" if minimum is None else f"an int >= {minimum}"


def check_int(name: str, value: Any, minimum: int | None = None, *, what: str | None = None) -> int:
    """``value`` as an ``int`` >= ``minimum``.

    The message reads ``"{name} must be {what}, got {value!r}"``, ``what`` defaulting to "a positive int",
    "a non-negative int" or "an int >= N" from ``minimum``. A non-integer (a float, a bool, a string) is a
    :class:`ParameterTypeError`, a small integer a :class:`ParameterValueError`.
    """
    what = what or _int_description(minimum)
    if not is_int(value):
        raise ParameterTypeError(f"{name} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ParameterValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, minimum: int | None = None, *, what: str | None = None) -> int | None:
    """:func:`check_int`, or ``None`` when ``value`` is ``None``."""
    return None if value is None else check_int(name, value, minimum, what=what)


def check_count(parameter: str, value: Any, minimum: int) -> int:
    """An int >= ``minimum`` for the analysis' counts (``seed``, ``resamples``, ``block_size``): the message says
    ``"{parameter} must be an integer >= {minimum}, got {parameter}={value!r}"``."""
    what = f"an integer >= {minimum}"
    if not is_int(value):
        raise ParameterTypeError(f"{parameter} must be {what}, got {parameter}={value!r}")
    if value < minimum:
        raise ParameterValueError(f"{parameter} must be {what}, got {parameter}={value!r}")
    return int(value)


def check_index(name: str, value: Any) -> int:
    """An integer in the sense of ``operator.index`` (Python or numpy ints, not bools)."""
    if isinstance(value, (bool, np.bool_)):
        raise ParameterTypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ParameterTypeError(f"{name} must be an integer, got {type(value).__name__}: {value!r}") from None


def check_bool(name: str, value: Any, *, message: str | None = None) -> bool:
    """``value`` if it is ``True`` or ``False`` (numpy bools too); a :class:`ParameterTypeError` otherwise, with
    ``message`` if given (where a function keeps an established wording)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterTypeError(message or f"{name} must be True or False, got {name}={value!r}")
    return bool(value)


def check_choice(parameter: str, value: Any, allowed: Sequence[S], *, message: str | None = None) -> S:
    """``value`` if it is one of ``allowed``; a :class:`ChoiceError` naming the parameter and the choices, or saying
    ``message`` if given (where a function keeps an established wording)."""
    if not isinstance(value, str) or value not in allowed:
        raise ChoiceError(message or f"{parameter}={value!r} is not allowed; choose one of "
                          f"{', '.join(map(repr, allowed))}")
    return value  # type: ignore[return-value]  # value is one of allowed


def check_n_units(n_units: int | Iterable[int]) -> tuple[int, ...]:
    """``n_units`` (one or several unit counts) as a tuple of distinct positive ints."""
    values = [n_units] if np.ndim(n_units) == 0 else list(n_units)  # type: ignore[arg-type]
    if not values:
        raise ParameterValueError("n_units is empty; give one or more positive integers")
    out: list[int] = []
    for value in values:
        if not is_int(value):
            raise ParameterTypeError(f"n_units must hold positive integers, got n_units={value!r}")
        count = int(value)  # type: ignore[arg-type]  # an integer: is_int
        if count <= 0:
            raise ParameterValueError(f"n_units must be positive, got n_units={count}")
        out.append(count)
    if len(set(out)) != len(out):
        raise ParameterValueError(f"n_units has repeated values: {out}")
    return tuple(out)


def check_fraction(name: str, value: Any, example: float) -> float:
    """A number strictly between 0 and 1 (``interval=0.95``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating)):
        raise ParameterTypeError(f"{name} must be a number in (0, 1), e.g. {example}, got {name}={value!r}")
    if not 0 < value < 1:
        raise ParameterValueError(f"{name} must be a number in (0, 1), e.g. {example}, got {name}={value!r}")
    return float(value)
