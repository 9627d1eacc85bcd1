"""Model zoo: small image classifiers that train fast on CPU and work with DP-SGD.

Every model normalises with GroupNorm [1]_ instead of BatchNorm. BatchNorm mixes
statistics across the examples of a batch, so per-example gradients -- and hence
the per-example clipping of DP-SGD [2]_ as implemented by Opacus -- are not
defined for it; its running statistics would also be yet another piece of state
for federated averaging to reconcile. No model uses in-place activations either,
because Opacus' per-sample-gradient hooks keep references to layer activations.

Models are looked up by name in :data:`MODELS` and built with :func:`make_model`.
A config may also name the user's own model factory, registered with
:func:`fedsec.registry.register_model` or as a dotted
``"package.module:factory"`` that every process imports (see
:mod:`fedsec.registry`); the user's models may use BatchNorm.

References
----------
.. [1] Y. Wu and K. He, "Group Normalization", ECCV 2018.
.. [2] M. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
.. [3] K. He, X. Zhang, S. Ren and J. Sun, "Deep Residual Learning for Image
   Recognition", CVPR 2016.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedsec.registry import Registry, dotted_callables

__all__ = [
    "MODELS",
    "BasicBlock",
    "CifarResNet",
    "ModelSpec",
    "check_model_input",
    "make_model",
]

InputShape = tuple[int, int, int]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model architecture.

    Parameters
    ----------
    name : str
        Registry name, as used in experiment configs.
    build : callable
        ``build(input_shape, num_classes)`` returns a freshly initialised module;
        ``input_shape`` is ``(C, H, W)``.
    image_sizes : tuple of int or None
        Spatial sizes (``H == W``) the architecture accepts; ``None`` means any.
    description : str
        One line for ``--help`` style listings.
    """

    name: str
    build: Callable[[InputShape, int], nn.Module]
    image_sizes: tuple[int, ...] | None
    description: str


_import_model_factory = dotted_callables("model")
_DOTTED_SPECS: dict[str, ModelSpec] = {}


def _dotted_model(name: str) -> ModelSpec | None:
    """The :class:`ModelSpec` of a dotted ``"package.module:factory"`` (None otherwise).

    The user's factory accepts any input size; it is asked for a model of the
    data set's shape, and :func:`make_model` checks that it returns a module.
    """
    # Resolved on every lookup (the import is cached): the policy on dotted names
    # (fedsec.registry.restrict_user_code) decides each time, not only the first.
    factory = _import_model_factory(name)
    if factory is None:
        return None
    if name not in _DOTTED_SPECS:
        doc = (factory.__doc__ or "").strip().split("\n")[0]
        _DOTTED_SPECS[name] = ModelSpec(name, factory, None, doc)
    return _DOTTED_SPECS[name]


MODELS: Registry[ModelSpec] = Registry("model", _dotted_model)


