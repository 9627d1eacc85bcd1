"""Rules that weigh clients by trust: FLTrust (server reference) and FoolsGold (history).

Both rules decide per client how much its update counts, from information
beyond the current round's update matrix: FLTrust compares each update with
the server's own update computed on a small clean root data set; FoolsGold
compares the clients' accumulated update histories to find sybils, which keep
pushing in the same direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedsec.aggregation.base import AggregationResult, Rule, column_blocks, weighted_sum


def cosine_matrix(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix; 0 wherever a vector has norm 0."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    positive = denominator > 0
    return torch.where(positive, gram / torch.where(positive, denominator, 1.0), 0.0)


def norms_and_dots(
    updates: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row norms [n], dot products with ``reference`` [n] and its norm, in float64.

    Computed in the input dtype first (no [n, d] temporaries; torch and BLAS
    accumulate blockwise, relative error ~1e-6 in float32, ample for cosines
    and norm ratios). If that overflows (float32 entries beyond ~1e19, e.g. an
    attacker's), they are recomputed in float64 over column blocks.
    """
    norms = torch.linalg.vector_norm(updates, dim=1).to(torch.float64)
    dots = (updates @ reference).to(torch.float64)
    ref_norm = torch.linalg.vector_norm(reference.to(torch.float64))
    finite = bool(torch.isfinite(norms).all() and torch.isfinite(dots).all())
    if finite or updates.dtype == torch.float64:
        return norms, dots, ref_norm
    n, d = updates.shape
    sq_norms = torch.zeros(n, dtype=torch.float64, device=updates.device)
    dots = torch.zeros(n, dtype=torch.float64, device=updates.device)
    for cols in column_blocks(n, d):
        block = updates[:, cols].to(torch.float64)
        sq_norms += torch.linalg.vector_norm(block, dim=1).square()
        dots += block @ reference[cols].to(torch.float64)
    return sq_norms.sqrt(), dots, ref_norm


class FLTrust(Rule):
    """FLTrust: trust-weighted mean of updates rescaled to the server's update norm.

    Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via
    Trust Bootstrapping", NDSS 2021. The server trains the global model on its
    own small root data set and passes the resulting update ``reference`` (g0).
    Each client gets the trust score ``TS_i = ReLU(cos(x_i, g0))``; its update
    is rescaled to the norm of g0, and the aggregate is::

        sum_i TS_i * (||g0|| / ||x_i||) * x_i / sum_i TS_i

    Requires n >= 1 (no bound on f: the guarantee rests on the root data set
    being clean and representative).

    Notes
    -----
    * The clients' example weights are not used: the paper weighs clients only
      by trust, so a client cannot gain influence by claiming many examples.
    * ``AggregationResult.weights`` are the normalised trust scores
      ``TS_i / sum_j TS_j`` (each client's share of the trust). The actual
      coefficient of ``x_i`` in the aggregate is ``TS_i * ||g0|| / ||x_i||``
      divided by the same sum: the rescaling is not a convex combination of the
      raw updates.
    * A zero update, or a zero reference, has cosine 0 and hence trust 0.
    * If no client is trusted (every cosine <= 0), the aggregate is the zero
      vector, i.e. the round keeps the global model, and the returned weights
      are all 0: this is the one case where they do not sum to 1.
    """

    name = "fltrust"
    requires = frozenset({"reference"})

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        n, d = updates.shape
        reference = context["reference"]
        if not isinstance(reference, torch.Tensor) or reference.shape != (d,):
            shape = tuple(reference.shape) if isinstance(reference, torch.Tensor) else reference
            raise ValueError(f"fltrust: reference must be a tensor of shape [{d}], got {shape}")
        reference = reference.to(device=updates.device, dtype=updates.dtype)
        norms, dots, ref_norm = norms_and_dots(updates, reference)
        denominator = norms * ref_norm
        positive = denominator > 0
        cosine = torch.where(positive, dots / torch.where(positive, denominator, 1.0), 0.0)
        trust = cosine.clamp(min=0)
        total = trust.sum()
        if total <= 0:
            zeros = torch.zeros(n, dtype=updates.dtype, device=updates.device)
            return AggregationResult(
                aggregate=torch.zeros(d, dtype=updates.dtype, device=updates.device),
                weights=zeros,
            )
        scale = torch.where(norms > 0, ref_norm / torch.where(norms > 0, norms, 1.0), 0.0)
        coefficients = trust * scale / total
        return AggregationResult(
            aggregate=weighted_sum(coefficients, updates),
            weights=(trust / total).to(updates.dtype),
        )


