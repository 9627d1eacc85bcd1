"""Membership inference against a trained (global) model.

A membership-inference attack decides, from a model's behaviour on a candidate
example, whether that example was in the training set. Its success is the
standard empirical measure of what a released model leaks about individual
records, and the quantity differential privacy bounds: an (epsilon, delta)-DP
training algorithm caps every attack's true-positive rate at
``e^epsilon * FPR + delta`` (the hypothesis-testing view of DP: Kairouz, Oh and
Viswanath, "The Composition Theorem for Differential Privacy", ICML 2015; for
pure DP, Yeom et al. [1]_, Theorem 1, bound the advantage ``TPR - FPR`` by
``e^epsilon - 1``), so the attack's ROC curve is pushed towards the diagonal
(AUC 0.5).

Two score functions are provided; both need only query access to the model's
per-example loss, and neither trains shadow models:

:func:`loss_attack`
    The loss-threshold attack of Yeom, Giacomelli, Fredrikson and Jha [1]_:
    training examples tend to have lower loss, so the score is ``-loss``.
:func:`calibrated_attack`
    Difficulty calibration (Watson, Guo, Cormode and Sablayrolles [2]_): some
    examples have low loss under *any* model of the task, members or not, and
    some high loss; subtracting the loss under a reference model that was not
    trained on the candidates removes that per-example offset. The score is
    ``loss_reference(x) - loss_target(x)``.

Attacks are summarised by the area under the ROC curve and, following Carlini
et al. [3]_, by the true-positive rate at a 1 % false-positive rate, which
measures whether *some* members are identified confidently rather than whether
the attack is better than chance on average. :func:`balanced_split` draws
equally many members and non-members so that both numbers are computed on a
balanced evaluation set.

The module is pure PyTorch and scikit-learn; it knows nothing of Flower, and
"members" are simply the tensors the caller says were trained on (in a
federated run, the union of all clients' training examples).

References
----------
.. [1] S. Yeom, I. Giacomelli, M. Fredrikson and S. Jha, "Privacy Risk in
   Machine Learning: Analyzing the Connection to Overfitting", IEEE CSF 2018.
.. [2] L. Watson, C. Guo, G. Cormode and A. Sablayrolles, "On the Importance of
   Difficulty Calibration in Membership Inference Attacks", ICLR 2022.
.. [3] N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis and F. Tramèr,
   "Membership Inference Attacks From First Principles", IEEE S&P 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from fedsec.training import resolve_device

__all__ = [
    "LOW_FPR",
    "Examples",
    "MembershipResult",
    "balanced_split",
    "calibrated_attack",
    "loss_attack",
    "per_example_loss",
    "score_attack",
]

#: ``(x, y)``: inputs ``[N, ...]`` and integer labels ``[N]``.
Examples = tuple[torch.Tensor, torch.Tensor]

#: The false-positive rate at which :attr:`MembershipResult.tpr_at_1pct_fpr` is read.
LOW_FPR = 0.01


@dataclass(frozen=True)
class MembershipResult:
    """How well a membership score separates members from non-members.

    Attributes
    ----------
    auc : float
        Area under the ROC curve of the score (members are the positive
        class); 0.5 is chance, 1.0 a perfect separation. Ties count one half.
    tpr_at_1pct_fpr : float
        The largest true-positive rate among the ROC curve's operating points
        whose false-positive rate is at most 1 % (no interpolation, so the
        figure is achievable by an actual threshold; with fewer than 100
        non-members this means "with no false positive at all").
    num_members : int
        Members scored.
    num_non_members : int
        Non-members scored.
    """

    auc: float
    tpr_at_1pct_fpr: float
    num_members: int
    num_non_members: int


# ---- scoring ------------------------------------------------------------------


def _check_examples(examples: Examples, what: str) -> int:
    if not isinstance(examples, tuple) or len(examples) != 2:
        raise ValueError(f"{what} must be an (x, y) pair of tensors")
    x, y = examples
    n = int(x.shape[0]) if x.dim() > 0 else 0
    if n == 0:
        raise ValueError(f"{what} is empty")
    if y.dim() != 1 or int(y.shape[0]) != n:
        raise ValueError(f"{what}: labels must have shape [{n}], got {list(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integer, got {y.dtype}")
    return n


def per_example_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> torch.Tensor:
    """Cross-entropy of ``model`` on each example, without gradients.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits ``[B, num_classes]``. It is moved to
        ``device`` and evaluated in eval mode; its previous training/eval mode
        is restored afterwards.
    x : torch.Tensor
        Inputs ``[N, ...]``; cast to the model's parameter dtype.
    y : torch.Tensor
        Integer labels ``[N]``.
    device : torch.device or str
        Where to evaluate; strings go through :func:`fedsec.training.resolve_device`.
    batch_size : int
        Examples per forward pass (memory only; the result does not depend on it).

    Returns
    -------
    torch.Tensor
        ``float64`` losses ``[N]`` on the CPU, in the order of ``x``. The
        logits are cast to float64 before the cross-entropy, so that losses of
        confidently classified examples (``< 1e-7``) stay distinct instead of
        rounding to zero.

    Raises
    ------
    ValueError
        On an empty input, mismatched or non-integer labels, or ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _check_examples((x, y), "per_example_loss input")
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    out = torch.empty(n, dtype=torch.float64)
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb = x[start : start + batch_size].to(dev, dtype=dtype)
                yb = y[start : start + batch_size].to(dev, dtype=torch.long)
                # float64: in float32 every loss below ~1e-7 rounds to exactly 0,
                # and a well-fit model puts most members (and many non-members)
                # there, which would turn the ranking into ties.
                logits = model(xb).double()
                loss = F.cross_entropy(logits, yb, reduction="none")
                out[start : start + batch_size] = loss.cpu()
    finally:
        model.train(was_training)
    return out


