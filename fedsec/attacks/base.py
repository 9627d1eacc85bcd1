"""Shared types of the attack library.

Model-poisoning attacks are small configured objects that turn what the
adversary knows in a round (an :class:`AdversaryView`) into the updates the
malicious clients send. Colluding attacks (``collusion = True``) need the
pooled updates of all malicious clients and run in the simulation's adversary
component; the others act on each malicious client's own update alone and can
also run on the client in a deployment.

Data-poisoning attacks change a malicious client's training data and run
inside the ClientApp, so they work unchanged in a real deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedsec.aggregation import Rule


@dataclass(frozen=True)
class AdversaryView:
    """What the colluding adversary knows in one round.

    Attributes
    ----------
    own : torch.Tensor
        [m, d] the malicious clients' honest updates (each trained on the
        client's own data, as an honest client would).
    benign : torch.Tensor or None
        [h, d] the honest clients' updates, given only to an omniscient
        adversary; None otherwise.
    num_clients : int
        n, the number of updates the server aggregates this round (m + h).
    rule : Rule or None
        The server's aggregation rule, given only to an adaptive adversary.
    generator : torch.Generator
        Source of randomness (seeded by the experiment seed and round).
    context : mapping or None
        The context the rule needs besides the updates (``rule.requires``),
        where the adaptive adversary can know it: FLTrust's ``reference``, the
        server's update on its root data set, which the FLTrust paper's
        adaptive attacker knows (Cao et al., NDSS 2021, Section VI). None
        otherwise; a rule whose context is missing is not probed.
    """

    own: torch.Tensor
    benign: torch.Tensor | None
    num_clients: int
    rule: Rule | None
    generator: torch.Generator
    context: Mapping[str, Any] | None = None

    @property
    def num_malicious(self) -> int:
        """m."""
        return int(self.own.shape[0])

    @property
    def reference(self) -> torch.Tensor:
        """The updates the adversary estimates honest behaviour from.

        All honest updates when omniscient, else the colluders' own honest
        updates (the default, weaker knowledge in Baruch et al. and Fang et al.).
        """
        return self.benign if self.benign is not None else self.own


class ModelPoisoningAttack:
    """Base class: crafts the malicious clients' updates for one round."""

    name: ClassVar[str] = "attack"
    #: Needs the malicious clients' pooled updates (runs in the adversary component).
    collusion: ClassVar[bool] = True
    #: Fewest malicious clients the attack is defined for.
    min_malicious: ClassVar[int] = 1
    #: Rule context the attack cannot do without (``AdversaryView.context`` keys, e.g.
    #: FLTrust's ``reference``): it needs an adaptive adversary against a rule using it.
    requires_context: ClassVar[frozenset[str]] = frozenset()
    #: The colluders send nothing: the adversary component drops their replies, so the
    #: server aggregates the honest clients only (a reference, not an attack: ``abstain``).
    withholds: ClassVar[bool] = False

    def check(self, num_malicious: int, num_clients: int) -> None:
        """Raise ``ValueError`` (one line, with the numbers) if the attack cannot run."""
        if num_malicious < self.min_malicious:
            raise ValueError(
                f"{self.name} needs at least {self.min_malicious} malicious clients, "
                f"got {num_malicious}"
            )
        if num_malicious >= num_clients:
            raise ValueError(
                f"{self.name} needs honest clients too, got {num_malicious} malicious of "
                f"{num_clients}"
            )

    def craft(self, view: AdversaryView) -> torch.Tensor:
        """Return the [m, d] updates the malicious clients send."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
