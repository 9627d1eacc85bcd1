"""Test-time evasion attacks (FGSM, PGD) and the PGD adversary for adversarial training.

Both attacks perturb the inputs within an L-infinity ball of radius ``eps``
around them, in the model's input units -- the normalised tensors the data
loaders produce. Because normalisation divides each channel by its own std, a
perturbation of ``eps`` pixel units (pixels scaled to ``[0, 1]``) is a
per-channel ``eps / std_c`` in input units; :func:`pixel_eps_to_input` does the
conversion and every function here accepts ``eps`` as a float or as a tensor
broadcastable against the inputs (e.g. ``[C, 1, 1]``). ``bounds = (low, high)``
(see :func:`fedsec.data.datasets.pixel_bounds`) keeps the adversarial inputs
valid images.

Crafting runs with the model in eval mode and differentiates the loss with
respect to the input only (:func:`torch.autograd.grad`); the parameters'
``requires_grad`` flags are switched off meanwhile (so no graph is built for
them) and every module's mode and flag is restored afterwards, so crafting
never touches ``.grad`` nor the caller's training state.

References
----------
.. [1] I. J. Goodfellow, J. Shlens and C. Szegedy, "Explaining and Harnessing
   Adversarial Examples", ICLR 2015.
.. [2] A. Madry, A. Makelov, L. Schmidt, D. Tsipras and A. Vladu, "Towards Deep
   Learning Models Resistant to Adversarial Attacks", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn

from fedsec.data.datasets import DatasetInfo
from fedsec.training import Adversary, resolve_device

__all__ = [
    "Bounds",
    "Eps",
    "crafting_mode",
    "fgsm",
    "pgd",
    "pgd_adversary",
    "pixel_eps_to_input",
    "robust_accuracy",
]

#: ``(low, high)`` tensors broadcastable against the inputs.
Bounds = tuple[torch.Tensor, torch.Tensor]
#: A radius or step: one number, or a tensor broadcastable against the inputs.
Eps = float | torch.Tensor


# ---- helpers ------------------------------------------------------------------


@contextmanager
def crafting_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of the block.

    Every module's ``training`` flag and every parameter's ``requires_grad``
    flag are restored on exit, also when the block raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _as_like(value: Eps, x: torch.Tensor, what: str) -> torch.Tensor:
    """``value`` as a tensor on ``x``'s device and dtype, checked >= 0."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if not bool(torch.all(t >= 0)):
        raise ValueError(f"{what} must be >= 0, got {value}")
    return t