def checked_client_ids(client_ids: Any, n: int, rule: str) -> list[int]:
    """Validate ``client_ids``: n distinct integers."""
    if isinstance(client_ids, torch.Tensor):
        ids = [int(c) for c in client_ids.reshape(-1).tolist()]
    elif isinstance(client_ids, Sequence) and not isinstance(client_ids, str):
        ids = [int(c) for c in client_ids]
    else:
        raise ValueError(f"{rule}: client_ids must be a sequence of {n} integers")
    if len(ids) != n:
        raise ValueError(f"{rule}: client_ids has {len(ids)} entries for n={n} updates")
    if len(set(ids)) != n:
        raise ValueError(f"{rule}: client_ids must be distinct, got {ids}")
    return ids


class UpdateHistories:
    """Per-client sums of all updates sent so far, for rules that look across rounds.

    Row ``i`` of the [k, d] float32 history belongs to the i-th client id ever
    recorded; it lives on the device of the updates. Used by FoolsGold and the
    reputation step.
    """

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self._rows: dict[int, int] = {}  # client id -> row of _history
        self._history = torch.zeros(0, 0, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, ids: list[int], updates: torch.Tensor) -> torch.Tensor:
        """Add this round's updates to the histories; return the participants' rows [n]."""
        d = updates.shape[1]
        if self._rows and self._history.shape[1] != d:
            raise ValueError(
                f"{self.rule}: the histories have {self._history.shape[1]} coordinates, "
                f"the updates have {d}"
            )
        history = self._history.to(updates.device)
        new = [cid for cid in ids if cid not in self._rows]
        if new:
            # Grow by the new clients (transiently two copies of the history).
            grown = torch.zeros(len(self._rows) + len(new), d, device=updates.device)
            if self._rows:
                grown[: len(self._rows)] = history
            history = grown
            for cid in new:
                self._rows[cid] = len(self._rows)
        self._history = history
        index = torch.tensor([self._rows[cid] for cid in ids], device=updates.device)
        if updates.dtype == torch.float32:
            history.index_add_(0, index, updates)
        else:
            for i, row in enumerate(index.tolist()):
                history[row].add_(updates[i])
        return index

    def gram(self, index: torch.Tensor) -> torch.Tensor:
        """Gram matrix [n, n] in float64 of the histories at rows ``index``."""
        history = self._history
        n, d = index.shape[0], history.shape[1]
        everyone = n == history.shape[0] and index.tolist() == list(range(n))
        gram = torch.zeros(n, n, dtype=torch.float64, device=history.device)
        for cols in column_blocks(n, d):
            # float32 products per block (histories are float32), summed in float64;
            # a strided view when every known client takes part, else a gathered copy.
            block = history[:, cols] if everyone else history[index, cols]
            product = (block @ block.T).to(torch.float64)
            if not torch.isfinite(product).all():  # float32 overflow: redo in float64
                block = block.to(torch.float64)
                product = block @ block.T
            gram += product
            del block, product  # free before the next block is gathered
        return gram

    def cosines(self, index: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [n, n] of the histories at rows ``index`` (0 for a zero history)."""
        return cosine_matrix(self.gram(index))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``ids`` [k] int64 and ``history`` [k, d] float32, row i the history of ``ids[i]``.

        ``history`` is the object's own tensor, not a copy.
        """
        ids = sorted(self._rows, key=self._rows.__getitem__)
        return {"ids": torch.tensor(ids, dtype=torch.int64), "history": self._history}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ids, history = state["ids"], state["history"]
        if ids.ndim != 1 or history.ndim != 2 or history.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{self.rule}: state needs ids [k] and history [k, d], got "
                f"{tuple(ids.shape)} and {tuple(history.shape)}"
            )
        rows = {int(cid): row for row, cid in enumerate(ids.tolist())}
        if len(rows) != ids.shape[0]:
            raise ValueError(f"{self.rule}: state ids must be distinct")
        self._rows = rows
        self._history = history.to(torch.float32, copy=True)


