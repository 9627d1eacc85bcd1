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

Those helpers live in :mod:`fedsec.audit.server_view`, the scores below in
:mod:`fedsec.audit.image_quality`; both stay importable from here.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn

from fedsec.audit._checks import (
    _check_int,
    _check_number,
    _check_shape,
    _flatten,
    _trainable,
)

# Re-exported: image quality and the server's view were parts of this module, and
# callers import them from here.
from fedsec.audit.image_quality import (
    SSIM_K1,
    SSIM_K2,
    SSIM_WINDOW,
    from_pixels,
    psnr,
    random_guess_psnr,
    ssim,
    to_pixels,
)
from fedsec.audit.server_view import (
    Update,
    bucket_sums,
    client_update,
    dp_sgd_update,
    noise_multiplier_for,
    sum_updates,
)

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


#: ``(low, high)`` tensors broadcastable against ``[B, C, H, W]`` inputs.
Bounds = tuple[torch.Tensor, torch.Tensor]


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
