"""DP-SGD on the user's own training loop: :func:`make_private`, in Opacus's shape.

:func:`fedsec.privacy.dpsgd.dp_train` owns the whole loop (in-memory tensors,
cross-entropy, its own optimizer). :func:`make_private` instead privatises the
three objects of an ordinary PyTorch loop, as Opacus's
``PrivacyEngine.make_private`` does (Yousefpour et al., "Opacus: User-Friendly
Differential Privacy Library in PyTorch", arXiv:2109.12298, 2021)::

    model, optimizer, loader = make_private(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    for x, y in loader:                # Poisson batches
        optimizer.zero_grad()
        loss = my_loss(model(x), y)    # any loss averaged (or summed) over the batch
        loss.backward()
        optimizer.step()               # clip per example, add noise, step
    eps = optimizer.accountant.epsilon(delta=1e-5)

The maths and the per-example machinery are those of ``dp_train`` (Abadi et
al., "Deep Learning with Differential Privacy", CCS 2016, Alg. 1):

* the loader samples each example independently with rate ``q = batch_size /
  N`` (:func:`~fedsec.privacy.dpsgd.poisson_sample`); an empty batch comes out
  as zero-length tensors and still takes a noise-only step; epoch ``e`` has
  ``round((e+1) N / B) - round(e N / B)`` batches, so ``E`` epochs take exactly
  the steps of ``dp_train(epochs=E)``;
* forward hooks on the layers that own trainable parameters keep their inputs
  and put a tensor hook on their outputs, so the user's ``loss.backward()``
  delivers the gradients with respect to the layer outputs; ``step()`` turns
  them into per-example gradient norms and clipped sums with ``dp_train``'s
  per-layer rules (factored ``Linear``, ``bmm`` ``Conv2d``, ``GroupNorm``,
  Opacus's samplers, ``vmap`` fallback), adds ``N(0, (sigma C)^2)`` and divides
  by the expected batch size ``B``;
* the accountant counts ``step()`` calls and asks
  :func:`~fedsec.privacy.accounting.epsilon_spent` with ``(sigma, q, steps)``,
  the history ``dp_train``'s ledger records.

``dp_train`` is a user of this module: it builds the same optimizer
(:func:`private_optimizer`) and replaces ``loss.backward()`` with
:meth:`DPOptimizer.backward_outputs`, which skips the ordinary parameter
gradients a user's ``backward()`` also computes and ``step()`` discards. The
model is not wrapped (no
``_module.`` prefix in its ``state_dict``), and
:meth:`DPOptimizer.detach` removes the hooks.

Each forward call of the model is one set of examples (rows of dim 0): two
forward calls before one ``step()`` (gradient accumulation) are clipped
separately and summed, Opacus's semantics; two backward passes through one
forward add up per example before clipping.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fedsec.privacy.accounting import (
    Accountant,
    HistoryEntry,
    check_accountant,
    epsilon_spent,
)
from fedsec.privacy.per_example import (
    _add_clipped_sums,
    _check_positive,
    _clip_factors,
    _Recorder,
    _StepGrads,
)
from fedsec.privacy.poisson import _fill_noise, poisson_batches
from fedsec.training import ForeachSGD

__all__ = [
    "DPOptimizer",
    "DPSGDAccountant",
    "PoissonBatchSampler",
    "make_private",
]


def _os_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


# ---- the accountant -------------------------------------------------------------


@dataclass
class DPSGDAccountant:
    """Steps taken by a :class:`DPOptimizer` and the epsilon they spend.

    Attributes
    ----------
    noise_multiplier : float
        Noise std divided by the clipping bound.
    sample_rate : float
        Poisson sampling rate ``q = batch_size / N``.
    accountant : {"rdp", "prv"}
        Opacus's accountant used by :meth:`epsilon`.
    steps : int
        Optimizer steps taken so far (noise-only steps on empty batches included).
    """

    noise_multiplier: float
    sample_rate: float
    accountant: Accountant = "rdp"
    steps: int = 0

    @property
    def history(self) -> list[HistoryEntry]:
        """``[(noise_multiplier, sample_rate, steps)]``, as Opacus and the ledger keep it."""
        return [(self.noise_multiplier, self.sample_rate, self.steps)]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``, exactly as for ``dp_train`` with these steps."""
        return epsilon_spent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=delta,
            accountant=self.accountant,
        )


