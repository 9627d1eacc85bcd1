"""A privacy ledger: the rounds a participant has spent, checked against a budget.

A client running DP-SGD keeps a :class:`PrivacyLedger` in its persistent
``context.state`` (as a Flower ``ConfigRecord``, via :meth:`PrivacyLedger.to_config`)
and, before each round, asks whether the round fits::

    ledger = PrivacyLedger.from_config(state)        # or PrivacyLedger(3.0, 1e-5)
    exceeds, epsilon_after = ledger.would_exceed(sigma, q, steps)
    if exceeds:
        reason = ledger.refusal_reason(sigma, q, steps)  # one line, for the reply
    else:
        ...train...
        ledger.record(sigma, q, steps)

Epsilon is computed from the whole history by Opacus's accountants (see
:mod:`fedsec.privacy.accounting`): composition across rounds is exact in RDP
(Mironov, "Rényi Differential Privacy", CSF 2017) and in PRV (Gopi, Lee,
Wutschitz, NeurIPS 2021), rather than a sum of per-round epsilons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedsec.privacy.accounting import (
    Accountant,
    HistoryEntry,
    check_accountant,
    check_delta,
    check_entry,
    epsilon_for_history,
)

#: Type of :meth:`PrivacyLedger.to_config`: what a Flower ``ConfigRecord`` holds.
ConfigValue = int | float | str | list[float] | list[int]

_KEYS = ("epsilon_budget", "delta", "accountant", "noise_multipliers", "sample_rates", "steps")


def _format_pair(spent: float, budget: float) -> tuple[str, str]:
    """Format two epsilons with 2 decimals, more if needed to tell them apart."""
    for digits in range(2, 10):
        a, b = f"{spent:.{digits}f}", f"{budget:.{digits}f}"
        if a != b:
            return a, b
    return f"{spent!r}", f"{budget!r}"


@dataclass
class PrivacyLedger:
    """Privacy budget and spending history of one participant.

    Parameters
    ----------
    epsilon_budget : float
        Total epsilon the participant accepts to spend (> 0).
    delta : float
        The delta at which epsilon is computed, in (0, 1).
    accountant : {"rdp", "prv"}
        Opacus accountant used (see :mod:`fedsec.privacy.accounting`).
    history : list of (noise_multiplier, sample_rate, steps)
        One entry per recorded round: the round ran ``steps`` steps of the
        Poisson-subsampled Gaussian mechanism (DP-SGD; Abadi et al., CCS 2016)
        with that noise multiplier and sampling rate.

    Notes
    -----
    :meth:`spent` caches its value for the current history; the cache is
    invalidated by :meth:`record` (mutate ``history`` through :meth:`record` only).
    """

    epsilon_budget: float
    delta: float
    accountant: Accountant = "rdp"
    history: list[HistoryEntry] = field(default_factory=list)
    _cache: tuple[int, float] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        budget = self.epsilon_budget
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise ValueError(f"epsilon_budget must be a number, got {budget!r}")
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"epsilon_budget must be finite and > 0, got {budget!r}")
        self.epsilon_budget = float(budget)
        self.delta = check_delta(self.delta)
        self.accountant = check_accountant(self.accountant)
        self.history = [check_entry(*entry) for entry in self.history]

    def spent(self) -> float:
        """Epsilon spent so far by the recorded rounds (0.0 before the first)."""
        key = len(self.history)
        if self._cache is None or self._cache[0] != key:
            epsilon = epsilon_for_history(
                self.history, delta=self.delta, accountant=self.accountant
            )
            self._cache = (key, epsilon)
        return self._cache[1]

    def remaining(self) -> float:
        """Budget left, ``max(0, epsilon_budget - spent())``."""
        return max(0.0, self.epsilon_budget - self.spent())

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon spent once a round with these parameters is added to the history."""
        entry = check_entry(noise_multiplier, sample_rate, steps)
        return epsilon_for_history(
            [*self.history, entry], delta=self.delta, accountant=self.accountant
        )

    def would_exceed(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> tuple[bool, float]:
        """Whether a round with these parameters would exceed the budget.

        Returns
        -------
        (bool, float)
            ``(epsilon_after > epsilon_budget, epsilon_after)``, with
            ``epsilon_after`` the epsilon spent after that round.
        """
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps)
        return epsilon > self.epsilon_budget, epsilon

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Append a round that was run to the history and return the epsilon now spent.

        Recording does not enforce the budget (the round has happened); check
        :meth:`would_exceed` before running it.
        """
        self.history.append(check_entry(noise_multiplier, sample_rate, steps))
        return self.spent()

    def refusal_reason(self, noise_multiplier: float, sample_rate: float, steps: int) -> str:
        """The one-line message for refusing a round that would exceed the budget.

        Format (epsilons with 2 decimals, more when needed to tell them apart)::

            privacy budget exhausted: next round would spend epsilon 3.41 > budget 3.00
            (delta 1e-05, rdp)

        on one line, where 3.41 is the cumulative epsilon after the round.

        Raises
        ------
        ValueError
            If the round would not exceed the budget.
        """
        exceeds, epsilon = self.would_exceed(noise_multiplier, sample_rate, steps)
        if not exceeds:
            raise ValueError(
                f"the round fits the budget (epsilon {epsilon:.4f} <= "
                f"{self.epsilon_budget:.4f}); there is nothing to refuse"
            )
        spent, budget = _format_pair(epsilon, self.epsilon_budget)
        return (
            f"privacy budget exhausted: next round would spend epsilon {spent} > "
            f"budget {budget} (delta {self.delta:g}, {self.accountant})"
        )

    def to_config(self) -> dict[str, ConfigValue]:
        """The ledger as ``ConfigRecord`` values: scalars and flat lists only.

        Keys: ``epsilon_budget``, ``delta`` (float), ``accountant`` (str),
        ``noise_multipliers``, ``sample_rates`` (list of float) and ``steps``
        (list of int), the history column by column.
        """
        return {
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "noise_multipliers": [float(sigma) for sigma, _, _ in self.history],
            "sample_rates": [float(q) for _, q, _ in self.history],
            "steps": [int(steps) for _, _, steps in self.history],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_config`'s values (or a ``ConfigRecord``).

        Raises
        ------
        ValueError
            If a key is missing or the history columns differ in length.
        """
        missing = [key for key in _KEYS if key not in config]
        if missing:
            raise ValueError(f"privacy ledger config lacks {', '.join(missing)}")
        columns = [list(config[key]) for key in ("noise_multipliers", "sample_rates", "steps")]
        if len({len(column) for column in columns}) != 1:
            raise ValueError(
                "privacy ledger config has history columns of different lengths: "
                f"{', '.join(str(len(column)) for column in columns)}"
            )
        return cls(
            epsilon_budget=config["epsilon_budget"],
            delta=config["delta"],
            accountant=config["accountant"],
            history=[(float(s), float(q), int(t)) for s, q, t in zip(*columns, strict=True)],
        )
