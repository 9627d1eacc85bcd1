"""Example-level differential privacy for local training: DP-SGD.

:func:`dp_train` is the private counterpart of :func:`fedsec.training.train`.
It implements DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang,
"Deep Learning with Differential Privacy", CCS 2016) with exactly the semantics
of Opacus (Yousefpour et al., "Opacus: User-Friendly Differential Privacy
Library in PyTorch", arXiv:2109.12298, 2021), so that Opacus's accountants
(:mod:`fedsec.privacy.accounting`) apply unchanged:

1. *Poisson sampling*: every step, each of the ``n`` local examples joins the
   batch independently with probability ``q = batch_size / n`` (Opacus's
   ``UniformWithReplacementSampler``); an empty batch still takes a noise-only
   step.
2. *Per-example clipping*: the gradient of each example's cross-entropy, over
   all trainable parameters together ("flat" clipping), is scaled by
   ``min(1, C / (||g_i|| + 1e-6))`` with ``C = max_grad_norm``.
3. *Gaussian noise*: ``N(0, (noise_multiplier * C)^2)`` is added to the sum of
   the clipped gradients, and the result is divided by the *expected* batch
   size ``q * n = batch_size`` (not by the realised one, which would leak it).
4. The wrapped optimizer (SGD, Adam, ... from :func:`fedsec.training.make_optimizer`)
   steps on that gradient; momentum and weight decay are post-processing.

Why not ``PrivacyEngine.make_private``
--------------------------------------
On the small models and client-sized data sets of a federated simulation,
Opacus's generic machinery dominates the run time: a ``DataLoader`` with
per-example collation, ``GradSampleModule`` backward hooks that materialise
every per-example gradient, and a ``DPOptimizer`` that walks all parameters
several times per step in Python. Measured on a 2-core CPU (see
``simulations/bench_dpsgd.py``, digits MLP and CNN, 150 and 1437 examples,
batch 32) its default (``grad_sample_mode="hooks"``) is 3-8x slower than
non-private training, ``"functorch"`` 5-11x, ``"ew"`` 2.6-6x and ghost
clipping 3.7-5.3x; this module is 1.4-1.7x. It keeps Opacus's maths and does
the bookkeeping itself:

* batches are index slices of the in-memory tensors, as in
  :func:`fedsec.training.train`;
* forward hooks on the layers that own trainable parameters record each
  layer's input and output, and a single ``torch.autograd.grad`` call returns
  the gradients with respect to the layer *outputs* only -- the parameter
  gradients of a normal backward pass, which DP-SGD throws away, are never
  computed;
* a ``Linear`` layer on ``[B, in]`` inputs never materialises its per-example
  gradients ``g_i a_i^T``: their norms are ``||g_i|| ||a_i||`` (Goodfellow,
  "Efficient Per-Example Gradient Computations", arXiv:1510.01799, 2015; the
  "ghost norm" of Li, Tramèr, Liang, Hashimoto, ICLR 2022) and their clipped
  sum is one matrix product ``(c * G)^T A``;
* ``Conv2d`` per-example gradients come from one ``bmm`` on patches cut out
  by strided views (about twice as fast as ``F.unfold`` on CPU);
  ``GroupNorm`` ones from the normalised input;
* every other layer type uses Opacus's own grad sampler where it has one, and
  otherwise ``torch.func.vmap(grad(...))`` on that layer alone -- the same
  fallback as Opacus's hooks mode;
* the noise for all parameters is one draw into a flat buffer whose slices
  are the parameters' ``.grad``, and the clipped sums are fused into it
  (``addmm_``/``addmv_``), with the division by the batch size folded into
  the clip factors and the noise std.

:func:`clipped_gradient_sum` exposes the exact per-step computation and
:func:`per_sample_gradients` the (optionally clipped) per-example gradients,
so that tests can check them against Opacus's ``GradSampleModule`` and
``DPOptimizer``.

The model passed in is never wrapped or replaced: hooks are removed when
training ends, and its ``state_dict`` keys are unchanged (no ``_module.``
prefix).

Modules
-------
This module holds the training loop, and the loop is a user of
:func:`fedsec.privacy.make_private`'s private optimizer
(:func:`fedsec.privacy.dp_loop.private_optimizer`): the DP-SGD step -- clip,
sum, noise, divide, count -- has one implementation, which a user's own loop
and ``dp_train`` share. ``dp_train`` adds what a loop over in-memory tensors
allows: index batches instead of a ``DataLoader``, and
:meth:`~fedsec.privacy.dp_loop.DPOptimizer.backward_outputs` instead of
``loss.backward()``. The parts live along their seams:
:mod:`fedsec.privacy.grad_sample` (per-example gradients of single layers),
:mod:`fedsec.privacy.per_example` (one step's per-example terms, clipping and
clipped sums, :func:`per_sample_gradients`, :func:`clipped_gradient_sum`),
:mod:`fedsec.privacy.poisson` (Poisson sampling and the noise) and
:mod:`fedsec.privacy.dp_loop` (the hooks, the optimizer and the accountant).

Secure mode
-----------
Opacus's ``secure_mode=True`` needs ``torchcsprng``, which is archived and not
built for current PyTorch. Here ``secure_mode=True`` instead draws both the
Poisson masks and the noise from the operating system's CSPRNG
(``os.urandom``, the same ``/dev/urandom`` source that Opacus reads through
``torchcsprng``), via :func:`fedsec.privacy.client_level.secure_standard_normal`,
and, like Opacus, sums four Gaussian draws and halves the result to blunt
floating-point attacks on the noise (Holohan, Braghin, "Secure Random Sampling
in Differential Privacy", ESORICS 2021, Sec. 5.1). ``seed`` is then ignored and
runs are not reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn

from fedsec.privacy.dp_loop import private_optimizer
from fedsec.privacy.per_example import (
    _check_positive,
    _named_trainable,
    clipped_gradient_sum,
    dp_step_probe,
    per_sample_gradients,
)
from fedsec.privacy.poisson import poisson_batches, poisson_sample
from fedsec.training import (
    TrainResult,
    _autocast,
    _check_data,
    _to_device,
    autocast_dtype,
    make_optimizer,
)

__all__ = [
    "DPSGDResult",
    "clipped_gradient_sum",
    "dp_sgd_steps",
    "dp_step_probe",
    "dp_train",
    "per_sample_gradients",
    "poisson_sample",
]


@dataclass(frozen=True)
class DPSGDResult:
    """Outcome of :func:`dp_train`.

    Attributes
    ----------
    train : TrainResult
        Loss and accuracy of the last epoch (measured on the forward passes of
        its Poisson batches, before clipping and noise), the local data set
        size and the number of optimizer steps.
    steps : int
        Optimizer steps taken, empty-batch noise-only steps included: the
        number of compositions for the accountant.
    sample_rate : float
        Poisson sampling rate ``q = batch_size / n``.
    noise_multiplier : float
        Noise standard deviation divided by ``max_grad_norm``.
    """

    train: TrainResult
    steps: int
    sample_rate: float
    noise_multiplier: float


# ---- training ----------------------------------------------------------------


def dp_sgd_steps(
    num_examples: float, batch_size: int, epochs: int, max_steps: int | None = None
) -> int:
    """Steps :func:`dp_train` takes: ``round(epochs * n / batch_size)``, ties up, capped.

    Privacy planning must use exactly this count: planning with
    ``epochs * round(n / batch_size)`` instead under-counts when ``n /
    batch_size`` is not whole, and the ledger then refuses the last round.
    """
    steps = max(1, math.floor(epochs * num_examples / batch_size + 0.5))
    return steps if max_steps is None else min(steps, max_steps)


def dp_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    noise_multiplier: float,
    max_grad_norm: float,
    device: torch.device | str = "cpu",
    seed: int = 0,
    secure_mode: bool = False,
    max_steps: int | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
) -> DPSGDResult:
    """Train ``model`` in place with DP-SGD (Abadi et al. 2016), Opacus semantics.

    Each step Poisson-samples a batch at rate ``q = batch_size / n``, clips
    every example's gradient to L2 norm ``max_grad_norm`` (all parameters
    together), adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` noise to
    their sum, divides by ``batch_size`` (the expected batch size) and lets the
    optimizer step; see the module docstring for how this matches Opacus
    (Yousefpour et al. 2021) and why it is faster.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; trained in place, moved to ``device`` and
        left there in training mode. It is never wrapped, so its
        ``state_dict`` keys do not change. Layers that own trainable
        parameters must be ones Opacus supports (no BatchNorm) and must not be
        followed by in-place operations on their inputs or outputs.
    x : torch.Tensor
        Inputs ``[N, ...]``, floating point.
    y : torch.Tensor
        Integer labels ``[N]``.
    epochs : int
        Expected passes over the data, >= 1: the run takes
        ``round(epochs * n / batch_size)`` steps (``epochs / q``), an "epoch"
        being ``~n / batch_size`` consecutive steps. Opacus truncates each
        epoch to ``floor(1/q)`` steps instead; the accountant only needs
        :attr:`DPSGDResult.steps`.
    batch_size : int
        Expected batch size, ``1 <= batch_size <= n``.
    lr, momentum, weight_decay : float
        Passed to :func:`fedsec.training.make_optimizer`.
    optimizer : str
        ``"sgd"``, ``"adam"`` or ``"adamw"``; it only ever sees privatised
        gradients.
    noise_multiplier : float
        Noise std divided by ``max_grad_norm``, finite and >= 0 (0 clips
        without noise: not private).
    max_grad_norm : float
        Per-example clipping bound ``C``, finite and > 0.
    device : torch.device or str
        Where to train; strings go through :func:`fedsec.training.resolve_device`.
    seed : int
        Seeds the sampling and the noise; with ``secure_mode=False`` the same
        seed, data and initial weights give the same result (on CPU
        bit-for-bit). Ignored in secure mode.
    secure_mode : bool
        Draw the Poisson masks and the noise from ``os.urandom`` and use
        Opacus's four-draw noise (see the module docstring); not reproducible.
        The noise then costs about 3 ms per step for the 17k-parameter digits
        MLP (about 6x its non-secure training time).
    max_steps : int, optional
        Stop after this many steps, even inside an epoch.
    precision : str
        ``"fp32"`` (default) or ``"bf16"``: the forward pass and the backward
        pass to the layer outputs run under bf16 autocast, while per-example
        norms, clipping, the clipped sums and the noise stay in the
        parameters' fp32, so the sensitivity bound holds exactly as in fp32.
        ``"fp16"`` is refused: its loss scaling skips steps whose gradients
        overflow, a data-dependent decision the accountant does not cover.
    max_batch : int, optional
        At most this many examples per pass: a sampled batch larger than that
        is processed in chunks whose clipped sums add up before the single
        noise draw, Opacus's ``BatchMemoryManager`` semantics (the privacy
        analysis sees the same logical batch).

    Returns
    -------
    DPSGDResult
        The training summary plus ``steps``, ``sample_rate`` and
        ``noise_multiplier`` for the accountant
        (:func:`fedsec.privacy.accounting.epsilon_spent`). If no example was
        drawn in the last epoch its loss and accuracy are NaN.

    Raises
    ------
    ValueError
        On an empty data set, mismatched labels, a bad hyper-parameter (one
        line naming it), ``batch_size > n``, or a model DP-SGD cannot handle.
    fedsec.registry.UnknownNameError
        For an unknown optimizer name (a ``ValueError``).
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    sigma = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    clip = _check_positive("max_grad_norm", max_grad_norm)
    lr = _check_positive("lr", lr)
    if max_batch is not None and (
        isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1
    ):
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if precision == "fp16":
        raise ValueError(
            "precision 'fp16' cannot be used with DP-SGD (loss scaling skips steps "
            "depending on the data); use 'bf16' or 'fp32'"
        )
    n = _check_data(x, y, "train with DP-SGD")
    if batch_size > n:
        raise ValueError(
            f"batch_size ({batch_size}) must be <= the number of examples ({n}), "
            f"so that the sampling rate batch_size / n is at most 1"
        )
    named = _named_trainable(model)
    if not named:
        raise ValueError("the model has no trainable parameters")
    params = [p for _, p in named]
    if len({p.dtype for p in params}) > 1:
        raise ValueError("all trainable parameters must have the same dtype")
    x, y, dev = _to_device(model, x, y, device)
    half = autocast_dtype(precision, dev)
    opt = make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    q = batch_size / n

    def epoch_start(e: int) -> int:
        # Epoch e starts at step round(e / q); ties round up, not to even. Computed per
        # epoch, never listed: a server-sent epoch count must not size any allocation.
        return math.floor(e * n / batch_size + 0.5)

    total = epoch_start(epochs) if max_steps is None else min(epoch_start(epochs), max_steps)
    gen = None if secure_mode else torch.Generator().manual_seed(seed)
    noise_gen = gen
    if not secure_mode and dev.type != "cpu":
        noise_gen = torch.Generator(device=dev).manual_seed(seed)
    # The private optimizer of make_private (one implementation of the DP-SGD step:
    # clip, noise, divide by the expected batch size, count), fed by index batches
    # of the in-memory tensors and a backward pass to the layer outputs only.
    dp_opt = private_optimizer(
        model,
        opt,
        num_samples=n,
        batch_size=batch_size,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        loss_reduction="sum",
        generator=gen,
        noise_generator=noise_gen,
        secure_mode=secure_mode,
        keep_outputs=True,
    )
    model.train()
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    seen = 0
    try:
        batches: Iterator[torch.Tensor] = iter(())
        epoch, next_start = -1, 0  # batch_size <= n: every epoch has at least one step
        for step in range(total):
            if step == next_start:  # only the last epoch is reported
                loss_sum.zero_()
                correct.zero_()
                seen = 0
                epoch += 1
                next_start = epoch_start(epoch + 1)
                # The epoch's batches in one draw (PoissonBatchSampler does the same).
                batches = iter(
                    poisson_batches(next_start - step, n, q, generator=gen, secure=secure_mode)
                )
            idx = next(batches).to(dev)
            # An empty batch takes a noise-only step. Only a memory cap splits a
            # batch: each pass is clipped on its own and the sums add up before the
            # step's single noise draw (Opacus's BatchMemoryManager semantics).
            chunk = max(1, idx.numel()) if max_batch is None else max_batch
            for first in range(0, idx.numel(), chunk):
                part = idx[first : first + chunk]
                xb, yb = x[part], y[part]
                with _autocast(dev, half):
                    logits = model(xb)
                    batch_loss = F.cross_entropy(logits, yb, reduction="sum")
                dp_opt.backward_outputs(batch_loss)
                seen += int(yb.numel())
                loss_sum += batch_loss.detach().float()
                correct += (logits.detach().argmax(dim=1) == yb).sum()
                # Free this pass's activations before the next forward pass.
                del logits, batch_loss
            dp_opt.step()
    finally:
        dp_opt.detach()
        for p in params:
            p.grad = None
    nan = float("nan")
    result = TrainResult(
        loss=float(loss_sum.item()) / seen if seen else nan,
        accuracy=int(correct.item()) / seen if seen else nan,
        num_examples=n,
        steps=total,
    )
    return DPSGDResult(train=result, steps=total, sample_rate=q, noise_multiplier=sigma)
