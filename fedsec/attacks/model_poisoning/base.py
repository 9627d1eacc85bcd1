"""Shared parts of the model-poisoning attacks: registry, checks, rule probing.

Every attack module of this package registers its classes in
:data:`MODEL_ATTACKS` with :func:`register` at import; the package imports
all of its modules, so adding an attack is one new file here (plus its test).
Parameters are checked here in one line naming the attack and the parameter;
:func:`validate_view` checks an :class:`~fedsec.attacks.base.AdversaryView`.

Adaptive attacks evaluate the server's rule with :func:`probe`, which restores
the rule's state afterwards, after :func:`can_probe` says the rule can be
evaluated on the adversary's stack (the AGR-tailored setting of Shejwalkar,
Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks
and Defenses for Federated Learning", NDSS 2021, Section 4.1). That stack is
the round as the adversary models it: the m crafted updates and the n - m
honest ones of :func:`modelled_honest`, so that a rule's parameters (Krum's f,
the trimming count) act on as many rows as on the server.
:class:`PerClientAttack` is the base of the attacks that act on each
malicious client's own update alone (no collusion), usable on the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from fedsec.aggregation.base import AggregationResult, Rule
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.checks import check_finite_number
from fedsec.registry import Registry

#: Default and largest number of evaluations of the server's rule in one adaptive craft.
MAX_RULE_CALLS = 25

#: Every model-poisoning attack class, by config name (filled by :func:`register`).
MODEL_ATTACKS: Registry[type[ModelPoisoningAttack]] = Registry("model-poisoning attack")

A = TypeVar("A", bound=type[ModelPoisoningAttack])


def register(cls: A) -> A:
    """Class decorator: add ``cls`` to :data:`MODEL_ATTACKS` under ``cls.name``."""
    MODEL_ATTACKS.add(cls.name, cls)
    return cls


# ---- parameter and input checks ---------------------------------------------


def check_number(
    attack: str, param: str, value: object, *, low: float = 0.0, strict: bool = True
) -> float:
    """``value`` as a float if it is a finite number > low (>= low unless ``strict``)."""
    return check_finite_number(f"{attack}: {param}", value, minimum=low, strict=strict)


def check_choice(attack: str, param: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{attack}: {param} must be one of {valid}, got {value!r}")
    return str(value)


def check_rule_calls(attack: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RULE_CALLS:
        raise ValueError(
            f"{attack}: max_rule_calls must be an integer in [1, {MAX_RULE_CALLS}], got {value!r}"
        )
    return value


def check_flag(attack: str, param: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{attack}: {param} must be True or False, got {value!r}")
    return value


def validate_view(attack: ModelPoisoningAttack, view: AdversaryView) -> None:
    """Check the view's shapes, then the attack's requirement on (m, n)."""
    own = view.own
    if own.ndim != 2 or own.shape[0] == 0 or not own.is_floating_point():
        raise ValueError(
            f"{attack.name}: own updates must be a floating [m, d] tensor with m >= 1, "
            f"got shape {tuple(own.shape)} and dtype {own.dtype}"
        )
    benign = view.benign
    if benign is not None and (
        benign.ndim != 2 or benign.shape[0] == 0 or benign.shape[1] != own.shape[1]
    ):
        raise ValueError(
            f"{attack.name}: benign updates must have shape [h, {own.shape[1]}] with h >= 1, "
            f"got {tuple(benign.shape)}"
        )
    attack.check(view.num_malicious, view.num_clients)


def normal_draws(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Standard normal samples drawn on the generator's device, returned like ``like``."""
    noise = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


def uniform_draws(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Uniform [0, 1) samples drawn on the generator's device, returned like ``like``."""
    noise = torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device)
    return noise.to(like.device)


def unbiased_std(reference: torch.Tensor) -> torch.Tensor:
    """Unbiased per-coordinate std (as ``torch.std``); 0 for a single update."""
    return reference.std(dim=0, correction=1 if reference.shape[0] > 1 else 0)


def repeat_rows(update: torch.Tensor, m: int) -> torch.Tensor:
    """[m, d]: ``update`` sent by all m malicious clients (a fresh tensor)."""
    return update.expand(m, -1).clone()


# ---- probing the server's rule ------------------------------------------------


def modelled_honest(view: AdversaryView) -> torch.Tensor:
    """[n - m, d]: the round's honest updates as the adversary models them.

    The omniscient adversary's are the real ones (``view.benign``). Colluders
    see only their own m honest updates: they draw n - m per coordinate from
    N(mean, std^2) of their own updates (unbiased std, from
    ``view.generator``), the normal model of honest updates of Baruch et al.
    (NeurIPS 2019) and Fang et al. (USENIX Security 2020, partial knowledge).
    Rules whose outcome depends on n (Krum's n - f - 2 neighbours, a trimming
    count) then see a stack of the server's size, not the colluders' 2m rows.
    The own updates themselves are not reused: they lie closer to their own
    mean (around which the attacks craft) than fresh honest updates do, which
    made Krum look easier to fool than it is.
    """
    if view.benign is not None:
        return view.benign
    own = view.own
    honest = view.num_clients - view.num_malicious
    drawn = normal_draws((honest, own.shape[1]), own, view.generator)
    return drawn.mul_(unbiased_std(own)).add_(own.mean(dim=0))


def can_probe(rule: Rule, rows: int, context: Mapping[str, Any] | None = None) -> bool:
    """Whether ``rule`` can be evaluated on an adversary's stack of ``rows`` updates.

    False when the rule needs context (``rule.requires``) that ``context``
    lacks (an :class:`~fedsec.attacks.base.AdversaryView`'s ``context``) or
    rejects ``rows`` clients (``rule.check``).
    """
    if rule.requires - (context or {}).keys():
        return False
    try:
        rule.check(rows)
    except ValueError:
        return False
    return True


def probe(
    rule: Rule, stacked: torch.Tensor, context: Mapping[str, Any] | None = None
) -> AggregationResult:
    """Evaluate ``rule`` on ``stacked`` (with ``context``) and restore its state afterwards.

    The server's next call therefore sees the rule exactly as it was (same
    momentum, history and random-stream counters).
    """
    saved = {key: value.clone() for key, value in rule.state_dict().items()}
    try:
        return rule(stacked, **dict(context or {}))
    finally:
        rule.load_state_dict(saved)


# ---- non-colluding attacks ----------------------------------------------------


class PerClientAttack(ModelPoisoningAttack):
    """An attack that transforms each malicious client's own update on its own.

    ``craft`` applies the transform to all rows of ``view.own`` at once;
    :meth:`perturb` applies it to one client's update, for use on the client.
    """

    collusion = False

    def transform(
        self, updates: torch.Tensor, generator: torch.Generator, num_clients: int | None
    ) -> torch.Tensor:
        """Return the malicious versions of ``updates`` [k, d] (a new tensor)."""
        raise NotImplementedError

    def perturb(
        self, update: torch.Tensor, generator: torch.Generator, num_clients: int | None = None
    ) -> torch.Tensor:
        """Malicious version [d] of one client's honest ``update`` [d].

        ``num_clients`` (n of the round) is only needed by :class:`Scaling`
        with its default gamma.
        """
        if update.ndim != 1 or not update.is_floating_point():
            raise ValueError(
                f"{self.name}: update must be a floating [d] tensor, got shape "
                f"{tuple(update.shape)} and dtype {update.dtype}"
            )
        return self.transform(update[None], generator, num_clients)[0]

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        return self.transform(view.own, view.generator, view.num_clients)
