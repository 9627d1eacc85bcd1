"""The updates an honest-but-curious server sees, under each protection.

For the gradient-inversion audit (:mod:`fedsec.audit.inversion`):

* no protection -- :func:`client_update`, one plain SGD step, whose update is
  ``-lr * grad`` (Zhu, Liu and Han, "Deep Leakage from Gradients", NeurIPS
  2019);
* DP-SGD -- :func:`dp_sgd_update`, one step of Abadi et al. ("Deep Learning
  with Differential Privacy", CCS 2016) with per-example clipping and
  Gaussian noise calibrated by :func:`noise_multiplier_for`;
* secure aggregation -- :func:`sum_updates` / :func:`bucket_sums`: the server
  learns only the sum of k clients' updates (Bonawitz et al., "Practical
  Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017), or
  one sum per bucket of s clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn

from fedsec.audit._checks import _check_batch, _check_int, _check_number, _trainable
from fedsec.privacy.accounting import solve_noise_multiplier
from fedsec.privacy.dpsgd import clipped_gradient_sum

__all__ = [
    "Update",
    "bucket_sums",
    "client_update",
    "dp_sgd_update",
    "noise_multiplier_for",
    "sum_updates",
]

#: ``{parameter name: tensor shaped like the parameter}``, as ``model.named_parameters()``.
Update = dict[str, torch.Tensor]


# ---- updates the server sees -----------------------------------------------------


def client_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float) -> Update:
    """The update of one local SGD step on ``(x, y)``: ``new - old = -lr * grad``.

    The gradient is that of the mean cross-entropy over the batch, for every
    trainable parameter. It is computed with :func:`torch.autograd.grad`, so
    the model's weights, ``.grad`` fields and mode are left unchanged.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits (the global model the client received).
    x : torch.Tensor
        Inputs ``[B, ...]`` on the model's device.
    y : torch.Tensor
        ``int64`` labels ``[B]``.
    lr : float
        SGD learning rate, > 0.

    Returns
    -------
    dict of str to torch.Tensor
        ``{parameter name: update}`` for every trainable parameter, in
        ``model.named_parameters()`` order.

    Raises
    ------
    ValueError
        On a malformed batch or ``lr <= 0``.
    """
    lr = _check_number("lr", lr, minimum=0.0, strict=True)
    _check_batch(x, y)
    named = _trainable(model)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else (-lr * g).detach()
        for (name, p), g in zip(named, grads, strict=True)
    }


def dp_sgd_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None = None,
) -> Update:
    """The update of one DP-SGD step (Abadi et al. 2016) on the whole batch ``(x, y)``.

    Each example's gradient (all trainable parameters together) is clipped to
    L2 norm ``C = max_grad_norm``, the clipped gradients are summed
    (:func:`fedsec.privacy.dpsgd.clipped_gradient_sum`, the computation of
    :func:`fedsec.privacy.dpsgd.dp_train`), ``N(0, (noise_multiplier * C)^2)``
    noise is added to every coordinate, the result is divided by the batch size
    ``B`` and the update is ``-lr`` times that. This is one step at sample rate
    1 (the whole batch takes part), for which :func:`noise_multiplier_for`
    gives the noise multiplier of a privacy target.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; left unchanged.
    x : torch.Tensor
        Inputs ``[B, ...]`` on the model's device.
    y : torch.Tensor
        ``int64`` labels ``[B]``.
    lr : float
        SGD learning rate, > 0.
    noise_multiplier : float
        Noise std divided by ``max_grad_norm``, >= 0 (0 only clips).
    max_grad_norm : float
        Per-example clipping bound, > 0.
    generator : torch.Generator, optional
        Source of the noise (on the model's device); the global RNG otherwise.

    Returns
    -------
    dict of str to torch.Tensor
        ``{parameter name: update}`` for every trainable parameter.

    Raises
    ------
    ValueError
        On a malformed batch or a bad hyper-parameter.
    """
    lr = _check_number("lr", lr, minimum=0.0, strict=True)
    sigma = _check_number("noise_multiplier", noise_multiplier, minimum=0.0, strict=False)
    clip = _check_number("max_grad_norm", max_grad_norm, minimum=0.0, strict=True)
    _check_batch(x, y)
    sums = clipped_gradient_sum(model, x, y, max_grad_norm=clip)
    batch = x.shape[0]
    out: Update = {}
    for name, total in sums.items():
        noisy = total.detach().clone()
        if sigma > 0:
            noisy += torch.empty_like(noisy).normal_(0.0, sigma * clip, generator=generator)
        out[name] = noisy.mul_(-lr / batch)
    return out


def noise_multiplier_for(
    epsilon: float, delta: float, steps: int = 1, sample_rate: float = 1.0
) -> float:
    """Noise multiplier of DP-SGD that spends at most ``(epsilon, delta)``.

    :func:`fedsec.privacy.accounting.solve_noise_multiplier` with the RDP
    accountant (Mironov 2017; Opacus's ``get_noise_multiplier``) for ``steps``
    steps of the sampled Gaussian mechanism at ``sample_rate``. The defaults
    describe :func:`dp_sgd_update`: a single step on the whole batch, with no
    amplification by sampling. Examples: epsilon 8 at delta 1e-5 needs about
    0.64, epsilon 1 about 4.06.

    Raises
    ------
    ValueError
        For invalid parameters or an unreachable target.
    """
    return solve_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant="rdp",
    )


def sum_updates(updates: Sequence[Mapping[str, torch.Tensor]]) -> Update:
    """The sum of several clients' updates: all a secure-aggregation server learns.

    With secure aggregation (Bonawitz et al. 2017) the server decrypts only
    ``sum_i update_i`` of the k clients of a round, never an individual one.

    Parameters
    ----------
    updates : sequence of dict of str to torch.Tensor
        At least one update, all with the same keys and shapes.

    Returns
    -------
    dict of str to torch.Tensor
        The element-wise sum, with the keys in the first update's order.

    Raises
    ------
    ValueError
        If ``updates`` is empty or the updates do not match.
    """
    if isinstance(updates, Mapping) or len(updates) == 0:
        raise ValueError("updates must be a non-empty sequence of updates")
    first = updates[0]
    total: Update = {name: value.detach().clone() for name, value in first.items()}
    for i, update in enumerate(updates[1:], start=1):
        if set(update) != set(first) or any(update[n].shape != first[n].shape for n in first):
            raise ValueError(f"update {i} does not have the keys and shapes of update 0")
        for name in total:
            total[name] += update[name].detach()
    return total


def bucket_sums(updates: Sequence[Mapping[str, torch.Tensor]], bucket_size: int) -> list[Update]:
    """Per-bucket sums: what a server running secure aggregation per bucket learns.

    Consecutive runs of ``bucket_size`` updates form ``ceil(k / bucket_size)``
    buckets (the last may be smaller, as in
    :class:`fedsec.aggregation.wrappers.Bucketing`; shuffle beforehand for
    random buckets), and the server sees one :func:`sum_updates` per bucket.
    ``bucket_size = 1`` reveals every individual update.

    Raises
    ------
    ValueError
        If ``updates`` is empty or mismatched, or ``bucket_size < 1``.
    """
    size = _check_int("bucket_size", bucket_size, minimum=1)
    if isinstance(updates, Mapping) or len(updates) == 0:
        raise ValueError("updates must be a non-empty sequence of updates")
    return [sum_updates(updates[i : i + size]) for i in range(0, len(updates), size)]
