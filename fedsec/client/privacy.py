"""Client-side differential privacy: the per-round plan and the persistent ledger.

A client's :class:`~fedsec.privacy.ledger.PrivacyLedger` lives in its Flower
``context.state`` (a ConfigRecord), so it survives across rounds. Before a
round the client computes what the round would spend; if that would exceed
its budget it refuses to train and replies with the ledger's one-line reason.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context

from fedsec.config import ExperimentConfig
from fedsec.privacy.accounting import solve_noise_multiplier
from fedsec.privacy.dpsgd import dp_sgd_steps
from fedsec.privacy.ledger import PrivacyLedger

LEDGER_KEY = "fedsec.privacy-ledger"
#: Error code of a reply refused for privacy (any code Flower leaves free).
PRIVACY_BUDGET_EXHAUSTED = 4001


@dataclass(frozen=True)
class RoundPlan:
    """What one round of the client's training costs, for the accountant."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@functools.lru_cache(maxsize=64)
def _solve(target: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return solve_noise_multiplier(
        target_epsilon=target,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
    )


def plan_round(cfg: ExperimentConfig, num_examples: int) -> RoundPlan:
    """The round's noise multiplier, sampling rate and steps.

    DP-SGD: Poisson sampling at ``q = batch_size / n`` and ``1 / q`` expected
    steps per epoch. Local DP: one Gaussian mechanism on the whole update.
    With ``target_epsilon`` the noise is solved for the whole run (every
    round, as if the client took part in all of them), before training.
    """
    dp = cfg.privacy
    rounds = cfg.experiment.rounds
    if dp.mode == "dp-sgd":
        rate = min(1.0, cfg.client.batch_size / num_examples)
        steps = dp_sgd_steps(
            num_examples,
            cfg.client.batch_size,
            cfg.client.local_epochs,
            cfg.client.local_steps or None,
        )
    else:
        rate, steps = 1.0, 1
    sigma = dp.noise_multiplier or _solve(
        dp.target_epsilon, dp.delta, rate, steps * rounds, dp.accountant
    )
    return RoundPlan(noise_multiplier=sigma, sample_rate=rate, steps=steps)


def load_ledger(context: Context, cfg: ExperimentConfig) -> PrivacyLedger:
    """The client's ledger from its persistent state, or a new one.

    The budget is ``privacy.epsilon_budget``, else ``target_epsilon``; with
    neither (a fixed noise multiplier) spending is recorded but never refused.
    """
    record = context.state.config_records.get(LEDGER_KEY)
    if record is not None:
        return PrivacyLedger.from_config(dict(record))
    dp = cfg.privacy
    budget = dp.epsilon_budget or dp.target_epsilon or sys.float_info.max
    return PrivacyLedger(epsilon_budget=budget, delta=dp.delta, accountant=dp.accountant)  # type: ignore[arg-type]


def save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Store the ledger in the client's persistent state."""
    context.state[LEDGER_KEY] = ConfigRecord(ledger.to_config())  # type: ignore[arg-type]