# ---- Poisson batches ------------------------------------------------------------


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches in which each of ``N`` examples appears independently with rate ``q``.

    Epoch ``e`` (counted over ``__iter__`` calls) yields ``round((e+1) N / B) -
    round(e N / B)`` batches, ties rounded up, so that ``E`` epochs take as many
    steps as ``dp_train(epochs=E)``; batches may be empty.

    Parameters
    ----------
    num_samples : int
        ``N``, the size of the data set.
    batch_size : int
        Expected batch size ``B``, ``1 <= B <= N``; ``q = B / N``.
    generator : torch.Generator, optional
        CPU generator of the draws (ignored when ``secure``).
    secure : bool
        Draw from ``os.urandom`` instead.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        secure: bool = False,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.sample_rate = batch_size / num_samples
        self.generator = generator
        self.secure = secure
        self.epoch = 0

    def _start(self, epoch: int) -> int:
        # The same float expression as dp_train's epoch starts, so the counts agree.
        return math.floor(epoch * self.num_samples / self.batch_size + 0.5)

    def __len__(self) -> int:
        return self._start(self.epoch + 1) - self._start(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        count = len(self)
        self.epoch += 1
        # The epoch's batches in one draw, as dp_train takes them.
        batches = poisson_batches(
            count, self.num_samples, self.sample_rate, generator=self.generator, secure=self.secure
        )
        for idx in batches:
            yield idx.tolist()


def _empty_like(template: Any) -> Any:
    """``template`` (a collated batch of one) with every tensor cut to length 0."""
    if isinstance(template, torch.Tensor):
        return template[:0]
    if isinstance(template, Mapping):
        return type(template)({k: _empty_like(v) for k, v in template.items()})  # type: ignore[call-arg]
    if isinstance(template, tuple) and hasattr(template, "_fields"):  # namedtuple
        return type(template)(*(_empty_like(v) for v in template))
    if isinstance(template, list | tuple):
        return type(template)(_empty_like(v) for v in template)
    return template


class _EmptyBatchCollate:
    """The loader's collate function, plus zero-length tensors for an empty batch."""

    def __init__(self, collate: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate = collate
        self.dataset = dataset

    def __call__(self, batch: list[Any]) -> Any:
        if batch:
            return self.collate(batch)
        return _empty_like(self.collate([self.dataset[0]]))


def _poisson_loader(
    data_loader: DataLoader[Any], batch_size: int, generator: torch.Generator | None, secure: bool
) -> DataLoader[Any]:
    dataset = data_loader.dataset
    sampler = PoissonBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        generator=generator,
        secure=secure,
    )
    extra: dict[str, Any] = {}
    if data_loader.num_workers > 0:
        extra = {
            "prefetch_factor": data_loader.prefetch_factor,
            "persistent_workers": data_loader.persistent_workers,
        }
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=data_loader.num_workers,
        collate_fn=_EmptyBatchCollate(data_loader.collate_fn, dataset),
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        **extra,
    )


# ---- recording the user's forward and backward passes ---------------------------


@dataclass
class _Call:
    """One call of a parameter-owning layer whose output reached a backward pass."""

    layer: nn.Module
    inputs: list[torch.Tensor]
    versions: tuple[int, ...]
    forward_id: int
    grad: torch.Tensor | None = None


