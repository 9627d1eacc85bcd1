"""fedsec.checks: the shared number validators and the modules that use them (issue 18, item 6)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from fedsec.checks import check_finite_number, check_int, check_number


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_number("clip", "1"), "clip must be a number, got '1'"),
        (lambda: check_number("clip", True), "clip must be a number, got True"),
        (lambda: check_number("clip", 0), "clip must be finite and > 0, got 0"),
        (
            lambda: check_number("clip", -1.5, strict=False),
            "clip must be finite and >= 0, got -1.5",
        ),
        (lambda: check_number("q", math.nan, minimum=-1), "q must be finite and > -1, got nan"),
        (lambda: check_number("q", math.inf), "q must be finite and > 0, got inf"),
        (lambda: check_finite_number("tau", "x"), "tau must be a finite number > 0, got 'x'"),
        (lambda: check_finite_number("tau", False), "tau must be a finite number > 0, got False"),
        (
            lambda: check_finite_number("c", -0.5, strict=False),
            "c must be a finite number >= 0, got -0.5",
        ),
        (lambda: check_int("steps", 1.0, minimum=1), "steps must be an integer >= 1, got 1.0"),
        (lambda: check_int("steps", True), "steps must be an integer >= 0, got True"),
        (lambda: check_int("steps", -1), "steps must be an integer >= 0, got -1"),
    ],
)
def test_one_line_errors_name_the_parameter_and_the_value(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_valid_values_come_back_normalised() -> None:
    assert check_number("x", 3) == 3.0 and isinstance(check_number("x", 3), float)
    assert check_number("x", 0, strict=False) == 0.0
    assert check_number("x", np.float32(0.5)) == 0.5  # numpy scalars are numbers
    assert check_finite_number("x", np.int64(2)) == 2.0
    value = check_int("n", np.int64(4), minimum=1)
    assert value == 4 and type(value) is int


def test_the_callers_share_the_checks() -> None:
    from fedsec.attacks.model_poisoning.base import check_number as attack_number
    from fedsec.audit import _checks
    from fedsec.privacy.accounting import check_entry
    from fedsec.privacy.per_example import _check_positive

    assert _checks._check_number is check_number and _checks._check_int is check_int
    with pytest.raises(ValueError, match=r"^alie: z must be a finite number > 0, got -1$"):
        attack_number("alie", "z", -1)
    with pytest.raises(ValueError, match=r"^max_grad_norm must be finite and > 0, got 0$"):
        _check_positive("max_grad_norm", 0)
    with pytest.raises(ValueError, match=r"^noise_multiplier must be finite and >= 0, got -1$"):
        check_entry(-1, 0.5, 1)
