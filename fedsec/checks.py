"""Argument checks shared across fedsec: one-line ``ValueError`` naming the parameter.

Every message names the parameter and repeats the value given, e.g.
``clip must be finite and > 0, got -1``, so a bad argument reads the same
wherever it is refused. Booleans are refused as numbers (``True`` is an int
in Python, never a meaningful rate or count); numpy scalars are accepted.

:func:`check_number` and :func:`check_int` serve the privacy mechanisms
(:mod:`fedsec.privacy`) and the audits (:mod:`fedsec.audit`);
:func:`check_finite_number` is the one-message form that the model-poisoning
attacks and several aggregation rules use. The experiment config has its own
checks (:mod:`fedsec.config`): its errors name a config field and carry
:class:`~fedsec.config.ConfigError`.
"""

from __future__ import annotations

import math
import numbers


def _relation(minimum: float, strict: bool) -> str:
    return f"{'>' if strict else '>='} {minimum:g}"


def _in_range(value: float, minimum: float, strict: bool) -> bool:
    return math.isfinite(value) and (value > minimum if strict else value >= minimum)


def check_number(name: str, value: object, *, minimum: float = 0.0, strict: bool = True) -> float:
    """``value`` as a float if it is a finite number ``> minimum`` (``>=`` unless ``strict``).

    Raises
    ------
    ValueError
        ``"<name> must be a number, got <value>"`` for a non-number (or a
        bool), ``"<name> must be finite and > <minimum>, got <value>"`` for a
        number out of range, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not _in_range(number, minimum, strict):
        raise ValueError(f"{name} must be finite and {_relation(minimum, strict)}, got {value!r}")
    return number


def check_finite_number(
    name: str, value: object, *, minimum: float = 0.0, strict: bool = True
) -> float:
    """As :func:`check_number`, with one message for every failure.

    Raises
    ------
    ValueError
        ``"<name> must be a finite number > <minimum>, got <value>"``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not _in_range(float(value), minimum, strict)
    ):
        raise ValueError(
            f"{name} must be a finite number {_relation(minimum, strict)}, got {value!r}"
        )
    return float(value)


def check_int(name: str, value: object, *, minimum: int = 0) -> int:
    """``value`` as an int if it is an integer (not a bool) ``>= minimum``.

    Raises
    ------
    ValueError
        ``"<name> must be an integer >= <minimum>, got <value>"``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def short_repr(value: object, limit: int = 60) -> str:
    """``value`` as text cut to ``limit`` characters (client-controlled text goes into logs)."""
    if isinstance(value, str):
        value = value[: limit + 1]  # never repr a megabyte to keep 60 characters of it
    elif isinstance(value, tuple | list) and len(value) > 16:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = str(value) if isinstance(value, BaseException) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