@dataclass
class _LoopRecorder:
    """Hooks on the user's model: layer inputs at forward, output gradients at backward."""

    module: nn.Module
    layers: _Recorder
    forward_id: int = 0
    enabled: bool = True
    arrived: list[_Call] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    #: Keep the layer outputs of pending forward passes instead of hooking their
    #: gradients, for :meth:`DPOptimizer.backward_outputs`.
    keep_outputs: bool = False
    outputs: list[tuple[_Call, torch.Tensor, int]] = field(default_factory=list)
    #: Per layer: the parameters' dtype (norms and sums run in it).
    dtypes: dict[nn.Module, torch.dtype] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for layer in self.layers.layers:
            self.dtypes[layer] = next(p.dtype for p in layer.parameters(recurse=False))

    def attach(self) -> None:
        self.handles = [self.module.register_forward_pre_hook(self._new_forward)]
        self.handles += [layer.register_forward_hook(self._hook) for layer in self.layers.layers]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.arrived = []
        self.outputs = []

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        self.forward_id += 1

    def _hook(self, layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.enabled or not torch.is_grad_enabled():
            return
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        inputs = [a.detach() for a in args if isinstance(a, torch.Tensor)]
        call = _Call(layer, inputs, tuple(a._version for a in inputs), self.forward_id)
        if self.keep_outputs:
            # backward_outputs asks autograd for these outputs' gradients directly.
            self.outputs.append((call, out, out._version))
            return

        # Registered before any in-place op on ``out``, the hook sees the gradient
        # with respect to the layer's own output. Nothing is kept for a forward
        # pass that never reaches backward(): the closure dies with its graph.
        def arrive(grad: torch.Tensor) -> None:
            if self.enabled:
                self.arrived.append(
                    _Call(call.layer, call.inputs, call.versions, call.forward_id, grad.detach())
                )

        out.register_hook(arrive)  # type: ignore[no-untyped-call]

    def take(self, loss_reduction: str) -> list[_StepGrads]:
        """Per-example gradient terms of every forward call since the last take."""
        arrived, self.arrived = self.arrived, []
        self.outputs = []
        by_forward: dict[int, list[_Call]] = {}
        for call in arrived:
            by_forward.setdefault(call.forward_id, []).append(call)
        return [self._terms(calls, loss_reduction) for calls in by_forward.values()]

    def _terms(self, calls: Sequence[_Call], loss_reduction: str) -> _StepGrads:
        batch = int(calls[0].grad.shape[0])  # type: ignore[union-attr]
        counts = Counter(c.layer for c in calls)
        terms = _StepGrads(factored=[], dense={}, batch=batch)
        self.enabled = False  # the vmap fallback runs layers again: do not record that
        try:
            for call in calls:
                layer, g = call.layer, call.grad
                assert g is not None
                if tuple(a._version for a in call.inputs) != call.versions:
                    raise ValueError(
                        f"an in-place operation modified the input of a "
                        f"{type(layer).__name__} layer after its forward pass; "
                        f"per-example gradients need it unchanged"
                    )
                if g.dim() == 0 or g.shape[0] != batch:
                    raise ValueError(
                        f"a {type(layer).__name__} layer's output has "
                        f"{g.shape[0] if g.dim() else 0} rows, not the batch's {batch}: "
                        f"per-example gradients need the batch in dimension 0"
                    )
                dtype = self.dtypes[layer]
                # A mean over the batch scales each example's gradient by 1/B (Opacus's
                # loss_reduction="mean"); per-example clipping needs them unscaled.
                if g.dtype != dtype:
                    g = g.to(dtype)
                if loss_reduction == "mean":
                    g = g * batch
                inputs = [
                    a.to(dtype) if a.is_floating_point() and a.dtype != dtype else a
                    for a in call.inputs
                ]
                if (
                    type(layer) is nn.Linear
                    and inputs[0].dim() == 2
                    and counts[layer] == 1
                    and layer not in self.layers.shared
                ):
                    assert isinstance(layer, nn.Linear)
                    terms.factored.append((layer, inputs[0], g))
                    continue
                for p, gs in self.layers.samplers[layer](layer, inputs, g).items():
                    if p.requires_grad:
                        terms.dense[p] = terms.dense[p] + gs if p in terms.dense else gs
        finally:
            self.enabled = True
        return terms


# ---- the optimizer ----------------------------------------------------------------


class DPOptimizer(torch.optim.Optimizer):
    """The user's optimizer, stepping on DP-SGD gradients (built by :func:`make_private`).

    ``step()`` replaces every parameter's ``.grad`` by ``(sum_i clip_C(g_i) +
    N(0, (sigma C)^2)) / B`` over the examples of the forward passes since the
    last step, then lets the wrapped optimizer step, and counts the step in
    :attr:`accountant`. ``param_groups``, ``state`` and ``defaults`` are the
    wrapped optimizer's, so learning-rate schedulers work on this object.

    Attributes
    ----------
    original_optimizer : torch.optim.Optimizer
        The optimizer passed to :func:`make_private`.
    accountant : DPSGDAccountant
        Steps taken and the epsilon they spend.
    noise_multiplier, max_grad_norm : float
        ``sigma`` and ``C``.
    expected_batch_size : int
        ``B = q N``, the divisor of the noisy sum.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        recorder: _LoopRecorder,
        params: list[nn.Parameter],
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str,
        noise_generator: torch.Generator | None,
        secure_mode: bool,
        accountant: DPSGDAccountant,
    ) -> None:
        # The wrapped optimizer's state is shared, not copied (Opacus does the same).
        self.original_optimizer = optimizer
        self._foreach = ForeachSGD(optimizer) if isinstance(optimizer, torch.optim.SGD) else None
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        self._recorder = recorder
        self._params = params
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self._noise_generator = noise_generator
        self._secure = secure_mode
        self.accountant = accountant
        #: CPU generator of the Poisson sampling (None in secure mode); set by the builder.
        self.sampling_generator: torch.Generator | None = None
        # One flat buffer whose slices are the parameters' gradients: noise is one draw.
        self._flat = torch.zeros(
            sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
        )
        self._grads: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for p in params:
            self._grads[p] = self._flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, "
            f"max_grad_norm={self.max_grad_norm}, "
            f"expected_batch_size={self.expected_batch_size}, "
            f"optimizer={self.original_optimizer!r})"
        )

    def privatise_gradients(self) -> None:
        """Write the DP-SGD gradient into every parameter's ``.grad`` (what ``step`` does first).

        Consumes the output gradients recorded since the last call.
        """
        std = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
        if std > 0:
            _fill_noise(self._flat, std, generator=self._noise_generator, secure=self._secure)
        else:
            self._flat.zero_()
        for terms in self._recorder.take(self.loss_reduction):
            # Folding 1/B into the clip factors matches dp_train's arithmetic.
            factors = _clip_factors(terms, self.max_grad_norm, self._flat)
            _add_clipped_sums(terms, factors.mul_(1.0 / self.expected_batch_size), self._grads)
        for p in self._params:
            p.grad = self._grads[p]

    def backward_outputs(self, loss: torch.Tensor) -> None:
        """The backward pass DP-SGD needs, in place of ``loss.backward()``.

        Computes the gradients of ``loss`` with respect to the outputs of the
        recorded layers only: the per-example terms ``step()`` uses. The
        parameter gradients of an ordinary backward pass, which ``step()``
        discards, are never computed (``dp_train`` saves that work this way).
        Needs an optimizer built with ``keep_outputs=True``.
        """
        if not self._recorder.keep_outputs:
            raise ValueError("backward_outputs needs a DPOptimizer built with keep_outputs=True")
        outputs, self._recorder.outputs = self._recorder.outputs, []
        for call, out, version in outputs:
            # The gradient of a modified output is not the layer's own output gradient.
            if out._version != version:
                raise ValueError(
                    f"an in-place operation modified the output of a {type(call.layer).__name__} "
                    f"layer; per-example gradients need out-of-place ops "
                    f"(e.g. nn.ReLU(inplace=False))"
                )
        if not outputs:  # no trainable layer ran: every gradient is zero
            return
        grads = torch.autograd.grad(loss, [out for _, out, _ in outputs], allow_unused=True)
        for (call, _, _), grad in zip(outputs, grads, strict=True):
            if grad is not None:  # None: the layer's output did not reach the loss
                call.grad = grad
                self._recorder.arrived.append(call)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Privatise the gradients, step the wrapped optimizer, count the step.

        ``closure``, if given, runs first (forward and backward, as for LBFGS-style
        optimizers) and its return value is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.privatise_gradients()
        # A plain SGD steps without torch's per-call machinery (checked every step: the
        # caller owns the optimizer and may add hooks to it).
        if self._foreach is not None and ForeachSGD.wraps(self.original_optimizer):
            self._foreach.step()
        else:
            self.original_optimizer.step()
        self.accountant.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and whatever the hooks recorded since the last step."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self._recorder.arrived = []
        self._recorder.outputs = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused: the privatised parameters are fixed by :func:`make_private`."""
        raise ValueError("cannot add a parameter group after make_private")

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict."""
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer."""
        self.original_optimizer.load_state_dict(state_dict)

    def detach(self) -> None:
        """Remove the hooks from the model; this optimizer must not step afterwards."""
        self._recorder.detach()
        self._recorder.module.__dict__.pop("_fedsec_private", None)


# ---- make_private -------------------------------------------------------------------


def _check_layers(module: nn.Module) -> None:
    """Refuse layers DP-SGD's per-example gradients cannot handle, naming the first."""
    from opacus.validators import ModuleValidator

    for name, layer in module.named_modules():
        where = f"layer {name!r}" if name else "the model"
        kind = type(layer).__name__
        # Any BatchNorm, trainable or not: in training mode it mixes the examples
        # of a batch, so no example's gradient is its own.
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{where} ({kind}) mixes the examples of a batch and cannot be used "
                f"with DP-SGD; replace it with nn.GroupNorm "
                f"(opacus.validators.ModuleValidator.fix does this)"
            )
        validator = ModuleValidator.VALIDATORS.get(type(layer))
        trainable = any(p.requires_grad for p in layer.parameters(recurse=False))
        if validator is not None and trainable:
            errors = validator(layer)
            if errors:
                first = str(errors[0]).split(". ")[0].rstrip(".")
                raise ValueError(f"{where} ({kind}) is not supported by DP-SGD: {first}")