def _group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups (up to ``max_groups``) dividing ``channels``.

    Wu & He use 32 groups on wide ImageNet networks; our narrow models (16-64
    channels) would be left with one or two channels per group, which behaves
    like InstanceNorm and trains worse, so we cap the group count lower.
    """
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _conv_gn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    """3x3 same-padding convolution, GroupNorm, ReLU.

    The convolution has no bias because GroupNorm's affine shift makes it
    redundant.
    """
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        _group_norm(out_ch),
        nn.ReLU(),
    ]


# ---- mlp --------------------------------------------------------------------


def _build_mlp(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Two-hidden-layer perceptron on flattened pixels (128 and 64 units)."""
    in_features = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _build_mlp_wide(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Wide perceptron (1024 and 960 units): about 1.06M parameters on 8x8 digits.

    Sized for communication and secure-aggregation benchmarks at d ~ 1M.
    """
    in_features = input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 1024),
        nn.ReLU(),
        nn.Linear(1024, 960),
        nn.ReLU(),
        nn.Linear(960, num_classes),
    )


# ---- cnn-digits -------------------------------------------------------------


def _build_cnn_digits(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Two 3x3 conv layers (16, 32 channels) and one 2x2 max-pool for 8x8 digits.

    8x8 images leave room for a single pooling step; the 32x4x4 feature map goes
    straight to the classifier.
    """
    return nn.Sequential(
        *_conv_gn_relu(input_shape[0], 16),
        *_conv_gn_relu(16, 32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes),
    )


# ---- cnn28 ------------------------------------------------------------------


def _build_cnn28(input_shape: InputShape, num_classes: int) -> nn.Module:
    """Two conv blocks (32, 64 channels), each followed by 2x2 max-pool, then FC.

    28 -> 14 -> 7 spatially, so the classifier sees 64x7x7 features through one
    128-unit hidden layer (the usual MNIST/Fashion-MNIST baseline shape).
    """
    return nn.Sequential(
        *_conv_gn_relu(input_shape[0], 32),
        nn.MaxPool2d(2),
        *_conv_gn_relu(32, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


# ---- resnet -----------------------------------------------------------------


class BasicBlock(nn.Module):
    """Residual basic block of He et al. (2016) [3]_ with GroupNorm.

    Two 3x3 convolutions; when the stride or width changes, the shortcut is a
    1x1 strided projection (the paper's option B), otherwise the identity.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    stride : int
        Stride of the first convolution (2 halves the spatial size).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                _group_norm(out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(F(x) + shortcut(x))``."""
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        # Out-of-place add: Opacus hooks may still hold `out` / `x`.
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet family of He et al. (2016, Sec. 4.2) [3]_, with GroupNorm.

    A 3x3 stem with 16 channels, three stages of ``n`` basic blocks with widths
    16, 32, 64 (the last two halve the spatial size), global average pooling and
    a linear classifier: ``depth = 6n + 2`` weighted layers.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Output logits.
    depth : int
        ``6n + 2``: 8 (n=1), 14, 20 (the paper's smallest), 32, ...
    """

    def __init__(self, in_channels: int, num_classes: int, depth: int = 8) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_gn_relu(in_channels, 16))
        layers: list[nn.Module] = []
        in_ch = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``[B, num_classes]``."""
        x = self.stages(self.stem(x))
        logits: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return logits


def _build_resnet(input_shape: InputShape, num_classes: int) -> nn.Module:
    """ResNet-8: one basic block per stage, enough for CIFAR-10 under a CPU budget."""
    return CifarResNet(input_shape[0], num_classes, depth=8)


# ---- registry ---------------------------------------------------------------

MODELS.add(
    "mlp",
    ModelSpec(
        "mlp",
        _build_mlp,
        None,
        "MLP on flattened pixels, hidden layers 128-64; any input size",
    ),
)
MODELS.add(
    "mlp-wide",
    ModelSpec(
        "mlp-wide",
        _build_mlp_wide,
        None,
        "MLP, hidden layers 1024-960 (about 1.06M parameters on digits); for d ~ 1M benchmarks",
    ),
)
MODELS.add(
    "cnn-digits",
    ModelSpec(
        "cnn-digits",
        _build_cnn_digits,
        (8,),
        "two-layer CNN with GroupNorm for 8x8 digits (sklearn)",
    ),
)
MODELS.add(
    "cnn28",
    ModelSpec(
        "cnn28",
        _build_cnn28,
        (28,),
        "two conv blocks with GroupNorm and max-pool for 28x28 MNIST/Fashion-MNIST",
    ),
)
MODELS.add(
    "resnet",
    ModelSpec(
        "resnet",
        _build_resnet,
        (32,),
        "ResNet-8 (He et al. 2016) with GroupNorm, widths 16-32-64, for 32x32 CIFAR",
    ),
)


def _format_sizes(sizes: tuple[int, ...]) -> str:
    return " or ".join(f"{s}x{s}" for s in sizes)


def check_model_input(name: str, input_shape: tuple[int, int, int]) -> None:
    """Check that model ``name`` accepts inputs of ``input_shape`` without building it.

    Parameters
    ----------
    name : str
        Registered model name.
    input_shape : tuple of int
        ``(C, H, W)``.

    Raises
    ------
    fedsec.registry.UnknownNameError
        If ``name`` is not registered (the message lists the valid names).
    ValueError
        If the shape is malformed or its spatial size is not one the model
        accepts, e.g. ``model 'cnn28' expects 28x28 inputs, got 8x8``.
    """
    spec = MODELS.get(name)
    if len(input_shape) != 3 or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in input_shape
    ):
        raise ValueError(
            f"model '{name}' needs input_shape (C, H, W) of positive ints, "
            f"got {tuple(input_shape)!r}"
        )
    _, h, w = input_shape
    if spec.image_sizes is not None and (h != w or h not in spec.image_sizes):
        raise ValueError(
            f"model '{name}' expects {_format_sizes(spec.image_sizes)} inputs, got {h}x{w}"
        )


def make_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Build a freshly initialised model by registry name.

    Parameters
    ----------
    name : str
        Registered model name (see ``MODELS.names()``), or a dotted
        ``"package.module:factory"`` whose factory takes ``(input_shape,
        num_classes)`` and returns a ``torch.nn.Module``.
    input_shape : tuple of int
        ``(C, H, W)`` of one example.
    num_classes : int
        Number of output logits (>= 2).
    seed : int, optional
        Makes the initial weights deterministic. The seed is applied inside
        :func:`torch.random.fork_rng`, so the caller's global RNG stream is left
        untouched (building a model does not shift later shuffles or dropout).

    Returns
    -------
    torch.nn.Module
        The model on CPU, in training mode, float32.

    Raises
    ------
    fedsec.registry.UnknownNameError
        If ``name`` is not registered.
    ValueError
        If ``input_shape`` does not fit the model or ``num_classes < 2``.
    TypeError
        If the factory returns something other than a ``torch.nn.Module``.
    """
    check_model_input(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"model '{name}' needs num_classes >= 2, got {num_classes!r}")
    spec = MODELS.get(name)
    # A plain tuple, in case the caller passed a list or torch.Size.
    shape = (input_shape[0], input_shape[1], input_shape[2])
    if seed is None:
        model = spec.build(shape, num_classes)
    else:
        # devices=[]: models are built on CPU; forking every CUDA RNG would be slow
        # and warns on multi-GPU hosts.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build(shape, num_classes)
    if not isinstance(model, nn.Module):  # a user's factory may return anything
        raise TypeError(
            f"model '{name}' factory returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
