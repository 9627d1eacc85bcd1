"""Mimic: all malicious clients copy one honest client's update.

Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
via Bucketing", ICLR 2022.
"""

from __future__ import annotations

import torch

from fedsec.aggregation.base import pairwise_sq_distances
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import check_flag, register, repeat_rows, validate_view


@register
class Mimic(ModelPoisoningAttack):
    """Mimic: all malicious clients copy one honest client's update.

    Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing", ICLR 2022. On heterogeneous data, over-weighting
    one honest client biases the aggregate while every malicious update looks
    honest. The paper picks the client that maximises the variance along the
    top principal direction of the honest updates, estimated over warm-up
    rounds. Here, the simple version: at the first call,

        i* = argmax_i |<x_i - mu, v>|,

    v the top principal direction of the centred honest updates, found from
    the [h, h] centred Gram matrix -1/2 J D J (D the squared distances): its
    top eigenvector u gives projections proportional to u_i. i* is kept for
    later rounds (chosen again only if it exceeds the number of honest
    updates), and is part of :meth:`state_dict`. It indexes the rows of
    ``view.benign``, so the caller should keep their order stable.

    Needs omniscient knowledge (the honest updates).

    Parameters
    ----------
    omniscient : bool
        Whether the adversary sees the honest updates; must be True.
    """

    name = "mimic"

    def __init__(self, omniscient: bool = False) -> None:
        self.omniscient = check_flag(self.name, "omniscient", omniscient)
        self._target: int | None = None

    @property
    def target(self) -> int | None:
        """Row of ``view.benign`` being copied (None before the first call)."""
        return self._target

    def check(self, num_malicious: int, num_clients: int) -> None:
        super().check(num_malicious, num_clients)
        if not self.omniscient:
            raise ValueError('mimic needs omniscient knowledge (attack.knowledge = "omniscient")')

    @staticmethod
    def choose(benign: torch.Tensor) -> int:
        """i* = argmax_i |<x_i - mu, v>| with v the top principal direction."""
        h = benign.shape[0]
        if h == 1:
            return 0
        distances = pairwise_sq_distances(benign)
        centring = torch.eye(h, dtype=torch.float64, device=benign.device) - 1.0 / h
        gram = -0.5 * centring @ distances @ centring
        _, vectors = torch.linalg.eigh((gram + gram.T) / 2)
        return int(torch.argmax(vectors[:, -1].abs()))

    def craft(self, view: AdversaryView) -> torch.Tensor:
        validate_view(self, view)
        benign = view.benign
        if benign is None:
            raise ValueError("mimic needs the honest updates (an omniscient view), got none")
        if self._target is None or self._target >= benign.shape[0]:
            self._target = self.choose(benign)
        return repeat_rows(benign[self._target], view.num_malicious)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The mimicked row (-1 before the first call), for checkpoints."""
        return {"target": torch.tensor(-1 if self._target is None else self._target)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        target = int(state["target"])
        self._target = None if target < 0 else target
