"""Simulated colluding attacks for any Flower app: one object, a client mod and a server filter.

Colluding attacks (ALIE, Baruch et al. 2019; IPM, Xie et al. 2020; Min-Max and
Min-Sum, Shejwalkar and Houmansadr 2021; Fang et al. 2020; Mimic, Karimireddy
et al. 2022) pool the malicious clients' updates before the server sees them.
A :class:`Collusion` configures one such attack and hands out its two halves:
the malicious clients' mod (:func:`fedsec.client.collusion.collusion_mod`) and
the adversary that pools and crafts (:class:`fedsec.strategies.adversary.
AdversaryFilter`), a filter of the server-side pipeline. In a Flower app::

    from fedsec.attacks.threat import enable_simulated_adversary
    from fedsec.simulation import Collusion

    enable_simulated_adversary()  # this process and the workers it starts
    collusion = Collusion("ipm", malicious={0, 1}, params={"epsilon": 100.0}, seed=0)
    client_app = ClientApp(mods=[collusion.client_mod()])
    strategy = FedSecStrategy(rule=make("median"), filters=[collusion.server_filter()])

Under secure aggregation the mod wraps fedsec's SecAgg mod, in its place:
``ClientApp(mods=[collusion.client_mod(secagg_mod)])`` with
``FedSecStrategy(rule=make("mean"), secure=SecureAggregation(), filters=[...])``.

The switch. Nothing colludes unless the process running the ClientApps has
turned the simulation's adversary mode on:
:func:`fedsec.attacks.threat.enable_simulated_adversary` sets
``FEDSEC_SIMULATED_ADVERSARY=1`` for the process and the workers it starts
afterwards (call it before ``run_simulation``; for an engine whose workers do
not inherit the environment, pass the variable it returns in the backend's
``runtime_env``). fedsec's in-process grid, ``fedsec run`` and ``fedsec bench``
set it themselves. A deployed node never has it, so a ClientApp that keeps the
mod is, there, exactly its ``inner`` mod: no plain update ever leaves it.

Attacks that need no collusion (``sign-flip``, ``gaussian``, ``scaling``) run
on each malicious client alone: :func:`fedsec.client.attack_mods.attack_mod`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.clientapp.typing import Mod

from fedsec.aggregation import Rule
from fedsec.attacks.base import ModelPoisoningAttack
from fedsec.attacks.threat import KNOWLEDGE, build_attack, is_colluding, simulated_adversary
from fedsec.client.collusion import Malicious, _membership, collusion_mod
from fedsec.strategies.adversary import AdversaryFilter

logger = logging.getLogger("fedsec")

__all__ = ["Collusion"]


class Collusion:
    """A simulated colluding attack: the malicious clients' mod and the server-side adversary.

    Parameters
    ----------
    attack : ModelPoisoningAttack or str
        A configured colluding attack (e.g. ``IPM(epsilon=100)``) or its
        registered name (``"alie"``, ``"ipm"``, ``"min-max"``, ``"min-sum"``,
        ``"fang-krum"``, ``"fang-trimmed-mean"``, ``"mimic"``) with ``params``.
    malicious : set of int or callable
        Partition ids (node config ``partition-id``) of the colluders, or a
        predicate ``(msg, context) -> bool``.
    params : mapping, optional
        The attack's parameters, when ``attack`` is a name.
    knowledge : {"colluders", "omniscient"}
        What the adversary sees: the colluders' own honest updates, or also
        every honest update of the round (plain rounds only: under secure
        aggregation the honest updates stay masked).
    boost : float
        Factor on the crafted updates (0: n / (server_lr * m), model replacement).
    server_lr : float
        The server's learning rate (for ``boost = 0``).
    seed : int
        Seeds the attack's randomness per round.

    Raises
    ------
    ValueError
        In one line: a non-colluding or data-poisoning attack (with the mod to
        use instead), an unknown name or parameter, an unknown ``knowledge``.
    """

    def __init__(
        self,
        attack: ModelPoisoningAttack | str,
        *,
        malicious: Malicious,
        params: Mapping[str, Any] | None = None,
        knowledge: str = "colluders",
        boost: float = 1.0,
        server_lr: float = 1.0,
        seed: int = 0,
    ) -> None:
        if knowledge not in KNOWLEDGE:
            raise ValueError(f"knowledge must be one of {', '.join(KNOWLEDGE)}, got {knowledge!r}")
        for name, value in (("boost", boost), ("server_lr", server_lr)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        _membership(malicious)  # refuses a malformed set now, not in the first round
        if not simulated_adversary():
            # Not an error: the ClientApps may run in workers that set it themselves.
            logger.warning(
                "Collusion(%s): the simulated-adversary switch is off in this process; "
                "colluders act only where enable_simulated_adversary() ran before the "
                "ClientApps started (fedsec's engines set it)",
                attack if isinstance(attack, str) else type(attack).__name__,
            )
        self.attack = _resolve(attack, params, omniscient=knowledge == "omniscient")
        self.malicious = malicious
        self.knowledge = knowledge
        self.boost = float(boost)
        self.server_lr = float(server_lr)
        self.seed = seed

    def client_mod(self, inner: Mod | None = None) -> Mod:
        """The malicious clients' mod; ``inner`` is ``secagg_mod`` under secure aggregation.

        It takes ``inner``'s place in ``ClientApp(mods=[...])`` (it wraps it), after
        any signing mod.
        """
        return collusion_mod(inner, malicious=self.malicious)

    def server_filter(
        self,
        rule: Rule | None = None,
        reference_fn: Callable[[ArrayRecord], torch.Tensor] | None = None,
    ) -> AdversaryFilter:
        """A fresh adversary filter for the server's pipeline.

        ``rule``: the server's aggregation rule, for an adaptive attack (it
        probes a copy, so the server's rule keeps its state). ``reference_fn``:
        the server's root update of a global model, for an adaptive attack on
        a rule that requires a ``reference`` (FLTrust; pass an instance of its
        own, not the strategy's). The filter's ``malicious_nodes`` is the
        ground truth of the last training exchange.
        """
        return AdversaryFilter(
            self.attack,
            omniscient=self.knowledge == "omniscient",
            rule=copy.deepcopy(rule) if rule is not None else None,
            reference_fn=reference_fn,
            boost=self.boost,
            server_lr=self.server_lr,
            seed=self.seed,
        )

    def __repr__(self) -> str:
        return f"Collusion({self.attack!r}, knowledge={self.knowledge!r}, seed={self.seed})"


def _resolve(
    attack: ModelPoisoningAttack | str, params: Mapping[str, Any] | None, *, omniscient: bool
) -> ModelPoisoningAttack:
    """The configured colluding attack, refused in one line if it does not collude."""
    if isinstance(attack, str):
        from fedsec.attacks.data_poisoning import DATA_ATTACKS

        if attack in DATA_ATTACKS:
            raise ValueError(
                f"attack '{attack}' poisons training data, which happens in the client's own "
                "training, not through collusion"
            )
        built = build_attack(attack, dict(params or {}), omniscient=omniscient)
    else:
        if params:
            raise ValueError("params= only applies to an attack given by name")
        built = attack
    if not isinstance(built, ModelPoisoningAttack):
        raise TypeError(
            "attack must be a colluding attack's name or a ModelPoisoningAttack, got "
            f"{type(built).__name__}"
        )
    if not is_colluding(built):
        raise ValueError(
            f"attack '{built.name}' does not collude; run it on each malicious client with "
            "fedsec.client.attack_mods.attack_mod"
        )
    return built
