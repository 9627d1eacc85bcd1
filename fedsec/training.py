"""Local training and evaluation on in-memory tensors.

Every simulated client calls :func:`train` once per round on a few hundred
examples, typically with two CPU cores, so the loop is kept lean: the dataset is
already a tensor, so mini-batches are index slices of a seeded permutation
rather than a :class:`torch.utils.data.DataLoader` (whose per-batch collation
dominates on data this small), and loss/accuracy are accumulated on the device
so that no batch forces a host synchronisation.

The global threading configuration and the global RNG are never touched: the
shuffle uses its own :class:`torch.Generator`, so results depend on ``seed``
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
import torch.optim.optimizer as _torch_optimizer
from torch import nn

from fedsec.registry import Registry

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "Adversary",
    "EvalResult",
    "ForeachSGD",
    "OptimizerFactory",
    "TrainResult",
    "autocast_dtype",
    "batch_cap_from_probes",
    "evaluate",
    "make_optimizer",
    "measure_batch_cap",
    "resolve_device",
    "train",
    "train_step_probe",
]


#: Crafts training inputs from ``(model, x_batch, y_batch)``; see ``train(adversarial=...)``.
Adversary = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- devices ----------------------------------------------------------------


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a config device string into a :class:`torch.device`.

    Parameters
    ----------
    spec : str
        ``"auto"`` picks CUDA if available, then Apple MPS, then CPU;
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` are taken literally.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For any other string, or when the requested accelerator is absent, e.g.
        ``device 'cuda' requested but CUDA is not available``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"device must be a string, got {spec!r}")
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device '{spec}'; valid choices: auto, cpu, cuda, cuda:N, mps")
    if device.type == "cpu":
        # "cpu:3" means nothing useful; normalise to plain cpu.
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{spec}' requested but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device '{spec}' requested but only {count} CUDA device(s) exist")
        return device
    if not _mps_available():
        raise ValueError(f"device '{spec}' requested but MPS is not available")
    return device


# ---- precision and memory ---------------------------------------------------

#: Config names of the compute precisions: full fp32, or autocast to bf16 / fp16.
PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32).

    Mixed precision (Micikevicius et al., "Mixed Precision Training", ICLR
    2018) runs matrix products and convolutions in 16 bits while weights,
    optimizer state and reductions stay in fp32. bf16 keeps fp32's exponent
    range and needs no loss scaling; fp16 does (:func:`train` uses a
    ``GradScaler``), and only CUDA runs it fast, so it is refused elsewhere.

    Raises
    ------
    ValueError
        For an unknown precision, fp16 off CUDA, or bf16 on a GPU without it
        (compute capability < 8.0, e.g. Jetson Xavier), in one line.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; valid choices: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device, not {device.type}; use 'bf16'")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"precision 'bf16' is not supported by {device}; use 'fp16'")
    return torch.bfloat16


def batch_cap_from_probes(
    probes: list[tuple[int, int]], available: int, *, fraction: float = 0.8
) -> int:
    """Largest batch whose peak memory fits ``fraction`` of ``available`` bytes.

    ``probes`` are ``(batch size, peak bytes)`` of one step at two or more
    batch sizes; the peak is modelled as ``fixed + batch * per_example``
    (least squares over the probes), which is how activation memory grows.

    Raises
    ------
    ValueError
        With fewer than two distinct probe sizes or no usable memory.
    """
    sizes = sorted({b for b, _ in probes})
    if len(sizes) < 2:
        raise ValueError(f"need probes at two batch sizes at least, got {sizes}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mean_b = sum(b for b, _ in probes) / len(probes)
    mean_m = sum(m for _, m in probes) / len(probes)
    cov = sum((b - mean_b) * (m - mean_m) for b, m in probes)
    var = sum((b - mean_b) ** 2 for b, _ in probes)
    # Memory never shrinks with the batch; a flat or noisy fit means "tiny per example".
    per_example = max(cov / var, 1.0)
    fixed = max(mean_m - per_example * mean_b, 0.0)
    budget = fraction * available - fixed
    if budget < per_example:
        raise ValueError(
            f"not enough device memory for one example: {available} bytes free, "
            f"{fixed:.0f} fixed + {per_example:.0f} per example"
        )
    return int(budget // per_example)


def measure_batch_cap(
    step: Callable[[int], None],
    device: torch.device,
    *,
    probe_sizes: tuple[int, int] = (4, 16),
    fraction: float = 0.8,
    reserve: int = 0,
) -> int | None:
    """The memory-aware cap on examples per pass for ``step`` on ``device``.

    ``step(b)`` runs one forward and backward pass on ``b`` examples. On CUDA,
    after one warm-up step, the memory the allocator reserves from the device
    for it is measured at two batch sizes and extrapolated
    (:func:`batch_cap_from_probes`) to the memory free now, less ``reserve``
    bytes still to be allocated (e.g. the local data set), within the share
    that ``torch.cuda.set_per_process_memory_fraction`` allows this process.
    Reserved bytes, because that is what runs out (fragmentation included),
    and allocated bytes, whose finer grain shows a small model's growth: the
    smaller of the two caps. Other devices report no cap (None), as they do not
    expose free memory reliably.
    """
    if device.type != "cuda":
        return None
    # The allocator's statistics need an explicit index ("cuda" alone is refused).
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    # One unmeasured step first: library workspaces (cuBLAS, cuDNN) allocated on
    # first use and kept would otherwise count against the first probe only.
    step(min(probe_sizes))
    reserved, allocated = [], []
    for size in probe_sizes:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base_reserved = torch.cuda.memory_reserved(device)
        base_allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(size)
        torch.cuda.synchronize(device)
        reserved.append((size, torch.cuda.max_memory_reserved(device) - base_reserved))
        allocated.append((size, torch.cuda.max_memory_allocated(device) - base_allocated))
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    available = free
    share = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    if share < 1.0:  # a process limited to part of a shared GPU
        available = min(available, int(share * total) - torch.cuda.memory_reserved(device))
    # Reserved memory grows in 2 MiB blocks, which can hide a small model's
    # per-example growth at probe sizes; the allocated bytes then tell it.
    return min(
        batch_cap_from_probes(probes, available - reserve, fraction=fraction)
        for probes in (reserved, allocated)
    )


def train_step_probe(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, precision: str = "fp32"
) -> Callable[[int], None]:
    """``step(b)``: one forward and backward pass of :func:`train` on ``b`` examples.

    For :func:`measure_batch_cap`; ``model``, ``x`` and ``y`` must be on the
    same device. The gradients it leaves are cleared; the weights are untouched.
    """
    half = autocast_dtype(precision, x.device)

    def step(b: int) -> None:
        with _autocast(x.device, half):
            loss = F.cross_entropy(model(x[:b]), y[:b])
        torch.autograd.backward(loss)
        model.zero_grad(set_to_none=True)

    return step


# ---- optimizers -------------------------------------------------------------


class OptimizerFactory(Protocol):
    """Builds an optimizer from parameters and the shared hyper-parameters."""

    def __call__(
        self,
        params: Iterable[nn.Parameter],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
    ) -> torch.optim.Optimizer: ...


OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(
    params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Plain SGD with optional heavy-ball momentum, the FedAvg default."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def _adam(
    params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba, 2015); ``momentum`` is ignored, Adam's betas stay default."""
    del momentum
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(
    params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019), decoupled decay; ignores ``momentum``."""
    del momentum
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build a registered optimizer.

    Parameters
    ----------
    name : str
        ``"sgd"``, ``"adam"`` or ``"adamw"``.
    params : iterable of torch.nn.Parameter
        Parameters to optimise.
    lr : float
        Learning rate, > 0.
    momentum : float
        SGD momentum in ``[0, 1)``; ignored by Adam/AdamW, which keep their
        default betas.
    weight_decay : float
        L2 penalty (decoupled for AdamW), >= 0.

    Returns
    -------
    torch.optim.Optimizer

    Raises
    ------
    fedsec.registry.UnknownNameError
        If ``name`` is not registered.
    ValueError
        If a hyper-parameter is out of range.
    """
    factory = OPTIMIZERS.get(name)
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return factory(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class ForeachSGD:
    """``torch.optim.SGD``'s step and ``zero_grad``, without their per-call machinery.

    A client's round is a few steps of a small model, where ``Optimizer.step``'s
    wrapper (profiler record, hooks, grad mode, regrouping the parameters)
    costs more than the update on the digits MLP (``simulations/bench_dpsgd.py``
    shows the plain loop's time). The update is torch's, term for term
    (weight decay added to a copy of the gradient, ``buf = momentum * buf +
    grad`` with the first buffer a copy of the gradient, ``p -= lr * buf``),
    applied with ``torch._foreach_*`` over the parameters that have a
    gradient, and the momentum buffers live in the optimizer's own state, so
    the results are bit-identical (tested) and the optimizer stays usable. :func:`train` and
    the DP-SGD optimizer (:class:`fedsec.privacy.dp_loop.DPOptimizer`) step
    through it whenever :meth:`wraps` says the optimizer is such an SGD.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params: list[torch.Tensor] = list(self.group["params"])

    @staticmethod
    def wraps(optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` is a plain SGD this step reproduces exactly."""
        if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
            return False
        group = optimizer.param_groups[0]
        return (
            not group["nesterov"]
            and not group["maximize"]
            and group["dampening"] == 0
            and not group["differentiable"]
            and not group["fused"]
            and not isinstance(group["lr"], torch.Tensor)
            and not optimizer._optimizer_step_pre_hooks
            and not optimizer._optimizer_step_post_hooks
            # torch.optim.Optimizer.register_step_pre_hook / _post_hook (global)
            and not getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
            and not getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
        )

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for p in self.params:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
        if not params:
            return
        lr, momentum, decay = self.group["lr"], self.group["momentum"], self.group["weight_decay"]
        if decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=decay))
        if momentum != 0:
            state = self.optimizer.state
            found = [state[p].get("momentum_buffer") for p in params]
            bufs = [b for b in found if b is not None]
            if len(bufs) < len(params):  # first step: each buffer is a copy of its gradient
                bufs = []
                for p, g, buf in zip(params, grads, found, strict=True):
                    if buf is None:
                        buf = state[p]["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf.mul_(momentum).add_(g)
                    bufs.append(buf)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)


