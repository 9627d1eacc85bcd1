"""Gradient inversion: what an honest-but-curious server reconstructs from a client's update.

A federated server sees each client's model update. For one local SGD step on a
batch ``(x, y)`` with learning rate ``lr`` the update is ``-lr * grad``, so the
server holds the gradient of the client's loss up to a known factor, and
gradients leak their inputs: Zhu, Liu and Han ("Deep Leakage from Gradients",
NeurIPS 2019) [1]_ optimise dummy inputs until the gradient they induce matches
the observed one. This module implements the stronger variant of Geiping,
Bauermeister, Dröge and Moeller ("Inverting Gradients -- How easy is it to
break privacy in federated learning?", NeurIPS 2020) [2]_: the dummy batch
maximises the *cosine similarity* between its gradient and the target (so the
unknown scale, e.g. the learning rate, does not matter), under a
total-variation image prior (Rudin, Osher and Fatemi 1992) [3]_, with Adam, a
step-decay learning-rate schedule and a projection onto the valid pixel box
after every step. For a single example the label is recovered analytically
first (iDLG, Zhao, Mopuri and Bilen, arXiv:2001.02610, 2020) [4]_; for a batch
the most negative entries of the last layer's bias gradient are taken (Yin et
al., CVPR 2021) [5]_.

The audit compares what the server reconstructs under three scenarios, each
with a helper that builds the update the server sees:

* no protection -- :func:`client_update`, one plain SGD step;
* DP-SGD -- :func:`dp_sgd_update`, one step of Abadi et al. (CCS 2016) [6]_
  with per-example clipping and Gaussian noise calibrated by
  :func:`noise_multiplier_for`;
* secure aggregation -- :func:`sum_updates` / :func:`bucket_sums`: the server
  learns only the sum of k clients' updates (Bonawitz et al., CCS 2017) [7]_,
  or one sum per bucket of s clients.

Reconstructions are scored in pixel space (``[0, 1]``, see :func:`to_pixels`)
by :func:`psnr` and :func:`ssim` (Wang, Bovik, Sheikh and Simoncelli 2004) [8]_,
against the level of a guess that knows the data set but not the client:
:func:`random_guess_psnr`.

References
----------
.. [1] L. Zhu, Z. Liu and S. Han, "Deep Leakage from Gradients", NeurIPS 2019.
.. [2] J. Geiping, H. Bauermeister, H. Dröge and M. Moeller, "Inverting
   Gradients -- How easy is it to break privacy in federated learning?",
   NeurIPS 2020.
.. [3] L. I. Rudin, S. Osher and E. Fatemi, "Nonlinear total variation based
   noise removal algorithms", Physica D 60, 1992.
.. [4] B. Zhao, K. R. Mopuri and H. Bilen, "iDLG: Improved Deep Leakage from
   Gradients", arXiv:2001.02610, 2020.
.. [5] H. Yin, A. Mallya, A. Vahdat, J. M. Alvarez, J. Kautz and P. Molchanov,
   "See through Gradients: Image Batch Recovery via GradInversion", CVPR 2021.
.. [6] M. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
.. [7] K. Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
   Machine Learning", CCS 2017.
.. [8] Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image Quality
   Assessment: From Error Visibility to Structural Similarity", IEEE
   Transactions on Image Processing 13(4), 2004.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn

from fedsec.data.datasets import DatasetInfo
from fedsec.privacy.accounting import solve_noise_multiplier
from fedsec.privacy.dpsgd import clipped_gradient_sum

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_STEP_SIZE",
    "DEFAULT_TV_WEIGHT",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_WINDOW",
    "Bounds",
    "InversionResult",
    "Update",
    "bucket_sums",
    "client_update",
    "dp_sgd_update",
    "from_pixels",
    "invert_update",
    "noise_multiplier_for",
    "psnr",
    "random_guess_psnr",
    "recover_label",
    "ssim",
    "sum_updates",
    "to_pixels",
]

#: ``{parameter name: tensor shaped like the parameter}``, as ``model.named_parameters()``.
Update = dict[str, torch.Tensor]
#: ``(low, high)`` tensors broadcastable against ``[B, C, H, W]`` inputs.
Bounds = tuple[torch.Tensor, torch.Tensor]

#: Side of the square uniform SSIM window (see :func:`ssim`).
SSIM_WINDOW = 3
#: SSIM stabilising constants of Wang et al. (2004): ``C_i = (K_i * data_range)^2``.
SSIM_K1 = 0.01
SSIM_K2 = 0.03

#: Default optimisation budget of :func:`invert_update`, measured on an 8x8 digit and
#: the ``mlp`` model (see the function's notes).
DEFAULT_STEPS = 200
#: Default Adam step size of :func:`invert_update` (Geiping et al. use 0.1).
DEFAULT_STEP_SIZE = 0.1
#: Default weight of the total-variation prior of :func:`invert_update`.
DEFAULT_TV_WEIGHT = 1e-4

#: Guards the cosine similarity against a zero dummy gradient.
_COS_EPS = 1e-12


@dataclass(frozen=True)
class InversionResult:
    """Outcome of :func:`invert_update`.

    Parameters
    ----------
    images : torch.Tensor
        Reconstructed inputs ``[B, C, H, W]`` in the model's (normalised) input
        space; :func:`to_pixels` maps them to ``[0, 1]`` pixels.
    labels : torch.Tensor
        ``int64`` labels ``[B]`` the reconstruction assumed (given or recovered).
    loss : float
        Final objective: ``1 - cosine similarity + tv_weight * TV``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    loss: float


