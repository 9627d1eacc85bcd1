"""One DP-SGD step's per-example work: record, differentiate, clip, sum.

DP-SGD (Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep
Learning with Differential Privacy", CCS 2016, Alg. 1) clips each example's
gradient to L2 norm ``C`` over all parameters together, as Opacus does
(Yousefpour et al., arXiv:2109.12298, 2021). Here forward hooks
(:class:`_Recorder`) record the inputs and outputs of the layers that own
trainable parameters, one ``torch.autograd.grad`` call returns the gradients
with respect to the layer *outputs* only (:func:`_step_grads`), and the
per-example terms are kept factored for ``Linear`` layers on ``[B, in]``
inputs, whose per-example norms are ``||g_i|| ||a_i||`` (the "ghost norm" of
Li, Tramèr, Liang, Hashimoto, "Large Language Models Can Be Strong
Differentially Private Learners", ICLR 2022) and whose clipped sum is one
matrix product (:func:`_clip_factors`, :func:`_add_clipped_sums`). Other
layers use the rules of :mod:`fedsec.privacy.grad_sample`.

:func:`per_sample_gradients` and :func:`clipped_gradient_sum` expose this
computation for tests against Opacus's ``GradSampleModule`` and
``DPOptimizer``; :func:`dp_step_probe` for sizing batches to memory.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn

from fedsec.checks import check_number
from fedsec.privacy.grad_sample import GradSampler, PerSampleGrads, sampler_for
from fedsec.training import _autocast, _check_data, autocast_dtype

__all__ = ["clipped_gradient_sum", "dp_step_probe", "per_sample_gradients"]

#: Added to per-example norms before dividing, exactly as Opacus's DPOptimizer does.
_NORM_EPS = 1e-6


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
            self.samplers[layer] = sampler_for(layer, GradSampleModule.GRAD_SAMPLERS)
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
        # ||g_i a_i^T||^2 + ||g_i||^2 = ||g_i||^2 (||a_i||^2 + 1): one fused update per layer.
        g_sq = torch.linalg.vecdot(g, g)
        weight = layer.weight.requires_grad
        bias = layer.bias is not None and layer.bias.requires_grad
        if weight and bias:
            sq.addcmul_(g_sq, torch.linalg.vecdot(act, act).add_(1.0))
        elif weight:
            sq.addcmul_(g_sq, torch.linalg.vecdot(act, act))
        elif bias:
            sq += g_sq
    for gs in terms.dense.values():
        flat = gs.reshape(terms.batch, -1)
        sq += torch.linalg.vecdot(flat, flat)
    # min(1, C / (||g_i|| + eps)), in place on the fresh buffer.
    return sq.sqrt_().add_(_NORM_EPS).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)


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
    return check_number(name, value, minimum=0.0, strict=not allow_zero)


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