# ---- results ----------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over all examples of the last epoch, each measured
        on the batch's forward pass just before its optimizer step.
    accuracy : float
        Fraction of examples of the last epoch classified correctly on that
        same forward pass.
    num_examples : int
        Size of the local training set (the FedAvg weight).
    steps : int
        Optimizer steps taken over all epochs.
    """

    loss: float
    accuracy: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over the dataset.
    accuracy : float
        Fraction classified correctly (arg-max of the logits).
    num_examples : int
        Size of the evaluated dataset.
    """

    loss: float
    accuracy: float
    num_examples: int


# ---- loops ------------------------------------------------------------------


def _check_data(x: torch.Tensor, y: torch.Tensor, what: str) -> int:
    n = int(x.shape[0]) if x.dim() > 0 else 0
    if n == 0:
        raise ValueError(f"cannot {what} on an empty dataset")
    if y.dim() != 1 or int(y.shape[0]) != n:
        raise ValueError(f"cannot {what}: labels must have shape [{n}], got {list(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"cannot {what}: labels must be integer, got {y.dtype}")
    return n


def _to_device(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    dev = resolve_device(device) if isinstance(device, str) else device
    model.to(dev)
    # Match the model's dtype so float64 NumPy-born inputs just work.
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    return x.to(dev, dtype=dtype), y.to(dev, dtype=torch.long), dev


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device``; a no-op context for plain fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    adversarial: Adversary | None = None,
    max_steps: int | None = None,
    precision: str = "fp32",
    max_batch: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy on shuffled mini-batches.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits ``[B, num_classes]``; moved to ``device``
        and left there, in training mode.
    x : torch.Tensor
        Inputs, ``[N, C, H, W]`` (any shape the model accepts), floating point.
    y : torch.Tensor
        Integer class labels, ``[N]``.
    epochs : int
        Passes over the data, >= 1.
    batch_size : int
        Examples per step, >= 1; the last batch of an epoch may be smaller.
    optimizer : str
        Registered optimizer name (see :data:`OPTIMIZERS`); a fresh optimizer
        is built per call, as each FL round starts from the global model.
    lr, momentum, weight_decay : float
        Passed to :func:`make_optimizer`.
    device : torch.device or str
        Where to train; strings go through :func:`resolve_device`.
    seed : int
        Seeds a private generator for the shuffling order, so the same seed,
        data and initial weights give the same result (on CPU bit-for-bit).
    adversarial : callable, optional
        Adversarial training (Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards
        Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018):
        each batch's inputs are replaced by ``adversarial(model, xb, yb)``
        before the step, e.g. :func:`fedsec.attacks.evasion.pgd_adversary`.
        The hook sees the model as it is at that step; the model is put back in
        training mode afterwards and the crafted inputs are detached. The
        reported loss and accuracy are then those on the crafted batches.
        ``None`` (the default) trains on the clean inputs, with no overhead.
    max_steps : int, optional
        Stop after this many optimizer steps, even inside an epoch (FedSGD-style
        rounds of one or a few local steps); the loss and accuracy then cover
        the examples seen in the last, possibly partial, epoch.
    precision : str
        ``"fp32"`` (default), or ``"bf16"`` / ``"fp16"`` autocast (see
        :func:`autocast_dtype`); fp16 scales the loss with a ``GradScaler``,
        which skips a step whose gradients overflow.
    max_batch : int, optional
        At most this many examples per forward/backward pass: a batch larger
        than that is split into chunks whose gradients add up to the batch's
        (gradient accumulation), so the step is the same with less memory.
        Models with BatchNorm then normalise each chunk on its own statistics.

    Returns
    -------
    TrainResult
        Python numbers summarising the last epoch.

    Raises
    ------
    ValueError
        On an empty dataset, mismatched labels, ``epochs < 1`` or
        ``batch_size < 1``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    n = _check_data(x, y, "train")
    x, y, dev = _to_device(model, x, y, device)
    half = autocast_dtype(precision, dev)
    scaler = torch.amp.GradScaler("cuda") if half == torch.float16 else None
    chunk = batch_size if max_batch is None else min(batch_size, max_batch)
    opt = make_optimizer(
        optimizer,
        model.parameters(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    fast = ForeachSGD(opt) if scaler is None and ForeachSGD.wraps(opt) else None
    # A CPU generator works for every device; only the permutation moves.
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps = 0
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    seen = 0
    for _ in range(epochs):
        if max_steps is not None and steps >= max_steps:
            break
        # Per-epoch totals: only the last epoch is reported.
        loss_sum.zero_()
        correct.zero_()
        seen = 0
        perm = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            if adversarial is not None:
                xb = adversarial(model, xb, yb).detach()
                # The hook may craft in eval mode (dropout, normalisation); the
                # step itself must run in training mode.
                model.train()
            if fast is None:
                opt.zero_grad(set_to_none=True)
            else:
                fast.zero_grad()
            size = int(yb.shape[0])
            for first in range(0, size, chunk):
                xc, yc = xb[first : first + chunk], yb[first : first + chunk]
                with _autocast(dev, half):
                    logits = model(xc)
                    loss = F.cross_entropy(logits, yc)
                if xc.shape[0] < size:  # chunk means, weighted into the batch mean
                    loss = loss * (xc.shape[0] / size)
                # Same as loss.backward(), but typed (Tensor.backward is not).
                torch.autograd.backward(loss if scaler is None else scaler.scale(loss))
                with torch.no_grad():
                    loss_sum += loss.detach().float() * size
                    correct += (logits.argmax(dim=1) == yc).sum()
            if fast is not None:
                fast.step()
            elif scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            steps += 1
            seen += size
    return TrainResult(
        loss=float(loss_sum.item()) / seen,
        accuracy=int(correct.item()) / seen,
        num_examples=n,
        steps=steps,
    )


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits; moved to ``device`` and put in eval mode.
    x : torch.Tensor
        Inputs, ``[N, ...]``.
    y : torch.Tensor
        Integer class labels, ``[N]``.
    batch_size : int
        Examples per forward pass (memory only; results do not depend on it).
    device : torch.device or str
        Where to evaluate; strings go through :func:`resolve_device`.
    precision : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the forward passes.

    Returns
    -------
    EvalResult

    Raises
    ------
    ValueError
        On an empty dataset, mismatched labels or ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = _check_data(x, y, "evaluate")
    x, y, dev = _to_device(model, x, y, device)
    half = autocast_dtype(precision, dev)
    model.eval()
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    with torch.inference_mode(), _autocast(dev, half):
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").float()
            correct += (logits.argmax(dim=1) == yb).sum()
    return EvalResult(
        loss=float(loss_sum.item()) / n,
        accuracy=int(correct.item()) / n,
        num_examples=n,
    )
