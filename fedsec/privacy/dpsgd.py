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

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsec.privacy.client_level import secure_standard_normal
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

#: Added to per-example norms before dividing, exactly as Opacus's DPOptimizer does.
_NORM_EPS = 1e-6

#: ``{parameter: per-example gradients [B, *parameter.shape]}``.
PerSampleGrads = dict[torch.Tensor, torch.Tensor]

#: ``sampler(layer, layer_inputs, grad_wrt_layer_output) -> PerSampleGrads``, the
#: signature of Opacus's grad samplers.
GradSampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], PerSampleGrads]


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


# ---- per-example gradients of single layers ----------------------------------


def _linear_grad_sample(
    layer: nn.Module, inputs: list[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    """Per-example gradients of ``nn.Linear`` (any number of middle dimensions)."""
    assert isinstance(layer, nn.Linear)
    act = inputs[0].to(backprops.dtype)
    out: PerSampleGrads = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("n...i,n...j->nij", backprops, act)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1]).sum(1)
    return out


def _conv2d_padding(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts ``(left, right, top, bottom)`` equivalent to the layer's padding."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0, 0, 0, 0)
        # "same" (stride 1): PyTorch puts the odd pixel on the right/bottom.
        total_h = layer.dilation[0] * (layer.kernel_size[0] - 1)
        total_w = layer.dilation[1] * (layer.kernel_size[1] - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    pad_h, pad_w = int(layer.padding[0]), int(layer.padding[1])
    return (pad_w, pad_w, pad_h, pad_h)


def _conv2d_grad_sample(
    layer: nn.Module, inputs: list[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    """Per-example gradients of an ungrouped, zero-padded ``nn.Conv2d``.

    The im2col patches are strided views of the padded input, copied once into
    ``[B, C*kh*kw, Ho*Wo]``; the per-example weight gradient is then one batched
    matrix product with the output gradients ``[B, O, Ho*Wo]``.
    """
    assert isinstance(layer, nn.Conv2d)
    act = inputs[0].to(backprops.dtype)
    n, channels = act.shape[0], act.shape[1]
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    pad = _conv2d_padding(layer)
    if any(pad):
        act = F.pad(act, pad)
    patches = act.unfold(2, dh * (kh - 1) + 1, layer.stride[0]).unfold(
        3, dw * (kw - 1) + 1, layer.stride[1]
    )  # [B, C, Ho, Wo, span_h, span_w]
    if dh > 1 or dw > 1:
        patches = patches[..., ::dh, ::dw]
    locations = patches.shape[2] * patches.shape[3]
    cols = patches.permute(0, 1, 4, 5, 2, 3).reshape(n, channels * kh * kw, locations)
    grads_out = backprops.reshape(n, -1, locations)
    out: PerSampleGrads = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.bmm(grads_out, cols.transpose(1, 2)).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grads_out.sum(2)
    return out


def _group_norm_grad_sample(
    layer: nn.Module, inputs: list[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    """Per-example gradients of an affine ``nn.GroupNorm``."""
    assert isinstance(layer, nn.GroupNorm)
    act = inputs[0].to(backprops.dtype)
    n, channels = act.shape[0], act.shape[1]
    out: PerSampleGrads = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = F.group_norm(act, layer.num_groups, eps=layer.eps)
        out[layer.weight] = (normalised * backprops).reshape(n, channels, -1).sum(2)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(n, channels, -1).sum(2)
    return out


def _functorch_grad_sample(
    layer: nn.Module, inputs: list[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    """Per-example gradients of any layer: ``vmap(grad(...))`` over its own forward.

    The per-example "loss" is ``<layer(a_i), g_i>``, whose gradient with respect
    to the layer's parameters is the layer's share of example ``i``'s gradient
    (Opacus's ``functorch`` grad sampler does the same).
    """
    names = [name for name, p in layer.named_parameters(recurse=False) if p.requires_grad]
    params = {name: getattr(layer, name).detach() for name in names}

    def contribution(
        p: dict[str, torch.Tensor], acts: tuple[torch.Tensor, ...], g: torch.Tensor
    ) -> torch.Tensor:
        output = functional_call(layer, p, tuple(a.unsqueeze(0) for a in acts))
        if isinstance(output, tuple):
            output = output[0]
        share: torch.Tensor = (output * g.unsqueeze(0)).sum()
        return share

    grads: dict[str, torch.Tensor] = vmap(grad(contribution), in_dims=(None, 0, 0))(
        params, tuple(inputs), backprops
    )
    return {getattr(layer, name): grads[name] for name in names}


def _sampler_for(layer: nn.Module, opacus_samplers: Mapping[type, Any]) -> GradSampler:
    """Pick the per-example gradient rule of one parameter-owning layer."""
    kind = type(layer)
    if kind is nn.Linear:
        return _linear_grad_sample
    if kind is nn.GroupNorm:
        return _group_norm_grad_sample
    if kind is nn.Conv2d and layer.padding_mode == "zeros":
        assert isinstance(layer, nn.Conv2d)
        if layer.groups == 1:
            return _conv2d_grad_sample
        sampler: GradSampler = opacus_samplers[nn.Conv2d]
        return sampler
    # Opacus's convolution samplers assume zero padding; reflect/replicate/
    # circular padding is exact only through functorch.
    if kind in opacus_samplers and getattr(layer, "padding_mode", "zeros") == "zeros":
        sampler = opacus_samplers[kind]
        return sampler
    return _functorch_grad_sample


# ---- recording layer inputs and outputs --------------------------------------


@dataclass
class _Record:
    """One call of a parameter-owning layer during the forward pass."""

    layer: nn.Module
    inputs: list[torch.Tensor]
    output: torch.Tensor
    versions: tuple[int, ...]


class _Recorder:
    """Forward hooks that record the inputs and outputs of parameter-owning layers.

    Building one validates the model, which must pass Opacus's
    ``ModuleValidator`` (no BatchNorm, which mixes the examples of a batch),
    and picks the per-example gradient rule of every layer that directly owns
    a trainable parameter.
    """

    def __init__(self, model: nn.Module) -> None:
        # Importing opacus takes seconds; do it only when DP-SGD is used.
        from opacus.grad_sample import GradSampleModule
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            first = str(errors[0]).split(". ")[0].rstrip(".")
            raise ValueError(f"model is not compatible with DP-SGD: {first}")
        self.layers: list[nn.Module] = []
        self.samplers: dict[nn.Module, GradSampler] = {}
        owners: Counter[nn.Parameter] = Counter()
        for layer in model.modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            self.layers.append(layer)
            self.samplers[layer] = _sampler_for(layer, GradSampleModule.GRAD_SAMPLERS)
            owners.update(own)
        #: Layers holding a parameter that another layer also holds (tied weights).
        self.shared = {
            layer
            for layer in self.layers
            if any(owners[p] > 1 for p in layer.parameters(recurse=False) if p.requires_grad)
        }
        self.records: list[_Record] = []
        self.capturing = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self.capturing:
            return
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        inputs = [a.detach() for a in args if isinstance(a, torch.Tensor)]
        versions = (out._version, *(a._version for a in inputs))
        self.records.append(_Record(layer, inputs, out, versions))

    @contextmanager
    def attached(self) -> Iterator[_Recorder]:
        """Register the hooks for the duration of the ``with`` block."""
        self._handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.records = []
            self.capturing = False

    def forward(self, model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        """Run the model on a batch, recording its parameter-owning layers."""
        self.records = []
        self.capturing = True
        try:
            logits: torch.Tensor = model(xb)
        finally:
            self.capturing = False
        for rec in self.records:
            now = (rec.output._version, *(a._version for a in rec.inputs))
            if now != rec.versions:
                raise ValueError(
                    f"an in-place operation modified the input or output of a "
                    f"{type(rec.layer).__name__} layer; per-example gradients need "
                    f"out-of-place ops (e.g. nn.ReLU(inplace=False))"
                )
        return logits


# ---- one DP-SGD step -----------------------------------------------------------


@dataclass
class _StepGrads:
    """Per-example gradient terms of one batch, before clipping."""

    #: Linear layers on 2-D inputs, kept factored: ``(layer, inputs A, output grads G)``.
    factored: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]
    #: Everything else, materialised per example and summed over a layer's calls.
    dense: PerSampleGrads
    batch: int


def _step_grads(
    model: nn.Module,
    recorder: _Recorder,
    xb: torch.Tensor,
    yb: torch.Tensor,
    *,
    materialize: bool,
    half: torch.dtype | None = None,
) -> tuple[_StepGrads, torch.Tensor, torch.Tensor]:
    """Forward, one backward to the layer outputs, and per-example gradient terms.

    Returns the terms, the logits and the summed (per-example) cross-entropy.
    ``half`` runs the forward pass under autocast to that dtype.
    """
    with _autocast(xb.device, half):
        logits = recorder.forward(model, xb)
        loss = F.cross_entropy(logits, yb, reduction="sum")
    records = recorder.records
    backprops: tuple[torch.Tensor | None, ...] = ()
    if records:  # no trainable layer ran: every gradient is zero
        backprops = torch.autograd.grad(loss, [r.output for r in records], allow_unused=True)
    calls = Counter(r.layer for r in records)
    terms = _StepGrads(factored=[], dense={}, batch=int(xb.shape[0]))
    for rec, g in zip(records, backprops, strict=True):
        if g is None:  # the layer's output did not reach the loss
            continue
        layer = rec.layer
        if half is not None:
            # Under autocast the recorded activations and output gradients are
            # 16-bit; norms, clipping and sums run in the parameters' precision.
            dtype = next(p.dtype for p in layer.parameters(recurse=False))
            g = g.to(dtype)
            rec = dataclasses.replace(
                rec, inputs=[a.to(dtype) if a.is_floating_point() else a for a in rec.inputs]
            )
        if (
            not materialize
            and type(layer) is nn.Linear
            and rec.inputs[0].dim() == 2
            and calls[layer] == 1
            and layer not in recorder.shared
        ):
            assert isinstance(layer, nn.Linear)
            terms.factored.append((layer, rec.inputs[0].to(g.dtype), g))
            continue
        for p, gs in recorder.samplers[layer](layer, rec.inputs, g).items():
            if p.requires_grad:
                terms.dense[p] = terms.dense[p] + gs if p in terms.dense else gs
    return terms, logits, loss.detach()


def _clip_factors(terms: _StepGrads, max_grad_norm: float, like: torch.Tensor) -> torch.Tensor:
    """``min(1, C / (||g_i|| + 1e-6))`` per example, norms over all parameters."""
    sq = torch.zeros(terms.batch, dtype=like.dtype, device=like.device)
    for layer, act, g in terms.factored:
        g_sq = g.square().sum(1)
        if layer.weight.requires_grad:
            sq += g_sq * act.square().sum(1)
        if layer.bias is not None and layer.bias.requires_grad:
            sq += g_sq
    for gs in terms.dense.values():
        sq += torch.linalg.vector_norm(gs.reshape(terms.batch, -1), dim=1).square()
    return (max_grad_norm / (sq.sqrt() + _NORM_EPS)).clamp(max=1.0)


def _add_clipped_sums(
    terms: _StepGrads, factors: torch.Tensor, out: Mapping[torch.Tensor, torch.Tensor]
) -> None:
    """Add ``sum_i factors_i * g_i`` to ``out[p]`` in place, for every parameter ``p``.

    ``out`` maps each trainable parameter to a contiguous tensor of its shape;
    the products are fused into it (``addmm_``/``addmv_``), so the clipped sum
    costs about what the parameter gradient of a plain backward pass costs.
    """
    for layer, act, g in terms.factored:
        if layer.weight.requires_grad:
            out[layer.weight].addmm_((g * factors.unsqueeze(1)).t(), act)
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias].addmv_(g.t(), factors)
    for p, gs in terms.dense.items():
        out[p].view(-1).addmv_(gs.reshape(terms.batch, -1).t(), factors)


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


def per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example gradients of the cross-entropy, optionally clipped as in DP-SGD.

    Uses the same per-layer rules as :func:`dp_train`, but materialises every
    gradient (``dp_train`` never materialises those of ``Linear`` layers); meant
    for inspection and tests.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits, already on the device of ``x``; its mode
        (train/eval) is left as it is.
    x : torch.Tensor
        A batch of inputs ``[B, ...]``.
    y : torch.Tensor
        Integer labels ``[B]``.
    max_grad_norm : float, optional
        If given, each example's gradient (all trainable parameters together)
        is scaled by ``min(1, max_grad_norm / (norm + 1e-6))``, Opacus's flat
        clipping (Abadi et al. 2016, Alg. 1).

    Returns
    -------
    dict of str to torch.Tensor
        ``{parameter name: [B, *parameter.shape]}`` for every trainable
        parameter, in ``model.named_parameters()`` order; zeros for
        parameters that did not take part in the forward pass.

    Raises
    ------
    ValueError
        On an empty batch, mismatched labels, ``max_grad_norm <= 0`` or a model
        that DP-SGD cannot handle (see :func:`dp_train`).
    """
    if max_grad_norm is not None:
        max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
    _check_data(x, y, "compute per-sample gradients")
    recorder = _Recorder(model)
    with recorder.attached():
        terms, _, _ = _step_grads(model, recorder, x, y, materialize=True)
    out: dict[str, torch.Tensor] = {}
    factors = None
    if max_grad_norm is not None:
        factors = _clip_factors(terms, max_grad_norm, _named_trainable(model)[0][1])
    for name, p in _named_trainable(model):
        gs = terms.dense.get(p)
        if gs is None:
            gs = torch.zeros((terms.batch, *p.shape), dtype=p.dtype, device=p.device)
        if factors is not None:
            gs = gs * factors.view(-1, *([1] * p.dim()))
        out[name] = gs
    return out


def clipped_gradient_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_grad_norm: float,
) -> dict[str, torch.Tensor]:
    """Sum over the batch of the clipped per-example gradients, as one DP-SGD step computes it.

    This is exactly the computation of :func:`dp_train` before noise is added
    (Abadi et al. 2016, Alg. 1; Opacus's ``DPOptimizer.clip_and_accumulate``,
    whose ``summed_grad`` it equals up to float rounding).

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits, already on the device of ``x``.
    x : torch.Tensor
        A batch of inputs ``[B, ...]``.
    y : torch.Tensor
        Integer labels ``[B]``.
    max_grad_norm : float
        Clipping bound ``C`` > 0.

    Returns
    -------
    dict of str to torch.Tensor
        ``{parameter name: tensor shaped like the parameter}`` for every
        trainable parameter.

    Raises
    ------
    ValueError
        As :func:`per_sample_gradients`.
    """
    max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
    _check_data(x, y, "compute clipped gradients")
    recorder = _Recorder(model)
    with recorder.attached():
        terms, _, _ = _step_grads(model, recorder, x, y, materialize=False)
    named = _named_trainable(model)
    sums: dict[torch.Tensor, torch.Tensor] = {p: torch.zeros_like(p) for _, p in named}
    _add_clipped_sums(terms, _clip_factors(terms, max_grad_norm, named[0][1]), sums)
    return {name: sums[p] for name, p in named}


def dp_step_probe(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, precision: str = "fp32"
) -> Callable[[int], None]:
    """``step(b)``: the per-example gradient work of one :func:`dp_train` pass on ``b`` examples.

    For :func:`fedsec.training.measure_batch_cap`; ``model``, ``x`` and ``y``
    must be on the same device. Nothing of the model changes.
    """
    half = autocast_dtype(precision, x.device)
    recorder = _Recorder(model)
    named = _named_trainable(model)
    sums: dict[torch.Tensor, torch.Tensor] = {p: torch.zeros_like(p) for _, p in named}

    def step(b: int) -> None:
        with recorder.attached():
            terms, _, _ = _step_grads(model, recorder, x[:b], y[:b], materialize=False, half=half)
            _add_clipped_sums(terms, _clip_factors(terms, 1.0, named[0][1]), sums)

    return step


# ---- sampling and noise --------------------------------------------------------


def poisson_sample(
    n: int,
    sample_rate: float,
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each of ``n`` examples kept with prob. ``q``.

    The sampling that the privacy amplification of DP-SGD assumes (Abadi et
    al. 2016; Opacus's ``UniformWithReplacementSampler``); batch sizes are
    ``Binomial(n, q)`` and may be 0.

    Parameters
    ----------
    n : int
        Number of examples, >= 1.
    sample_rate : float
        Inclusion probability ``q`` in ``(0, 1]``.
    generator : torch.Generator, optional
        CPU generator for the uniforms (ignored when ``secure``).
    secure : bool
        Draw the uniforms from ``os.urandom`` (53-bit, exact comparison
        ``k < q * 2^53``) instead of a pseudo-random generator.

    Returns
    -------
    torch.Tensor
        Sorted ``int64`` indices on the CPU.

    Raises
    ------
    ValueError
        If ``n < 1`` or ``sample_rate`` is not in ``(0, 1]``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    q = _check_positive("sample_rate", sample_rate)
    if q > 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if secure:
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        keep = words < np.uint64(math.ceil(q * 2.0**53))
        return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))
    mask = torch.rand(n, generator=generator) < q
    return mask.nonzero().view(-1)


def _fill_noise(
    out: torch.Tensor, std: float, *, generator: torch.Generator | None, secure: bool
) -> None:
    """Overwrite ``out`` with independent ``N(0, std^2)`` draws."""
    if secure:
        # Opacus's secure_mode recipe: (z1 + z2 + z3 + z4) / 2 ~ N(0, 1).
        count = out.numel()
        z = secure_standard_normal(4 * count).view(4, count).sum(0).mul_(0.5 * std)
        out.copy_(z.view_as(out))
    else:
        out.normal_(0.0, std, generator=generator)


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
    recorder = _Recorder(model)
    x, y, dev = _to_device(model, x, y, device)
    half = autocast_dtype(precision, dev)
    chunk = batch_size if max_batch is None else max_batch
    opt = make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    q = batch_size / n
    # Epoch e starts at step round(e / q); ties round up, not to even.
    starts = [math.floor(e * n / batch_size + 0.5) for e in range(epochs + 1)]
    total = starts[-1] if max_steps is None else min(starts[-1], max_steps)
    epoch_starts = set(starts[:-1])
    gen = None if secure_mode else torch.Generator().manual_seed(seed)
    noise_gen = gen
    if not secure_mode and dev.type != "cpu":
        noise_gen = torch.Generator(device=dev).manual_seed(seed)
    # Opacus computes (sum_i c_i g_i + N(0, (sigma C)^2)) / batch_size; folding
    # the division into the clip factors and the noise std lets each step write
    # noise and clipped sum straight into one flat gradient buffer whose views
    # are the parameters' .grad.
    std = sigma * clip / batch_size
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=dev)
    grads: dict[torch.Tensor, torch.Tensor] = {}
    offset = 0
    for p in params:
        grads[p] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = grads[p]

    model.train()
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    seen = 0
    try:
        with recorder.attached():
            for step in range(total):
                if step in epoch_starts:  # only the last epoch is reported
                    loss_sum.zero_()
                    correct.zero_()
                    seen = 0
                idx = poisson_sample(n, q, generator=gen, secure=secure_mode)
                if std > 0:
                    _fill_noise(flat, std, generator=noise_gen, secure=secure_mode)
                else:
                    flat.zero_()
                idx = idx.to(dev)
                # An empty batch takes a noise-only step; a large one goes in chunks.
                for first in range(0, idx.numel(), chunk):
                    part = idx[first : first + chunk]
                    xb, yb = x[part], y[part]
                    terms, logits, batch_loss = _step_grads(
                        model, recorder, xb, yb, materialize=False, half=half
                    )
                    factors = _clip_factors(terms, clip, flat).mul_(1.0 / batch_size)
                    _add_clipped_sums(terms, factors, grads)
                    seen += terms.batch
                    loss_sum += batch_loss.float()
                    correct += (logits.detach().argmax(dim=1) == yb).sum()
                    # Free this chunk's activations and per-example terms before the
                    # next forward pass, or the peak is two chunks' worth.
                    del terms, logits, factors
                opt.step()
    finally:
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
