"""Local training/evaluation loops, devices and the optimizer registry."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from fedsec.models import make_model
from fedsec.registry import UnknownNameError
from fedsec.training import (
    OPTIMIZERS,
    EvalResult,
    TrainResult,
    evaluate,
    make_optimizer,
    resolve_device,
    train,
)

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def digits() -> Split:
    """sklearn digits (1797 images, 8x8), pixels /16 into [0, 1], shape [N, 1, 8, 8].

    Split: a seed-0 random permutation, first 1437 (80 %) train, last 360 test.
    """
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1437], perm[1437:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ---- learning ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn-digits"])
def test_digits_models_learn(digits: Split, name: str) -> None:
    """5 epochs of SGD (lr 0.05, momentum 0.9, batch 32, seed 0), init seed 0.

    Measured on this split: mlp 95.6 %, cnn-digits 97.5 % test accuracy; the
    90 % bar leaves a margin of over 5 points for platform differences.
    """
    x_tr, y_tr, x_te, y_te = digits
    model = make_model(name, (1, 8, 8), 10, seed=0)
    res = train(model, x_tr, y_tr, epochs=5, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    assert isinstance(res, TrainResult)
    assert res.num_examples == 1437
    assert res.steps == 5 * math.ceil(1437 / 32)
    assert res.accuracy > 0.9
    ev = evaluate(model, x_te, y_te)
    assert isinstance(ev, EvalResult)
    assert ev.num_examples == 360
    assert ev.accuracy > 0.9, f"{name}: test accuracy {ev.accuracy:.3f}"
    assert ev.loss < 0.5


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_training_is_deterministic_for_a_seed(digits: Split, optimizer: str) -> None:
    x, y = digits[0][:200], digits[1][:200]
    lr = 0.05 if optimizer == "sgd" else 1e-3

    def run(seed: int) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        model = make_model("cnn-digits", (1, 8, 8), 10, seed=3)
        res = train(model, x, y, epochs=2, batch_size=16, optimizer=optimizer, lr=lr, seed=seed)
        return res, model.state_dict()

    res_a, a = run(1)
    res_b, b = run(1)
    _, c = run(2)
    assert res_a == res_b
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A different seed shuffles differently, so the weights differ.
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_training_leaves_global_rng_alone(digits: Split) -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train(
        make_model("mlp", (1, 8, 8), 10, seed=0),
        digits[0][:50],
        digits[1][:50],
        epochs=1,
        batch_size=8,
    )
    torch.testing.assert_close(torch.rand(3), expected)


def test_train_reports_last_epoch_mean_loss_over_uneven_batches() -> None:
    """With a negligible lr the model is unchanged, so the per-batch losses,
    weighted by batch size (10 = 3 + 3 + 3 + 1), average to the eval loss."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    model = make_model("mlp", (1, 8, 8), 10, seed=0)
    before = evaluate(model, x, y)
    res = train(model, x, y, epochs=2, batch_size=3, lr=1e-12)
    assert res.steps == 8
    assert res.num_examples == 10
    assert res.loss == pytest.approx(before.loss, rel=1e-5)
    assert res.accuracy == pytest.approx(before.accuracy)
    assert isinstance(res.loss, float) and isinstance(res.accuracy, float)


def test_train_sets_train_mode_and_accepts_float64() -> None:
    model = make_model("mlp", (1, 8, 8), 10, seed=0).eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)  # e.g. straight from NumPy
    y = torch.arange(6, dtype=torch.int32)
    train(model, x, y, epochs=1, batch_size=4)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0, "batch_size": 4}, "epochs must be >= 1"),
        ({"epochs": 1, "batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_train_rejects_bad_loop_settings(kwargs: dict[str, int], match: str) -> None:
    model = make_model("mlp", (1, 8, 8), 10)
    with pytest.raises(ValueError, match=match):
        train(model, torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), **kwargs)


def test_empty_dataset_is_a_one_line_error() -> None:
    model = make_model("mlp", (1, 8, 8), 10)
    x, y = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError) as info:
        train(model, x, y, epochs=1, batch_size=4)
    assert str(info.value) == "cannot train on an empty dataset"
    with pytest.raises(ValueError, match=r"^cannot evaluate on an empty dataset$"):
        evaluate(model, x, y)


def test_mismatched_or_float_labels_raise() -> None:
    model = make_model("mlp", (1, 8, 8), 10)
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="labels must have shape"):
        train(model, x, torch.zeros(3, dtype=torch.long), epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="labels must be integer"):
        evaluate(model, x, torch.zeros(4))


# ---- evaluate on a model whose output we control ---------------------------