class FoolsGold(Rule):
    """FoolsGold: down-weight clients whose update histories are too similar.

    Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil
    Settings", RAID 2020 (Algorithm 1). The rule keeps, per client id, the sum
    H_i of all updates the client has sent. Each round, with the participating
    clients' histories (this round's update included):

    1. ``cs_ij = cos(H_i, H_j)`` for i != j, and ``cs_ii = 0``;
       ``v_i = max_j cs_ij``.
    2. Pardoning: ``cs_ij *= v_i / v_j`` where ``v_j > v_i``.
    3. ``alpha_i = 1 - max_j cs_ij``, clipped to [0, 1]; ``alpha /= max(alpha)``;
       ``alpha_i = 0.99`` where it is 1.
    4. ``alpha_i = kappa * (ln(alpha_i / (1 - alpha_i)) + 0.5)``, clipped to
       [0, 1] (``ln 0 = -inf`` gives 0).

    The aggregate is ``sum_i alpha_i x_i / sum_i alpha_i``.

    Requires n >= 1; similarity needs pairs, so a round with a single client
    returns that client's update (its history is still recorded). There is no
    bound on the number of sybils: the defence targets groups of colluding
    clients that send similar updates.

    Parameters
    ----------
    kappa : float
        Confidence parameter of the logit (paper default 1).

    Notes
    -----
    * The diagonal of ``cs`` counts as 0 in the maxima (so ``v_i >= 0``), as in
      the authors' reference code; the paper leaves it implicit.
    * The paper's update is ``w + sum_i alpha_i x_i`` (a learning rate per
      client). Here the alphas are normalised to sum to 1, so the aggregate is
      on the scale of a mean and composes with the strategy's server learning
      rate; ``AggregationResult.weights`` are these normalised alphas. If every
      alpha is 0 (e.g. all histories identical), the aggregate is zero and the
      weights are all 0 (they then do not sum to 1).
    * Client example weights are not used, as in the paper.
    * The optional feature-importance weighting of the paper (for softmax
      classifiers' output layer) is not implemented.
    * Memory: the histories are an extra float32 [k, d] for the k clients ever
      seen; this is inherent to the algorithm. Histories live on the device of
      the updates.
    """

    name = "foolsgold"
    requires = frozenset({"client_ids"})

    def __init__(self, kappa: float = 1.0) -> None:
        if isinstance(kappa, bool) or not isinstance(kappa, int | float):
            raise ValueError(f"foolsgold: kappa must be a positive number, got {kappa!r}")
        if not math.isfinite(kappa) or kappa <= 0:
            raise ValueError(f"foolsgold: kappa must be positive and finite, got {kappa!r}")
        self.kappa = float(kappa)
        self._histories = UpdateHistories(self.name)

    def learning_rates(self, gram: torch.Tensor) -> torch.Tensor:
        """The alphas of Algorithm 1 from the Gram matrix [n, n] of the histories."""
        cs = cosine_matrix(gram).fill_diagonal_(0.0)
        v = cs.max(dim=1).values
        pardon = v[None, :] > v[:, None]
        cs = torch.where(pardon, cs * v[:, None] / torch.where(pardon, v[None, :], 1.0), cs)
        alpha = (1 - cs.max(dim=1).values).clamp(0, 1)
        top = alpha.max()
        if top <= 0:
            return torch.zeros_like(alpha)
        alpha = alpha / top
        alpha = torch.where(alpha == 1, 0.99, alpha)
        alpha = self.kappa * (torch.log(alpha / (1 - alpha)) + 0.5)
        return alpha.clamp(0, 1)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        n, d = updates.shape
        ids = checked_client_ids(context["client_ids"], n, self.name)
        index = self._histories.record(ids, updates)
        if n == 1:
            return AggregationResult(aggregate=updates[0].clone(), weights=torch.ones_like(weights))
        gram = self._histories.gram(index)
        alpha = self.learning_rates(gram)
        total = alpha.sum()
        if total <= 0:
            return AggregationResult(
                aggregate=torch.zeros(d, dtype=updates.dtype, device=updates.device),
                weights=torch.zeros_like(weights),
            )
        share = alpha / total
        return AggregationResult(
            aggregate=weighted_sum(share, updates), weights=share.to(updates.dtype)
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``ids`` [k] int64 and ``history`` [k, d] float32 (see :class:`UpdateHistories`)."""
        return self._histories.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._histories.load_state_dict(state)