def _layer_rules(module: nn.Module) -> _Recorder:
    """``dp_train``'s per-layer rules for ``module``, built with it in training mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        return _Recorder(module)
    finally:
        for m, mode in modes:
            m.training = mode


def private_optimizer(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    num_samples: int,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    loss_reduction: str = "mean",
    generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
    accountant: Accountant = "rdp",
    keep_outputs: bool = False,
) -> DPOptimizer:
    """The private optimizer of :func:`make_private`, for a loop that samples its own batches.

    The caller draws Poisson batches at rate ``batch_size / num_samples``
    (:func:`~fedsec.privacy.poisson.poisson_sample`, from
    :attr:`DPOptimizer.sampling_generator`); :func:`fedsec.privacy.dpsgd.dp_train`
    does so on in-memory tensors, with ``keep_outputs=True`` and
    :meth:`DPOptimizer.backward_outputs`. The numbers are checked by the callers.
    """
    _check_layers(module)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters")
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise ValueError("all trainable parameters must share one dtype and device")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): name for name, p in module.named_parameters()}
    if not in_optimizer <= names.keys():
        raise ValueError("the optimizer holds a parameter that is not the module's")
    missing = [names[id(p)] for p in params if id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"trainable parameter {missing[0]!r} is not in the optimizer; "
            f"add it or freeze it (requires_grad=False)"
        )

    layers = _layer_rules(module)
    device = params[0].device
    if not secure_mode and generator is None:
        generator = torch.Generator().manual_seed(_os_seed())
    if not secure_mode and noise_generator is None:
        if device.type == "cpu":
            noise_generator = generator
        else:
            assert generator is not None
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            noise_generator = torch.Generator(device=device).manual_seed(seed)
    recorder = _LoopRecorder(module, layers, keep_outputs=keep_outputs)
    recorder.attach()
    module.__dict__["_fedsec_private"] = True
    dp_optimizer = DPOptimizer(
        optimizer,
        recorder,
        params,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=batch_size,
        loss_reduction=loss_reduction,
        noise_generator=noise_generator,
        secure_mode=secure_mode,
        accountant=DPSGDAccountant(noise_multiplier, batch_size / num_samples, accountant),
    )
    dp_optimizer.sampling_generator = generator
    return dp_optimizer


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    loss_reduction: str = "mean",
    generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
    accountant: str = "rdp",
) -> tuple[nn.Module, DPOptimizer, DataLoader[Any]]:
    """Make a model, its optimizer and its data loader train with DP-SGD, Opacus-style.

    The user keeps their loss and their loop; see the module docstring.

    Parameters
    ----------
    module : torch.nn.Module
        The model. It is returned itself (not wrapped), with hooks attached.
        No BatchNorm; layers followed by in-place operations on their *inputs*
        are refused at ``step()``; the batch must be dimension 0 of every layer.
    optimizer : torch.optim.Optimizer
        Any optimizer over exactly the module's trainable parameters.
    data_loader : torch.utils.data.DataLoader
        A loader over a map-style data set of ``N`` examples with a
        ``batch_size`` ``B <= N``: the sampling rate is ``q = B / N`` and
        ``B`` the expected batch size. Its ``collate_fn``, workers and memory
        pinning are kept; its sampler is replaced.
    noise_multiplier : float
        ``sigma``, noise std over ``max_grad_norm``, finite and >= 0 (0: not private).
    max_grad_norm : float
        Per-example clipping bound ``C`` (all parameters together), finite and > 0.
    loss_reduction : {"mean", "sum"}
        How the user's loss reduces over the batch (Opacus's parameter).
    generator : torch.Generator, optional
        CPU generator of the Poisson sampling, and of the noise too when the
        parameters are on the CPU and ``noise_generator`` is not given (then
        the run is reproducible). Default: seeded from ``os.urandom``.
    noise_generator : torch.Generator, optional
        Generator of the noise, on the parameters' device. Default: as above,
        or seeded from ``os.urandom``.
    secure_mode : bool
        Sampling and noise from ``os.urandom`` (``dp_train``'s secure mode);
        excludes the generators.
    accountant : {"rdp", "prv"}
        Opacus's accountant for :meth:`DPSGDAccountant.epsilon`.

    Returns
    -------
    tuple of (torch.nn.Module, DPOptimizer, torch.utils.data.DataLoader)
        The same module, the private optimizer (its ``accountant`` attribute
        counts steps and gives epsilon) and a Poisson-sampling loader.

    Raises
    ------
    ValueError
        One line naming the problem: a bad parameter, an unsupported layer
        (BatchNorm: use GroupNorm), a model already made private, an optimizer
        whose parameters are not the module's trainable ones, or a loader
        without a usable ``batch_size`` or length.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(optimizer, DPOptimizer) or not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a plain torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not isinstance(data_loader, DataLoader):
        raise ValueError(
            f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}"
        )
    sigma = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    clip = _check_positive("max_grad_norm", max_grad_norm)
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    kind = check_accountant(accountant)
    if secure_mode and (generator is not None or noise_generator is not None):
        raise ValueError("secure_mode=True draws from os.urandom: pass no generator")
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
    ):
        raise ValueError("generator must be a CPU torch.Generator")
    if getattr(module, "_fedsec_private", False):
        raise ValueError("the module is already private (make_private was called on it)")

    try:
        n = len(data_loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("data_loader's data set must have a length (map-style)") from None
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise ValueError("data_loader must have a batch_size (not a custom batch_sampler)")
    if n < 1 or batch_size > n:
        raise ValueError(
            f"data_loader's batch_size ({batch_size}) must be <= its data set's size ({n})"
        )

    dp_optimizer = private_optimizer(
        module,
        optimizer,
        num_samples=n,
        batch_size=batch_size,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        loss_reduction=loss_reduction,
        generator=generator,
        noise_generator=noise_generator,
        secure_mode=secure_mode,
        accountant=kind,
    )
    generator = dp_optimizer.sampling_generator
    loader = _poisson_loader(
        data_loader, batch_size, None if secure_mode else generator, secure_mode
    )
    return module, dp_optimizer, loader
