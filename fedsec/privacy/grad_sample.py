"""Per-example gradients of single layers, for DP-SGD.

Each rule has the signature of Opacus's grad samplers (Yousefpour et al.,
"Opacus: User-Friendly Differential Privacy Library in PyTorch",
arXiv:2109.12298, 2021): from a layer's recorded inputs and the gradient of
the loss with respect to its output, it returns the per-example gradients of
the layer's own parameters. ``Linear`` follows Goodfellow ("Efficient
Per-Example Gradient Computations", arXiv:1510.01799, 2015); ``Conv2d`` uses
one ``bmm`` on im2col patches cut out by strided views; ``GroupNorm`` uses the
normalised input; every other layer takes Opacus's own sampler where it has
one, else ``torch.func.vmap(grad(...))`` on that layer alone, as Opacus's
hooks mode does. :func:`sampler_for` picks the rule of a layer. Used by
DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016)
in :mod:`fedsec.privacy.per_example`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional alias
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = ["GradSampler", "PerSampleGrads", "sampler_for"]

#: ``{parameter: per-example gradients [B, *parameter.shape]}``.
PerSampleGrads = dict[torch.Tensor, torch.Tensor]

#: ``sampler(layer, layer_inputs, grad_wrt_layer_output) -> PerSampleGrads``, the
#: signature of Opacus's grad samplers.
GradSampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], PerSampleGrads]


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


def sampler_for(layer: nn.Module, opacus_samplers: Mapping[type, Any]) -> GradSampler:
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