class FixedLogits(nn.Module):
    """Returns its input, flattened, as logits; records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return x.flatten(1)


@pytest.mark.parametrize("batch_size", [1, 2, 512])
def test_evaluate_on_hand_made_logits(batch_size: int) -> None:
    logits = torch.tensor(
        [
            [2.0, 0.0, 0.0],  # predicts 0, label 0: right
            [0.0, 3.0, 0.0],  # predicts 1, label 1: right
            [0.0, 0.0, 1.0],  # predicts 2, label 0: wrong
            [1.0, 0.0, 5.0],  # predicts 2, label 2: right
            [0.0, 4.0, 0.0],  # predicts 1, label 2: wrong
        ]
    )
    labels = torch.tensor([0, 1, 0, 2, 2])
    # Hand-computed: mean of logsumexp(row) - row[label].
    expected_loss = sum(
        math.log(sum(math.exp(v) for v in row)) - row[t]
        for row, t in zip(logits.tolist(), labels.tolist(), strict=True)
    ) / len(labels)
    model = FixedLogits().train()
    res = evaluate(model, logits, labels, batch_size=batch_size)
    assert res.loss == pytest.approx(expected_loss, rel=1e-6)
    assert res.accuracy == 3 / 5
    assert res.num_examples == 5
    assert type(res.loss) is float and type(res.accuracy) is float
    assert model.seen_training and not any(model.seen_training)
    assert not any(model.seen_grad)
    assert len(model.seen_training) == math.ceil(5 / batch_size)


def test_evaluate_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(
            FixedLogits(),
            torch.zeros(2, 3),
            torch.zeros(2, dtype=torch.long),
            batch_size=0,
        )


# ---- devices ----------------------------------------------------------------


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_device_is_cpu_here() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto").type in ("cpu", "mps")
    assert resolve_device().type in ("cpu", "mps")


@pytest.mark.usefixtures("no_accelerator")
def test_auto_device_without_accelerator() -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_explicit_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.usefixtures("no_accelerator")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_raises(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_device(spec)
    assert str(info.value) == f"device '{spec}' requested but CUDA is not available"


@pytest.mark.usefixtures("no_accelerator")
def test_mps_without_mps_raises() -> None:
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu0", "", "meta", "tpu", "cuda:x"])
def test_garbage_device_raises(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_device(spec)
    assert str(info.value).startswith(f"unknown device '{spec}'; valid choices: auto")


def test_train_accepts_device_string_and_object() -> None:
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for device in ("cpu", torch.device("cpu")):
        res = train(
            make_model("mlp", (1, 8, 8), 4, seed=0),
            x,
            y,
            epochs=1,
            batch_size=4,
            device=device,
        )
        assert res.steps == 1


# ---- optimizers -------------------------------------------------------------


def test_optimizer_registry() -> None:
    assert OPTIMIZERS.names() == ["sgd", "adam", "adamw"]
    params = list(nn.Linear(2, 2).parameters())
    sgd = make_optimizer("sgd", params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(make_optimizer("adam", params, lr=1e-3), torch.optim.Adam)
    adamw = make_optimizer("adamw", params, lr=1e-3, weight_decay=0.01)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.01


def test_unknown_optimizer_lists_choices() -> None:
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(UnknownNameError) as info:
        make_optimizer("rmsprop", params, lr=0.1)
    assert str(info.value) == ("unknown optimizer 'rmsprop'; valid choices: sgd, adam, adamw")
    with pytest.raises(UnknownNameError):
        train(
            make_model("mlp", (1, 8, 8), 10),
            torch.zeros(2, 1, 8, 8),
            torch.zeros(2, dtype=torch.long),
            epochs=1,
            batch_size=2,
            optimizer="rmsprop",
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "learning rate"),
        ({"lr": float("nan")}, "learning rate"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_optimizer_hyperparameters(kwargs: dict[str, float], match: str) -> None:
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=match):
        make_optimizer("sgd", params, **kwargs)


# ---- the SGD fast path ----------------------------------------------------------


@pytest.mark.parametrize(
    ("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-3)]
)
@pytest.mark.parametrize("name", ["mlp", "cnn-digits"])
def test_sgd_fast_path_is_bit_identical_to_torch_sgd(
    digits: Split, name: str, momentum: float, weight_decay: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train``'s foreach SGD step gives exactly torch.optim.SGD's weights."""
    import fedsec.training as training

    x, y = digits[0][:150], digits[1][:150]

    def trained() -> dict[str, torch.Tensor]:
        model = make_model(name, (1, 8, 8), 10, seed=3)
        kwargs = {"lr": 0.05, "momentum": momentum, "weight_decay": weight_decay}
        train(model, x, y, epochs=2, batch_size=32, seed=5, **kwargs)  # type: ignore[arg-type]
        return {k: v.clone() for k, v in model.state_dict().items()}

    fast = trained()
    monkeypatch.setattr(training.ForeachSGD, "wraps", staticmethod(lambda opt: False))
    reference = trained()
    for key in reference:
        assert torch.equal(fast[key], reference[key]), key


def test_sgd_fast_path_steps_aside_for_what_it_does_not_reproduce() -> None:
    from fedsec.training import ForeachSGD

    params = list(nn.Linear(2, 2).parameters())
    assert ForeachSGD.wraps(torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert not ForeachSGD.wraps(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True))
    assert not ForeachSGD.wraps(torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1))
    assert not ForeachSGD.wraps(torch.optim.Adam(params, lr=0.1))
    hooked = torch.optim.SGD(params, lr=0.1)
    hooked.register_step_post_hook(lambda *args: None)
    assert not ForeachSGD.wraps(hooked)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(lambda *args: None)
    try:
        assert not ForeachSGD.wraps(torch.optim.SGD(params, lr=0.1))
    finally:
        handle.remove()