def score_attack(member_scores: torch.Tensor, non_member_scores: torch.Tensor) -> MembershipResult:
    """Summarise a membership score; higher scores must mean "more likely a member".

    Parameters
    ----------
    member_scores : torch.Tensor
        Scores of the members, ``[M]``.
    non_member_scores : torch.Tensor
        Scores of the non-members, ``[K]``.

    Returns
    -------
    MembershipResult
        ROC AUC (:func:`sklearn.metrics.roc_auc_score`) and the TPR at
        :data:`LOW_FPR`, read off :func:`sklearn.metrics.roc_curve` (all
        thresholds kept) as the largest TPR whose FPR is at most 1 %.

    Raises
    ------
    ValueError
        If either side is empty or not one-dimensional, or a score is not finite.
    """
    sides = (("member_scores", member_scores), ("non_member_scores", non_member_scores))
    for name, values in sides:
        if values.dim() != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {list(values.shape)}")
        if values.numel() == 0:
            raise ValueError(f"{name} is empty")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} contains non-finite values")
    pos = member_scores.detach().double().cpu().numpy()
    neg = non_member_scores.detach().double().cpu().numpy()
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # roc_curve starts at (0, 0), so at least one point qualifies.
    low = tpr[fpr <= LOW_FPR + 1e-12]
    return MembershipResult(
        auc=float(roc_auc_score(labels, scores)),
        tpr_at_1pct_fpr=float(low.max()),
        num_members=len(pos),
        num_non_members=len(neg),
    )


# ---- attacks ------------------------------------------------------------------