# ---- validation helpers ----------------------------------------------------------


def _check_number(name: str, value: float, *, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = value > minimum if strict else value >= minimum
    if not math.isfinite(value) or not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {relation} {minimum:g}, got {value!r}")
    return value


def _check_int(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
    ):
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
    return input_shape[0], input_shape[1], input_shape[2]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def _flatten(
    update: Mapping[str, torch.Tensor] | torch.Tensor, named: list[tuple[str, nn.Parameter]]
) -> torch.Tensor:
    """The update (or gradient) as one vector in ``named`` order, after shape checks."""
    total = sum(p.numel() for _, p in named)
    if isinstance(update, torch.Tensor):
        if update.dim() != 1 or update.numel() != total:
            raise ValueError(
                f"a flat update must be a vector of the model's {total} trainable "
                f"parameters, got shape {tuple(update.shape)}"
            )
        return update.detach()
    if not isinstance(update, Mapping):
        raise ValueError(f"update must be a dict of tensors or a flat tensor, got {update!r}")
    names = [n for n, _ in named]
    if set(update) != set(names):
        missing = sorted(set(names) - set(update))
        extra = sorted(set(update) - set(names))
        raise ValueError(
            f"update keys do not match the model's trainable parameters: "
            f"missing {missing}, unexpected {extra}"
        )
    parts = []
    for name, p in named:
        value = update[name]
        if not isinstance(value, torch.Tensor) or value.shape != p.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"update[{name!r}] must have shape {tuple(p.shape)}, got {shape}")
        parts.append(value.detach().reshape(-1))
    return torch.cat(parts)


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError("x must be a floating-point tensor [B, ...]")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise ValueError("y must be an int64 tensor [B]")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )


def _check_image_pair(
    original: torch.Tensor, reconstruction: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    for name, t in (("original", original), ("reconstruction", reconstruction)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be one image [C, H, W], got {shape}")
    if original.shape != reconstruction.shape:
        raise ValueError(
            f"original and reconstruction shapes differ: {tuple(original.shape)} vs "
            f"{tuple(reconstruction.shape)}"
        )
    data_range = _check_number("data_range", data_range, minimum=0.0, strict=True)
    return original.detach().double(), reconstruction.detach().double(), data_range


# ---- image quality ---------------------------------------------------------------


def psnr(original: torch.Tensor, reconstruction: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` of one image, in dB.

    Parameters
    ----------
    original, reconstruction : torch.Tensor
        Images ``[C, H, W]`` of the same shape, in pixel space (e.g. ``[0, 1]``,
        see :func:`to_pixels`).
    data_range : float
        Span of valid pixel values (1.0 for ``[0, 1]`` pixels), > 0.

    Returns
    -------
    float
        PSNR in dB, computed in float64; ``inf`` for identical images.

    Raises
    ------
    ValueError
        If an image is not ``[C, H, W]``, the shapes differ or ``data_range <= 0``.
    """
    x, y, data_range = _check_image_pair(original, reconstruction, data_range)
    mse = float(torch.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _local_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the ``SSIM_WINDOW``-square window around every pixel, reflect-padded."""
    pad = SSIM_WINDOW // 2
    padded = F.pad(t.unsqueeze(0), (pad, pad, pad, pad), mode="reflect")
    return F.avg_pool2d(padded, SSIM_WINDOW, stride=1).squeeze(0)


def ssim(original: torch.Tensor, reconstruction: torch.Tensor, data_range: float) -> float:
    """Structural similarity index (Wang et al. 2004) of one image, in ``[-1, 1]``.

    The SSIM map of Wang et al. [8]_ (their eq. 13),
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``
    with ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` (``L = data_range``),
    averaged over all pixels and channels (each channel on its own).

    Window: the paper's 11x11 Gaussian (sigma 1.5) is wider than an 8x8 digit, so
    the local statistics are taken over a **3x3 uniform window** instead, with
    **reflect padding** so that every pixel, border included, has a full window
    and the map is as large as the image; the (co)variances are the window's
    population moments (divided by 9, not 8). Images must be at least 2x2.

    Parameters
    ----------
    original, reconstruction : torch.Tensor
        Images ``[C, H, W]`` of the same shape, in pixel space.
    data_range : float
        Span of valid pixel values (1.0 for ``[0, 1]`` pixels), > 0.

    Returns
    -------
    float
        Mean SSIM, computed in float64; 1.0 for identical images.

    Raises
    ------
    ValueError
        If an image is not ``[C, H, W]`` with ``H, W >= 2``, the shapes differ or
        ``data_range <= 0``.
    """
    x, y, data_range = _check_image_pair(original, reconstruction, data_range)
    if x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"ssim needs images of at least 2x2 pixels, got {tuple(x.shape)}")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _local_mean(x), _local_mean(y)
    var_x = _local_mean(x * x) - mu_x**2
    var_y = _local_mean(y * y) - mu_y**2
    cov = _local_mean(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


def _pixel_stats(
    info: DatasetInfo, t: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    channels = info.input_shape[0]
    if not isinstance(t, torch.Tensor) or t.dim() < 3 or t.shape[-3] != channels:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"{what} must be [..., {channels}, H, W] for dataset '{info.name}', got {shape}"
        )
    for field, values in (("pixel_mean", info.pixel_mean), ("pixel_std", info.pixel_std)):
        if len(values) not in (1, channels):
            raise ValueError(
                f"{field} of dataset '{info.name}' needs 1 or {channels} values, got {values}"
            )
    if not all(s > 0 for s in info.pixel_std):
        raise ValueError(f"pixel_std of dataset '{info.name}' must be > 0, got {info.pixel_std}")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    mean = torch.tensor(info.pixel_mean, dtype=dtype, device=t.device)
    std = torch.tensor(info.pixel_std, dtype=dtype, device=t.device)
    shape = (channels, 1, 1)
    return mean.expand(channels).reshape(shape), std.expand(channels).reshape(shape)


def to_pixels(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map normalised inputs to ``[0, 1]`` pixels: ``x * pixel_std + pixel_mean``.

    The inverse of the loaders' ``(pixel - mean) / std``; no clamping, so
    inputs outside :func:`fedsec.data.datasets.pixel_bounds` map outside
    ``[0, 1]``.

    Parameters
    ----------
    x : torch.Tensor
        Inputs ``[..., C, H, W]`` (one image or a batch) of data set ``info``.
    info : DatasetInfo
        Supplies ``pixel_mean``/``pixel_std`` (one value or one per channel).

    Returns
    -------
    torch.Tensor
        Pixels, same shape.

    Raises
    ------
    ValueError
        If ``x`` does not have ``info``'s channel count in dimension -3, or the
        statistics are malformed.
    """
    mean, std = _pixel_stats(info, x, "x")
    return x * std + mean


def from_pixels(p: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map ``[0, 1]`` pixels to the model's inputs: ``(p - pixel_mean) / pixel_std``.

    The inverse of :func:`to_pixels`; parameters and errors as there.
    """
    mean, std = _pixel_stats(info, p, "p")
    return (p - mean) / std


def random_guess_psnr(original: torch.Tensor, pool: torch.Tensor, info: DatasetInfo) -> float:
    """PSNR of a random guess: the mean PSNR of ``original`` against other images of the set.

    The reference level of a reconstruction attack: an attacker who knows the
    data distribution but learned nothing about the client's example can still
    output *some* image of the data set. This is the expected PSNR of such a
    draw -- the mean, over the images of ``pool``, of ``psnr(original, image)``
    in ``[0, 1]`` pixel space. Pool images identical to ``original`` are skipped
    (a draw that happens to be a duplicate says nothing about the attack). A
    reconstruction that scores no better than this has not revealed the image.

    Parameters
    ----------
    original : torch.Tensor
        The client's image ``[C, H, W]``, normalised as the data set's inputs.
    pool : torch.Tensor
        Other images of the same data set ``[N, C, H, W]``, normalised (e.g.
        the server's held-out test split).
    info : DatasetInfo
        The data set, for :func:`to_pixels`.

    Returns
    -------
    float
        Mean PSNR in dB.

    Raises
    ------
    ValueError
        On mismatched shapes, or if the pool holds no image other than ``original``.
    """
    if not isinstance(original, torch.Tensor) or original.dim() != 3:
        raise ValueError("original must be one image [C, H, W]")
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or pool.shape[1:] != original.shape:
        shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
        raise ValueError(f"pool must be [N, {', '.join(map(str, original.shape))}], got {shape}")
    target = to_pixels(original.detach().double(), info)
    images = to_pixels(pool.detach().double(), info)
    values = [psnr(target, img, 1.0) for img in images if not torch.equal(img, target)]
    if not values:
        raise ValueError("pool holds no image other than the original")
    return sum(values) / len(values)


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


# ---- label recovery --------------------------------------------------------------


def _last_layer_signal(flat: torch.Tensor, named: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """Per-class last-layer gradient signal: the bias entries, or the weight row sums."""
    last_name, last = named[-1]
    values = flat[flat.numel() - last.numel() :].reshape(last.shape)
    if last.dim() == 1:
        signal = values
    elif last.dim() == 2:
        signal = values.sum(dim=1)
    else:
        raise ValueError(
            f"the last trainable parameter ({last_name!r}, shape {tuple(last.shape)}) must be "
            f"a linear layer's bias or weight"
        )
    if signal.numel() < 2:
        raise ValueError(f"the last layer must have >= 2 outputs, got {signal.numel()}")
    return signal


def recover_label(
    update_or_grads: Mapping[str, torch.Tensor] | torch.Tensor,
    model: nn.Module,
    *,
    kind: Literal["auto", "gradient", "update"] = "auto",
) -> int:
    """Recover the label of a single example from its gradient or SGD update (iDLG).

    Zhao et al. (2020) [4]_: for one example with cross-entropy loss, the
    gradient with respect to the last layer's bias is ``softmax(z) - onehot(y)``
    -- only the label's entry is negative. For a bias-free last layer the rows
    of the weight gradient are ``(p_k - y_k) h`` and their sums keep these signs
    when the features ``h`` are non-negative (after a ReLU). An SGD update
    ``-lr * grad`` flips every sign: only the label's entry is positive.

    ``kind="auto"`` needs neither sign: the label is the entry of largest
    magnitude, since ``|p_y - 1| = sum_{k != y} p_k >= max_{k != y} p_k``. A tie
    happens only when all the remaining probability lies on one class, always
    so with two classes, where ``kind`` must be given.

    The last layer is the last trainable parameter in
    ``model.named_parameters()`` order (the output layer for ``nn.Sequential``
    models and fedsec's zoo).

    Parameters
    ----------
    update_or_grads : dict of str to torch.Tensor, or torch.Tensor
        Gradients or a one-step update of every trainable parameter, as a dict
        keyed like ``model.named_parameters()`` or flattened into one vector in
        that order (``torch.nn.utils.parameters_to_vector`` layout).
    model : torch.nn.Module
        The model the update belongs to (only its parameter names and shapes
        are read).
    kind : {"auto", "gradient", "update"}
        What ``update_or_grads`` holds: ``"gradient"`` takes the most negative
        entry, ``"update"`` the most positive, ``"auto"`` the largest in magnitude.

    Returns
    -------
    int
        The recovered label.

    Raises
    ------
    ValueError
        If the update does not match the model, the last parameter is not a
        linear layer's, ``kind`` is unknown, or ``kind="auto"`` with two classes.
    """
    if kind not in ("auto", "gradient", "update"):
        raise ValueError(f"kind must be 'auto', 'gradient' or 'update', got {kind!r}")
    named = _trainable(model)
    signal = _last_layer_signal(_flatten(update_or_grads, named), named)
    if kind == "gradient":
        return int(signal.argmin())
    if kind == "update":
        return int(signal.argmax())
    if signal.numel() == 2:
        raise ValueError(
            "with two classes the label is ambiguous: pass kind='gradient' or 'update'"
        )
    return int(signal.abs().argmax())


# ---- inversion -------------------------------------------------------------------


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels."""
    tv_h = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() if x.shape[-2] > 1 else x.new_zeros(())
    tv_w = (x[..., :, 1:] - x[..., :, :-1]).abs().mean() if x.shape[-1] > 1 else x.new_zeros(())
    return tv_h + tv_w


def _check_labels(
    labels: torch.Tensor | Sequence[int], num_images: int, num_classes: int
) -> torch.Tensor:
    try:
        out = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be {num_images} integers, got {labels!r}") from None
    if out.dtype.is_floating_point or out.dtype.is_complex or out.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {out.dtype}")
    if out.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), got {tuple(out.shape)}")
    if bool((out < 0).any()) or bool((out >= num_classes).any()):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {out.tolist()}")
    return out.to(torch.int64)


def _broadcasts_to(small: torch.Size, shape: tuple[int, ...]) -> bool:
    """Whether ``small`` broadcasts against ``shape`` without enlarging it."""
    if len(small) > len(shape):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(shape), strict=False))


def _check_bounds(bounds: Bounds | None, shape: tuple[int, int, int, int]) -> Bounds | None:
    if bounds is None:
        return None
    if not isinstance(bounds, tuple | list) or len(bounds) != 2:
        raise ValueError("bounds must be a (low, high) pair of tensors")
    low, high = (torch.as_tensor(b, dtype=torch.float32) for b in bounds)
    if not all(_broadcasts_to(t.shape, shape) for t in (low, high)):
        raise ValueError(
            f"bounds of shapes {tuple(low.shape)} and {tuple(high.shape)} do not broadcast "
            f"against the images {shape}"
        )
    if not bool((low < high).all()):
        raise ValueError("bounds must satisfy low < high everywhere")
    return low, high


def invert_update(
    model: nn.Module,
    update: Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    lr: float,
    num_images: int = 1,
    labels: torch.Tensor | Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    tv_weight: float = DEFAULT_TV_WEIGHT,
    step_size: float = DEFAULT_STEP_SIZE,
    seed: int = 0,
    bounds: Bounds | None = None,
) -> InversionResult:
    """Reconstruct a client's inputs from its update: Inverting Gradients (Geiping et al. 2020).

    The target gradient is ``-update / lr`` (one SGD step, see
    :func:`client_update`). Dummy inputs ``x'`` (``num_images`` of them, drawn
    from ``N(0, 1)`` with a generator seeded by ``seed`` and projected onto
    ``bounds``) are optimised to minimise Geiping et al.'s [2]_ objective

        ``1 - <g(x'), g*> / (||g(x')|| ||g*||) + tv_weight * TV(x')``

    where ``g(x')`` is the gradient of the mean cross-entropy of the dummy batch
    with the assumed labels over all trainable parameters, flattened, ``g*``
    the target and TV the anisotropic total variation (mean absolute
    difference of neighbouring pixels). Adam with step size ``step_size``
    runs ``steps`` iterations; the step size is divided by 10 after 3/8, 5/8
    and 7/8 of them (the paper's schedule), and after every step the images are
    clamped into ``bounds``. The cosine makes the attack blind to the scale of
    the update (learning rate, batch size, number of summed clients).

    Labels: given ones are used as they are. Without them a single image's
    label comes from :func:`recover_label` (iDLG [4]_), and a batch's labels are
    the classes of the ``num_images`` most negative entries of the last layer's
    bias gradient (Yin et al. 2021 [5]_; this assumes distinct labels).

    The model is only read: its weights, ``.grad`` fields and mode are left as
    they are (the reconstruction runs in the model's current mode). On CPU the
    result is deterministic for a seed.

    Parameters
    ----------
    model : torch.nn.Module
        The model the update was computed on (the server knows it: it sent it).
    update : dict of str to torch.Tensor, or torch.Tensor
        The update the server received, keyed like ``model.named_parameters()``
        (trainable parameters only), or flattened in that order.
    input_shape : tuple of int
        ``(C, H, W)`` of one input.
    num_classes : int
        Number of classes (>= 2).
    lr : float
        Learning rate of the client's SGD step, > 0 (only the sign of the
        update matters to the cosine).
    num_images : int
        Number of images to reconstruct (>= 1).
    labels : torch.Tensor or sequence of int, optional
        Labels of the images, ``[num_images]``; recovered when absent.
    steps : int
        Optimisation steps (>= 1). The default reconstructs an 8x8 digit from a
        single-example ``mlp`` update to a PSNR above 40 dB (20 examples,
        untrained model) in about 0.3 s on one CPU core; see Notes.
    tv_weight : float
        Weight of the total-variation prior (>= 0).
    step_size : float
        Initial Adam step size (> 0).
    seed : int
        Seeds the dummy initialisation.
    bounds : (low, high), optional
        Valid input range, broadcastable against ``[B, C, H, W]`` (e.g.
        :func:`fedsec.data.datasets.pixel_bounds`); no clamping when absent.

    Returns
    -------
    InversionResult
        The reconstructed images (normalised input space), the labels used and
        the final objective.

    Notes
    -----
    Defaults, measured on the first 20 training digits and the ``mlp`` model
    (seed 0), one plain SGD step per example, bounds from
    :func:`fedsec.data.datasets.pixel_bounds`: with 200 steps the worst PSNR
    is 46 dB on the untrained model and 32 dB after 10 epochs of SGD on other
    digits (100 steps: 25 dB on 8 digits, untrained). Geiping et al. run
    thousands of steps on ImageNet-sized networks, but the first linear layer
    of an MLP nearly determines the input (its weight gradient is the outer
    product of the back-propagated error and the input), so 8x8 digits need
    few. The TV weight matters little here (0 and 1e-2 give 52 and 27 dB on 8
    digits); it is kept small so as not to blur the strokes. The tensors are tiny, so one intra-op
    thread (``torch.set_num_threads(1)``) is fastest; on a busy 2-core machine
    two threads were 6x slower.

    Raises
    ------
    ValueError
        If the update does not match the model or is zero, or an argument is
        malformed (shape, counts, labels, bounds, hyper-parameters).
    """
    shape = _check_shape(input_shape)
    num_classes = _check_int("num_classes", num_classes, minimum=2)
    lr = _check_number("lr", lr, minimum=0.0, strict=True)
    num_images = _check_int("num_images", num_images, minimum=1)
    steps = _check_int("steps", steps, minimum=1)
    tv_weight = _check_number("tv_weight", tv_weight, minimum=0.0, strict=False)
    step_size = _check_number("step_size", step_size, minimum=0.0, strict=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    named = _trainable(model)
    params = [p for _, p in named]
    device = params[0].device
    target = (-_flatten(update, named) / lr).to(device=device, dtype=torch.float32)
    target_norm = target.norm()
    if not bool(torch.isfinite(target_norm)) or float(target_norm) == 0.0:
        raise ValueError("the update must be finite and not all zeros")
    batch_shape = (num_images, *shape)
    checked = _check_bounds(bounds, batch_shape)

    if labels is not None:
        label_t = _check_labels(labels, num_images, num_classes)
    else:
        signal = _last_layer_signal(target, named)
        if signal.numel() != num_classes:
            raise ValueError(
                f"the last layer has {signal.numel()} outputs but num_classes is {num_classes}"
            )
        if num_images == 1:
            label_t = torch.tensor([int(signal.argmin())])
        elif num_images <= num_classes:
            label_t = torch.argsort(signal)[:num_images].sort().values
        else:
            raise ValueError(
                f"cannot recover {num_images} labels of {num_classes} classes: pass labels"
            )
    label_t = label_t.to(device)

    low = high = None
    if checked is not None:
        low, high = (b.to(device) for b in checked)

    generator = torch.Generator().manual_seed(seed)
    dummy = torch.randn(batch_shape, generator=generator).to(device)
    if low is not None and high is not None:
        dummy = torch.max(torch.min(dummy, high), low)
    dummy.requires_grad_(True)

    def objective(x: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), label_t)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        flat = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for p, g in zip(params, grads, strict=True)
            ]
        )
        cosine = flat @ target / (flat.norm() * target_norm + _COS_EPS)
        value: torch.Tensor = 1.0 - cosine + tv_weight * _total_variation(x)
        return value

    optimizer = torch.optim.Adam([dummy], lr=step_size)
    milestones = sorted({int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)} - {0})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in range(steps):
        loss = objective(dummy)
        (dummy.grad,) = torch.autograd.grad(loss, [dummy])
        optimizer.step()
        schedule.step()
        if low is not None and high is not None:
            with torch.no_grad():
                dummy.copy_(torch.max(torch.min(dummy, high), low))
    final = float(objective(dummy).detach())
    return InversionResult(images=dummy.detach().clone(), labels=label_t, loss=final)
