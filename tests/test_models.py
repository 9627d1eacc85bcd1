"""Model zoo: shapes, DP-SGD compatibility, input checks and seeded initialisation."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedsec.models import MODELS, ModelSpec, check_model_input, make_model
from fedsec.registry import UnknownNameError

# One accepted (C, H, W) per model, plus extra ones for the size-agnostic mlp.
ACCEPTED = [
    ("mlp", (1, 8, 8)),
    ("mlp", (3, 32, 32)),
    ("mlp-wide", (1, 8, 8)),
    ("cnn-digits", (1, 8, 8)),
    ("cnn28", (1, 28, 28)),
    ("resnet", (3, 32, 32)),
]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def test_registry_lists_the_documented_models() -> None:
    assert MODELS.names() == ["mlp", "mlp-wide", "cnn-digits", "cnn28", "resnet"]
    for name in MODELS.names():
        spec = MODELS.get(name)
        assert isinstance(spec, ModelSpec)
        assert spec.name == name
        assert spec.description
    assert MODELS.get("mlp").image_sizes is None
    assert MODELS.get("cnn-digits").image_sizes == (8,)
    assert MODELS.get("cnn28").image_sizes == (28,)
    assert MODELS.get("resnet").image_sizes == (32,)


def test_every_registered_model_is_covered() -> None:
    assert {name for name, _ in ACCEPTED} == set(MODELS.names())


@pytest.mark.parametrize(("name", "shape"), ACCEPTED)
@pytest.mark.parametrize("num_classes", [10, 3])
def test_forward_shape(name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    model = make_model(name, shape, num_classes, seed=0)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "shape"), ACCEPTED)
def test_no_batchnorm_and_opacus_strict(name: str, shape: tuple[int, int, int]) -> None:
    model = make_model(name, shape, 10, seed=0)
    assert not any(isinstance(m, BATCH_NORMS) for m in model.modules())
    if not name.startswith("mlp"):  # perceptrons have no normalisation layer at all
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    # strict=True raises on any DP-incompatible layer instead of returning a list.
    ModuleValidator.validate(model, strict=True)


# Opacus' hooks warn when the input itself needs no gradient, which is normal.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize(("name", "shape"), ACCEPTED)
def test_opacus_per_sample_gradients(name: str, shape: tuple[int, int, int]) -> None:
    """Per-example gradients exist and equal the gradient of that example alone.

    The second part is what BatchNorm would break: with it, example 0's
    gradient would depend on the rest of the batch.
    """
    torch.manual_seed(0)
    x, y = torch.randn(3, *shape), torch.tensor([0, 1, 2])
    model = make_model(name, shape, 10, seed=1)
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample for n, p in model.named_parameters()}
    for p in model.parameters():
        assert p.grad_sample is not None
        assert p.grad_sample.shape == (3, *p.shape)

    alone = make_model(name, shape, 10, seed=1)
    nn.functional.cross_entropy(alone(x[:1]), y[:1], reduction="sum").backward()
    for n, p in alone.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(per_sample[n][0], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("cnn28", (1, 8, 8), "model 'cnn28' expects 28x28 inputs, got 8x8"),
        ("cnn-digits", (1, 28, 28), "model 'cnn-digits' expects 8x8 inputs, got 28x28"),
        ("resnet", (3, 28, 28), "model 'resnet' expects 32x32 inputs, got 28x28"),
        ("resnet", (3, 32, 16), "model 'resnet' expects 32x32 inputs, got 32x16"),
    ],
)
def test_wrong_input_size_is_a_one_line_error(
    name: str, shape: tuple[int, int, int], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        make_model(name, shape, 10)
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError) as info:
        check_model_input(name, shape)
    assert str(info.value) == message


def test_check_model_input_accepts_valid_shapes() -> None:
    for name, shape in ACCEPTED:
        check_model_input(name, shape)
    check_model_input("mlp", (3, 5, 7))  # any size, even non-square


@pytest.mark.parametrize("shape", [(8, 8), (1, 0, 8), (1, 8, 8, 1)])
def test_malformed_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        check_model_input("mlp", shape)  # type: ignore[arg-type]


def test_too_few_classes_raises() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        make_model("mlp", (1, 8, 8), 1)


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(UnknownNameError) as info:
        make_model("vgg", (3, 32, 32), 10)
    assert str(info.value) == (
        "unknown model 'vgg'; valid choices: mlp, mlp-wide, cnn-digits, cnn28, resnet"
    )
    with pytest.raises(UnknownNameError):
        check_model_input("vgg", (3, 32, 32))


@pytest.mark.parametrize(("name", "shape"), ACCEPTED)
def test_seed_gives_identical_parameters(name: str, shape: tuple[int, int, int]) -> None:
    a = make_model(name, shape, 10, seed=7).state_dict()
    b = make_model(name, shape, 10, seed=7).state_dict()
    c = make_model(name, shape, 10, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_seeded_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    make_model("resnet", (3, 32, 32), 10, seed=0)
    torch.testing.assert_close(torch.rand(5), expected)
