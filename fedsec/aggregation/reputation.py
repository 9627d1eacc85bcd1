"""Reputation: colluders' copies get no vote; clients that keep opposing the rest are dropped."""

from __future__ import annotations

import math
from typing import Any

import torch

from fedsec.aggregation.base import AggregationResult, Rule, dot_products
from fedsec.aggregation.trust import (
    UpdateHistories,
    checked_client_ids,
    cosine_matrix,
    norms_and_dots,
)
from fedsec.params import prefixed, unprefixed


def _in_range(rule: str, name: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float if it is a number in [low, high)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value < high
    ):
        raise ValueError(f"{rule}: {name} must be in [{low}, {high}), got {value!r}")
    return float(value)


def _finite(rule: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{rule}: {name} must be a finite number, got {value!r}")
    return float(value)


class Reputation(Rule):
    """Give colluders' copies no vote; drop clients that keep opposing the rest.

    FoolsGold's sybil test (Fung et al., RAID 2020) and a reputation over
    rounds, as a pre-aggregation step for non-IID data with many attackers,
    where a rule that sees one round at a time cannot tell a poisoned update
    from an honest outlier: under (G, B)-heterogeneity the breakdown point of any
    such rule falls to ``1 / (2 + B^2)`` (Allouah et al., "Robust
    Distributed Learning: Tight Error Bounds and Breakdown Point under Data
    Heterogeneity", NeurIPS 2023). Two signals across clients and rounds
    remain, and this step uses both before the inner rule:

    1. **Copies get no vote** (the principle of FoolsGold: Fung, Yoon,
       Beschastnikh, "The Limitations of Federated Learning in Sybil
       Settings", RAID 2020). The colluding attacks of the literature (ALIE,
       IPM, Min-Max, Min-Sum, Fang's) send one crafted vector from every
       colluder, while honest updates on non-IID data are far apart. With
       ``s_ij`` the larger of the cosine of two updates and of the two
       clients' histories (sums of all their updates, when client ids are
       given), ``K(s) = clip((s - similarity) / (0.99 - similarity), 0, 1)``,
       each client's weight is multiplied by ``1 - max_j K(s_ij)``: copies
       (cosine >= 0.99) get weight 0, two honest clients with very similar
       data lose part of theirs.
    2. **Reputation over rounds**, as RFFL (Xu & Lyu, "Towards Building a
       Robust and Fair Federated Learning System", 2020) and FLDetector
       (Zhang et al., KDD 2022) score clients across rounds. A client's round
       score is the cosine of its update with the anchor, the coordinate-wise
       median of the updates whose weight step 1 left at least half; its
       reputation is the decayed mean of its scores (``decay`` per round it
       takes part). A client with at least ``warmup`` scores and a reputation
       below ``threshold`` is dropped from the inner rule's input, and stays
       dropped until its reputation reaches ``readmit``; at most ``f`` are
       dropped in a round, the lowest first, and never so many that the
       inner rule's requirement on n fails. Dropped clients are still scored
       and the anchor does not depend on who is dropped, so a wrong drop
       cannot feed the scores that caused it. Needs ``client_ids``; without
       them (an adversary probing the rule on one round) only step 1 runs,
       on this round's cosines, and no state changes.

    Parameters
    ----------
    inner : Rule
        The rule applied to the remaining updates with the reduced weights.
        It should use client weights (mean, DnC, geometric median, centered
        clipping, norm bounding, Multi-Krum): coordinate-wise rules and FLAME
        ignore them, and step 1 then does nothing.
    similarity : float
        Cosine where copies start to lose weight (default 0.95; it must be
        below 0.99, where they have none). Chosen on digits at Dirichlet 0.1,
        where honest pairs stayed below the top of the band.
    decay : float
        Weight of a client's earlier scores, in [0, 1) (default 0.9).
    threshold : float
        Reputation below which a client is dropped (default 0: it opposes the
        consensus more than it follows it).
    warmup : int
        Scores a client needs before it can be dropped (default 6: in the
        first rounds, honest non-IID updates disagree with the median as much
        as a sign-flipped one does; measured on the hard benchmark).
    f : int or None
        Most clients dropped in a round (default None: no limit; fedsec sets
        it to ``aggregation.f``).
    readmit : float
        Reputation a dropped client needs to come back (default 0.1).

    Notes
    -----
    * Knowledge it resists: colluders that send copies (Fung et al.) and
      clients that push against the consensus round after round (sign
      flipping, IPM). An adaptive adversary that knows the similarity test
      gives each colluder a direction of its own (the ``decorrelated``
      attack); then only the reputation and the inner rule remain. An
      omniscient adversary could silence an honest client by sending a copy
      of its update (both then get weight 0).
    * Returned weights: the inner rule's weights scattered back, 0 for
      dropped clients.
    * Cost per round: two [n, n] Gram matrices (updates and histories) and
      one coordinate-wise median over [n, d].
    * State: the update histories ([k, d] float32 for the k clients seen),
      the reputations, and the inner rule's state under ``inner.``; every
      checkpoint holds it (``experiment.keep_checkpoints`` bounds how many stay).
    """

    name = "reputation"

    def __init__(
        self,
        inner: Rule,
        similarity: float = 0.95,
        decay: float = 0.9,
        threshold: float = 0.0,
        warmup: int = 6,
        f: int | None = None,
        readmit: float = 0.1,
    ) -> None:
        if not isinstance(inner, Rule):
            raise ValueError(f"reputation: inner must be an aggregation Rule, got {inner!r}")
        self.inner = inner
        self.similarity = _in_range(self.name, "similarity", similarity, -1.0, 0.99)
        self.decay = _in_range(self.name, "decay", decay, 0.0, 1.0)
        self.threshold = _finite(self.name, "threshold", threshold)
        self.readmit = _finite(self.name, "readmit", readmit)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"reputation: warmup must be an integer >= 1, got {warmup!r}")
        self.warmup = warmup
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
            raise ValueError(f"reputation: f must be an integer >= 0 or None, got {f!r}")
        self.f = f
        self._histories = UpdateHistories(self.name)
        self._score = torch.zeros(0, dtype=torch.float64)  # decayed sum of scores
        self._seen = torch.zeros(0, dtype=torch.int64)  # scores so far
        self._dropped = torch.zeros(0, dtype=torch.bool)  # dropped in its last round

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The inner rule's context keywords, passed through."""
        return self.inner.requires

    @property
    def uses(self) -> frozenset[str]:  # type: ignore[override]
        """``client_ids`` (for the histories and reputations), and the inner rule's."""
        return self.inner.uses | {"client_ids"}

    def check(self, n: int) -> None:
        super().check(n)
        self.inner.check(n)

    def reputation(self, rows: torch.Tensor) -> torch.Tensor:
        """Reputations [len(rows)] of the clients at those history rows (0 before any score)."""
        seen = self._seen[rows]
        # The decayed count of seen scores, sum_k decay^k = (1 - decay^seen) / (1 - decay).
        mass = (1 - self.decay ** seen.to(torch.float64)) / (1 - self.decay)
        return torch.where(seen > 0, self._score[rows] / mass.clamp(min=1e-300), 0.0)

    def shares(self, similarity: torch.Tensor) -> torch.Tensor:
        """Each client's weight factor ``1 - max_j K(s_ij)`` [n], from similarities [n, n]."""
        kernel = ((similarity - self.similarity) / (0.99 - self.similarity)).clamp(0, 1)
        kernel.fill_diagonal_(0.0)
        return 1.0 - kernel.max(dim=1).values

    def _grow(self, size: int) -> None:
        extra = size - self._score.shape[0]
        if extra > 0:
            self._score = torch.cat([self._score, torch.zeros(extra, dtype=torch.float64)])
            self._seen = torch.cat([self._seen, torch.zeros(extra, dtype=torch.int64)])
            self._dropped = torch.cat([self._dropped, torch.zeros(extra, dtype=torch.bool)])

    @staticmethod
    def _weighed(weights: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """``weights * share``; the weights alone if that leaves nothing (all copies)."""
        weighed = weights.to(torch.float64) * share.to(torch.float64)
        return (weighed if bool((weighed > 0).any()) else weights).to(weights.dtype)

    def suspects(self, rows: torch.Tensor) -> torch.Tensor:
        """Which clients (at history ``rows``) to drop: bool [n], at most f, lowest first."""
        reputation = self.reputation(rows)
        bar = torch.where(self._dropped[rows], self.readmit, self.threshold)
        suspect = (self._seen[rows] >= self.warmup) & (reputation < bar)
        limit = int(suspect.sum()) if self.f is None else min(int(suspect.sum()), self.f)
        order = torch.argsort(torch.where(suspect, reputation, math.inf))
        drop = torch.zeros(rows.shape[0], dtype=torch.bool)
        for i in order[:limit]:
            drop[i] = True
            try:  # never drop below what the inner rule needs
                self.inner.check(int((~drop).sum()))
            except ValueError:
                drop[i] = False
                break
        self._dropped[rows] = drop
        return drop

    def scores(self, updates: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """Each update's cosine with the anchor, float64 [n] on the CPU.

        The anchor is the coordinate-wise median of the updates whose weight
        factor (:meth:`shares`) is at least 1/2, or of all updates if none is:
        colluders sending copies cannot move it, and clients dropped by
        reputation are not left out of it, so a wrong drop cannot feed back
        into the scores that caused it.
        """
        alone = (share >= 0.5).to(updates.device)
        anchor = (updates[alone] if bool(alone.any()) else updates).median(dim=0).values
        # In float64 where float32 overflows: an attacker's 1e38s must not make its
        # score NaN, which would stick in its reputation and make it undroppable.
        norms, dots, anchor_norm = norms_and_dots(updates, anchor)
        denominator = norms * anchor_norm
        return torch.where(denominator > 0, dots / denominator.clamp(min=1e-300), 0.0).cpu()

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        n = updates.shape[0]
        ids = context.pop("client_ids", None)
        similarity = cosine_matrix(dot_products(updates))
        if ids is None:  # one round alone (an adversary's probe): step 1 only
            share = self.shares(similarity).to(weights.device)
            return self.inner(updates, self._weighed(weights, share), **context)
        rows = self._histories.record(checked_client_ids(ids, n, self.name), updates)
        self._grow(len(self._histories))
        share = self.shares(torch.maximum(similarity, self._histories.cosines(rows)))
        rows = rows.cpu()
        keep = ~self.suspects(rows)
        kept = torch.nonzero(keep).flatten().to(updates.device)
        result = self.inner(
            updates.index_select(0, kept),
            self._weighed(weights[kept], share.to(weights.device)[kept]),
            **context,
        )
        scores = self.scores(updates, share)
        self._score[rows] = self.decay * self._score[rows] + scores
        self._seen[rows] += 1
        out = torch.zeros(n, dtype=updates.dtype, device=updates.device)
        out[kept] = result.weights.to(updates.dtype)
        return AggregationResult(aggregate=result.aggregate, weights=out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = prefixed(self._histories.state_dict(), "histories.")
        state.update(score=self._score, seen=self._seen, dropped=self._dropped)
        state.update(prefixed(self.inner.state_dict(), "inner."))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._histories.load_state_dict(unprefixed(state, "histories."))
        self._score = state["score"].to(torch.float64, copy=True)
        self._seen = state["seen"].to(torch.int64, copy=True)
        self._dropped = state["dropped"].to(torch.bool, copy=True)
        sizes = {
            len(self._histories),
            *(t.shape[0] for t in (self._score, self._seen, self._dropped)),
        }
        if len(sizes) != 1:
            raise ValueError(f"reputation: state sizes disagree ({sorted(sizes)} clients)")
        self.inner.load_state_dict(unprefixed(state, "inner."))
