"""The threat model of a simulated experiment: who is malicious and what they know.

The ``[attack]`` section of an experiment config names one attack and fixes:

- which clients are malicious: ``num_malicious`` (or ``fraction`` of
  ``data.num_clients``) partitions, a fixed set drawn with the experiment seed;
- what the colluding adversary knows: ``knowledge = "colluders"`` (default: the
  malicious clients' own honest updates only) or ``"omniscient"`` (all honest
  updates of the round), and ``adaptive`` (whether the aggregation rule is
  known and targeted);
- from which round it acts (``start_round``) and its parameters (``params``);
- ``boost``: a factor on the malicious clients' updates (model replacement,
  Bagdasaryan et al. 2020); 0 means n / (server.lr * m), the paper's n / eta
  shared among the m malicious clients expected in a round.

Where each attack acts, as a real adversary could:

- data poisoning (``label-flip``, ``backdoor``) changes the malicious clients'
  training data inside the ClientApp, so it also runs in a deployment;
- model poisoning that needs no collusion (``sign-flip``, ``gaussian``,
  ``scaling``) and ``boost`` change each malicious client's own update inside
  the ClientApp, likewise;
- colluding attacks (``alie``, ``ipm``, ``min-max``, ``min-sum``,
  ``fang-krum``, ``fang-trimmed-mean``, ``mimic``) pool the malicious clients'
  updates in the simulation's adversary component, which sits between the
  clients and the server (``fedsec.strategies.adversary``): the server's own
  view is never used to attack.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from fedsec.attacks.base import ModelPoisoningAttack
from fedsec.wire import MALICIOUS_TAG as MALICIOUS_TAG
from fedsec.wire import TRUTH_TAG as TRUTH_TAG

KNOWLEDGE = ("colluders", "omniscient")

# MALICIOUS_TAG (the reply metric by which a colluding client identifies itself to the
# simulation's adversary component) and TRUTH_TAG (the referee's ground truth; removed
# before the strategy sees the reply, never sent under secure aggregation) are defined in
# fedsec.wire (re-exported here).

#: Environment variable that puts ClientApps in the simulation's adversary mode. Only
#: then do malicious clients tag their replies and hand colluders' plain updates to
#: the adversary component: in a deployment there is no such component between the
#: clients and the server, and a server must never be able to ask for a plain update.
SIMULATED_ADVERSARY_ENV = "FEDSEC_SIMULATED_ADVERSARY"


def simulated_adversary() -> bool:
    """Whether this process runs clients of a simulation with an adversary component."""
    return os.environ.get(SIMULATED_ADVERSARY_ENV) == "1"


def enable_simulated_adversary() -> dict[str, str]:
    """Turn the adversary mode on for this process and the workers it starts.

    Returns the variable, for engines whose workers do not inherit the
    environment (a Ray ``runtime_env``'s ``env_vars``).
    """
    os.environ[SIMULATED_ADVERSARY_ENV] = "1"
    return {SIMULATED_ADVERSARY_ENV: "1"}


def num_malicious(num_clients: int, count: int, fraction: float) -> int:
    """Malicious clients: ``count`` if set, else ``round(fraction * num_clients)``."""
    return count if count > 0 else round(fraction * num_clients)


def malicious_partitions(num_clients: int, count: int, seed: int) -> frozenset[int]:
    """The fixed set of malicious partition ids, drawn with the experiment seed."""
    rng = random.Random(f"{seed}:malicious")
    return frozenset(rng.sample(range(num_clients), count))


def round_generator(seed: int, server_round: int, salt: int = 0) -> torch.Generator:
    """A generator for one round's attack randomness, reproducible on resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + server_round * 7_919 + salt)


def build_attack(
    name: str, params: dict[str, Any], omniscient: bool, dataset: str | None = None
) -> Any:
    """Instantiate the attack registered as ``name`` (model or data poisoning).

    ``dataset`` (a registered data set name) supplies what data attacks need
    to know about the inputs: the class count and the valid pixel range (the
    backdoor trigger takes the brightest valid value).

    Raises
    ------
    ValueError
        For unknown parameters or invalid values, in one line.
    """
    from fedsec.aggregation.registry import parameters_of
    from fedsec.attacks.data_poisoning import DATA_ATTACKS
    from fedsec.attacks.model_poisoning import MODEL_ATTACKS

    cls: Any = DATA_ATTACKS.get(name) if name in DATA_ATTACKS else MODEL_ATTACKS.get(name)
    params = dict(params)
    accepted = parameters_of(cls)
    if "omniscient" in accepted:
        params["omniscient"] = omniscient
    if dataset is not None:
        from fedsec.data import DATASETS, pixel_bounds

        info = DATASETS.get(dataset)
        if "bounds" in accepted:
            params.setdefault("bounds", pixel_bounds(info))
        if "num_classes" in accepted:
            params.setdefault("num_classes", info.num_classes)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        valid = ", ".join(p for p in accepted if p not in ("omniscient", "bounds")) or "none"
        raise ValueError(f"attack '{name}' has no parameter {unknown[0]!r}; valid: {valid}")
    try:
        return cls(**params)
    except TypeError as err:
        raise ValueError(f"attack '{name}': {err}") from None


def is_colluding(attack: Any) -> bool:
    """Whether ``attack`` needs the adversary component (pooled updates)."""
    return isinstance(attack, ModelPoisoningAttack) and type(attack).collusion


def effective_boost(
    boost: float, num_clients: int, server_lr: float, num_attackers: float = 1.0
) -> float:
    """``boost``, with 0 meaning model replacement's gamma = n / (eta * m).

    Bagdasaryan et al. (AISTATS 2020) scale one attacker's update by n / eta so
    that it replaces the averaged model; m attackers in a round share that
    scale, each boosting by n / (eta * m).
    """
    return num_clients / (server_lr * max(num_attackers, 1.0)) if boost == 0 else boost