def _clamp(x: torch.Tensor, bounds: Bounds | None) -> torch.Tensor:
    if bounds is None:
        return x
    low, high = (b.to(device=x.device, dtype=x.dtype) for b in bounds)
    return torch.minimum(torch.maximum(x, low), high)


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(cross-entropy)/dx; the parameters must already be frozen."""
    x_var = x.detach().requires_grad_(True)
    # A summed loss: each example's gradient does not shrink with the batch size.
    loss = F.cross_entropy(model(x_var), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_var)
    return grad


def pixel_eps_to_input(eps_pixels: float, info: DatasetInfo) -> torch.Tensor:
    """Convert a radius in pixel units (``[0, 1]`` scale) to the model's input units.

    Parameters
    ----------
    eps_pixels : float
        Radius (or step size) in pixel units, >= 0; e.g. ``8 / 255`` for CIFAR-10.
    info : DatasetInfo
        The data set whose ``pixel_std`` normalised the inputs.

    Returns
    -------
    torch.Tensor
        ``float32`` ``[C, 1, 1]``, ``eps_pixels / std_c`` per channel; pass it as
        ``eps`` (or ``alpha``) to :func:`fgsm`, :func:`pgd` or
        :func:`robust_accuracy`.

    Raises
    ------
    ValueError
        If ``eps_pixels < 0``.
    """
    if not eps_pixels >= 0:
        raise ValueError(f"eps_pixels must be >= 0, got {eps_pixels}")
    channels = info.input_shape[0]
    std = torch.tensor(info.pixel_std, dtype=torch.float64).expand(channels)
    return (eps_pixels / std).to(torch.float32).reshape(channels, 1, 1)


# ---- attacks ------------------------------------------------------------------


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Eps,
    bounds: Bounds | None = None,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow, Shlens, Szegedy, ICLR 2015).

    ``x_adv = clamp(x + eps * sign(grad_x CE(model(x), y)), bounds)``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; crafted against in eval mode, its state
        restored afterwards.
    x : torch.Tensor
        Inputs ``[N, ...]`` on the model's device; not modified.
    y : torch.Tensor
        Integer labels ``[N]``.
    eps : float or torch.Tensor
        Step, >= 0, in input units; a tensor broadcasts against ``x``.
    bounds : (torch.Tensor, torch.Tensor), optional
        ``(low, high)`` valid input range, broadcastable against ``x``.

    Returns
    -------
    torch.Tensor
        Detached adversarial inputs, same shape and dtype as ``x``.
    """
    eps_t = _as_like(eps, x, "eps")
    with crafting_mode(model):
        grad = _input_gradient(model, x, y)
    return _clamp(x.detach() + eps_t * grad.sign(), bounds)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: Eps,
    alpha: Eps,
    steps: int,
    generator: torch.Generator | None = None,
    random_start: bool = True,
    bounds: Bounds | None = None,
) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball (Madry et al., ICLR 2018).

    Starting from ``x`` (plus uniform noise in ``[-eps, eps]`` when
    ``random_start``), repeat ``steps`` times: ``x_adv += alpha * sign(grad)``,
    project onto ``[x - eps, x + eps]``, clamp into ``bounds``. The result is
    always inside both the ball and the bounds (for ``x`` itself inside the
    bounds).

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; crafted against in eval mode, its state
        restored afterwards.
    x : torch.Tensor
        Inputs ``[N, ...]`` on the model's device; not modified.
    y : torch.Tensor
        Integer labels ``[N]``.
    eps : float or torch.Tensor
        Radius, >= 0, in input units; a tensor broadcasts against ``x``.
    alpha : float or torch.Tensor
        Step size, >= 0, in input units.
    steps : int
        Gradient steps, >= 1.
    generator : torch.Generator, optional
        CPU generator for the random start; ``None`` uses a fresh one seeded 0,
        so results are reproducible and the global RNG is never used.
    random_start : bool, default True
        Start from a uniformly random point of the ball, as Madry et al. do.
    bounds : (torch.Tensor, torch.Tensor), optional
        ``(low, high)`` valid input range, broadcastable against ``x``.

    Returns
    -------
    torch.Tensor
        Detached adversarial inputs, same shape and dtype as ``x``.

    Raises
    ------
    ValueError
        If ``eps`` or ``alpha`` is negative or ``steps < 1``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    eps_t = _as_like(eps, x, "eps")
    alpha_t = _as_like(alpha, x, "alpha")
    x0 = x.detach()
    low, high = x0 - eps_t, x0 + eps_t
    x_adv = x0
    if random_start:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        # Drawn on the CPU (where the generator lives), then moved.
        noise = torch.rand(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        x_adv = _clamp(x0 + (2 * noise - 1) * eps_t, bounds)
    with crafting_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x_adv, y)
            x_adv = torch.minimum(torch.maximum(x_adv + alpha_t * grad.sign(), low), high)
            x_adv = _clamp(x_adv, bounds)
    return x_adv.detach()


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Literal["pgd", "fgsm"] = "pgd",
    eps: Eps,
    alpha: Eps | None = None,
    steps: int = 10,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    bounds: Bounds | None = None,
) -> float:
    """Accuracy of ``model`` on adversarially perturbed ``(x, y)``.

    Each example is attacked against its own true label; an example counts as
    correct when the model still predicts that label on the perturbed input.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; moved to ``device``, its modes and
        ``requires_grad`` flags restored afterwards.
    x, y : torch.Tensor
        Inputs ``[N, ...]`` and integer labels ``[N]``, N >= 1.
    attack : {"pgd", "fgsm"}
        Which attack crafts the inputs.
    eps : float or torch.Tensor
        Radius in input units (see :func:`pixel_eps_to_input`).
    alpha : float or torch.Tensor, optional
        PGD step size; default ``2.5 * eps / steps`` (Madry et al.'s choice, so
        that the iterate can cross the ball from any start). Ignored by FGSM.
    steps : int, default 10
        PGD iterations; ignored by FGSM.
    batch_size : int, default 512
        Examples crafted at once. With a random start, the noise depends on the
        batch layout, so results are reproducible for a fixed ``batch_size``.
    device : torch.device or str
        Where to run; strings go through :func:`fedsec.training.resolve_device`.
    generator : torch.Generator, optional
        For PGD's random start (see :func:`pgd`).
    bounds : (torch.Tensor, torch.Tensor), optional
        Valid input range (see :func:`fedsec.data.datasets.pixel_bounds`).

    Returns
    -------
    float
        Fraction of examples still classified correctly, in ``[0, 1]``.

    Raises
    ------
    ValueError
        On an unknown ``attack``, an empty or mismatched data set,
        ``batch_size < 1`` or invalid attack parameters.
    """
    if attack not in ("pgd", "fgsm"):
        raise ValueError(f"attack must be 'pgd' or 'fgsm', got {attack!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(x.shape[0]) if x.dim() > 0 else 0
    if n == 0 or y.shape != (n,):
        raise ValueError(
            f"robust_accuracy needs N >= 1 inputs and labels [N], got {list(x.shape)} "
            f"and {list(y.shape)}"
        )
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    x, y = x.to(dev, dtype=dtype), y.to(dev, dtype=torch.long)
    if alpha is None:
        alpha = 2.5 * eps / steps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    with crafting_mode(model):
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            if attack == "fgsm":
                x_adv = fgsm(model, xb, yb, eps=eps, bounds=bounds)
            else:
                x_adv = pgd(
                    model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=gen, bounds=bounds
                )
            with torch.inference_mode():
                correct += (model(x_adv).argmax(dim=1) == yb).sum()
    return int(correct.item()) / n


# ---- adversarial training -----------------------------------------------------


def pgd_adversary(
    eps: Eps,
    alpha: Eps,
    steps: int,
    bounds: Bounds | None = None,
    seed: int = 0,
) -> Adversary:
    """A PGD hook for ``fedsec.training.train(adversarial=...)``.

    Adversarial training as in Madry et al. (ICLR 2018): every mini-batch is
    replaced by its PGD adversarial examples (random start) before the step.

    Parameters
    ----------
    eps, alpha : float or torch.Tensor
        Radius and step size in input units (see :func:`pixel_eps_to_input`).
    steps : int
        PGD iterations per batch, >= 1.
    bounds : (torch.Tensor, torch.Tensor), optional
        Valid input range.
    seed : int, default 0
        Seeds the hook's own generator for the random starts, advanced across
        batches, so a training run is reproducible.

    Returns
    -------
    callable
        ``hook(model, xb, yb) -> x_adv``.

    Raises
    ------
    ValueError
        If ``eps`` or ``alpha`` is negative or ``steps < 1``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for what, value in (("eps", eps), ("alpha", alpha)):
        if not bool(torch.all(torch.as_tensor(value) >= 0)):
            raise ValueError(f"{what} must be >= 0, got {value}")
    gen = torch.Generator().manual_seed(seed)

    def hook(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=gen, bounds=bounds)

    return hook