def loss_attack(
    model: nn.Module,
    members: Examples,
    non_members: Examples,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> MembershipResult:
    """Loss-threshold membership inference (Yeom et al., CSF 2018).

    The attacker predicts "member" when the example's cross-entropy under
    ``model`` is below a threshold; sweeping the threshold gives the ROC curve
    of the score ``-loss(model, x, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        The target model (e.g. the final global model of a federated run).
    members : tuple of torch.Tensor
        ``(x, y)`` of examples the model was trained on.
    non_members : tuple of torch.Tensor
        ``(x, y)`` of examples from the same distribution it was not trained on.
    device : torch.device or str
        Where to evaluate the model.
    batch_size : int
        Examples per forward pass.

    Returns
    -------
    MembershipResult

    Raises
    ------
    ValueError
        On empty or malformed example sets, or a non-finite loss.
    """
    _check_examples(members, "members")
    _check_examples(non_members, "non_members")
    member_loss = per_example_loss(model, *members, device=device, batch_size=batch_size)
    non_member_loss = per_example_loss(model, *non_members, device=device, batch_size=batch_size)
    return score_attack(-member_loss, -non_member_loss)


def calibrated_attack(
    model: nn.Module,
    reference_model: nn.Module,
    members: Examples,
    non_members: Examples,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> MembershipResult:
    """Difficulty-calibrated loss attack (Watson et al., ICLR 2022), without shadow models.

    The score of an example is

    .. math:: s(x, y) = \\ell_{\\mathrm{ref}}(x, y) - \\ell_{\\mathrm{target}}(x, y),

    with :math:`\\ell` the per-example cross-entropy: how much *lower* the
    target model's loss is than the loss of a reference model that was not
    trained on any candidate. Watson et al. calibrate with the average of
    reference models trained on shadow data from the same distribution; here a
    single model the caller supplies plays that role, e.g. the initial global
    model of round 0 (no training at all) or a model trained on disjoint data.
    An untrained reference only removes the per-example offsets of the
    initialisation, so with it the calibrated attack need not beat
    :func:`loss_attack`; a reference trained on disjoint data of the task
    calibrates for the genuine difficulty of each example.

    Parameters
    ----------
    model : torch.nn.Module
        The target model.
    reference_model : torch.nn.Module
        A model of the same task not trained on ``members`` nor ``non_members``.
    members, non_members : tuple of torch.Tensor
        ``(x, y)`` of training and held-out examples, as for :func:`loss_attack`.
    device : torch.device or str
        Where to evaluate both models.
    batch_size : int
        Examples per forward pass.

    Returns
    -------
    MembershipResult

    Raises
    ------
    ValueError
        On empty or malformed example sets, a non-finite loss, or when
        ``reference_model`` is ``model`` itself (every score would be 0).
    """
    if reference_model is model:
        raise ValueError("reference_model must be a different model from the target model")
    _check_examples(members, "members")
    _check_examples(non_members, "non_members")

    def score(examples: Examples) -> torch.Tensor:
        target = per_example_loss(model, *examples, device=device, batch_size=batch_size)
        ref = per_example_loss(reference_model, *examples, device=device, batch_size=batch_size)
        return ref - target

    return score_attack(score(members), score(non_members))


# ---- evaluation sets ------------------------------------------------------------


def balanced_split(
    members_x: torch.Tensor,
    members_y: torch.Tensor,
    non_x: torch.Tensor,
    non_y: torch.Tensor,
    *,
    max_per_side: int | None = None,
    generator: torch.Generator,
    stratify: bool = False,
) -> tuple[Examples, Examples]:
    """Draw equally many members and non-members, uniformly without replacement.

    An attack's AUC does not depend on the class balance, but its TPR at a low
    FPR is only as fine as ``1 / num_non_members``, and reported accuracies
    assume a 50 % prior; evaluating on balanced sets, as in Yeom et al. and
    Carlini et al., keeps all of them comparable across runs.

    Parameters
    ----------
    members_x, members_y : torch.Tensor
        Candidate members: inputs ``[M, ...]`` and integer labels ``[M]``.
    non_x, non_y : torch.Tensor
        Candidate non-members: inputs ``[K, ...]`` and integer labels ``[K]``.
    max_per_side : int, optional
        Upper bound on the examples drawn per side. The size used is
        ``min(M, K, max_per_side)`` (without ``stratify``), or at most
        ``max_per_side`` of the ``sum_c min(M_c, K_c)`` label-matched pairs
        (with it).
    generator : torch.Generator
        Source of the random subsets (a CPU generator), so the split is
        reproducible.
    stratify : bool, default False
        Draw the same number of members and non-members *of every label*. A
        model trained on a small member set learns that set's label
        frequencies, which differ from the non-members' by sampling alone;
        the loss then separates the two sets through the label prior, a
        property of the whole set that differential privacy does not hide.
        Matching the labels removes that confound, so what remains is
        per-example leakage. Labels are drawn in proportion to the matched
        pairs (every pair equally likely when ``max_per_side`` truncates).

    Returns
    -------
    members : tuple of torch.Tensor
        ``(x, y)`` of the drawn members, in random order.
    non_members : tuple of torch.Tensor
        ``(x, y)`` of as many drawn non-members, in random order (with
        ``stratify``, the i-th member and i-th non-member share a label).

    Raises
    ------
    ValueError
        On empty or malformed inputs, ``max_per_side < 1``, or, with
        ``stratify``, when no label occurs on both sides.
    """
    if max_per_side is not None and max_per_side < 1:
        raise ValueError(f"max_per_side must be >= 1, got {max_per_side}")
    m = _check_examples((members_x, members_y), "members")
    k = _check_examples((non_x, non_y), "non_members")
    if not stratify:
        size = min(m, k) if max_per_side is None else min(m, k, max_per_side)
        pick_m = torch.randperm(m, generator=generator)[:size]
        pick_k = torch.randperm(k, generator=generator)[:size]
    else:
        pick_m, pick_k = _stratified_pairs(
            members_y.cpu(), non_y.cpu(), max_per_side=max_per_side, generator=generator
        )
    return (
        (members_x[pick_m.to(members_x.device)], members_y[pick_m.to(members_y.device)]),
        (non_x[pick_k.to(non_x.device)], non_y[pick_k.to(non_y.device)]),
    )


def _stratified_pairs(
    members_y: torch.Tensor,
    non_y: torch.Tensor,
    *,
    max_per_side: int | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of label-matched members and non-members, in a shared random order."""
    pairs_m: list[torch.Tensor] = []
    pairs_k: list[torch.Tensor] = []
    for label in torch.unique(torch.cat([members_y, non_y])).tolist():
        idx_m = torch.nonzero(members_y == label).flatten()
        idx_k = torch.nonzero(non_y == label).flatten()
        count = min(len(idx_m), len(idx_k))
        if count == 0:
            continue
        pairs_m.append(idx_m[torch.randperm(len(idx_m), generator=generator)[:count]])
        pairs_k.append(idx_k[torch.randperm(len(idx_k), generator=generator)[:count]])
    if not pairs_m:
        raise ValueError("stratify: no label occurs among both members and non-members")
    all_m, all_k = torch.cat(pairs_m), torch.cat(pairs_k)
    order = torch.randperm(len(all_m), generator=generator)
    if max_per_side is not None:
        order = order[:max_per_side]
    return all_m[order], all_k[order]
