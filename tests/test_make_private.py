"""make_private: DP-SGD on the user's own loop (fedsec.privacy.dp_loop)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsec.data import load_dataset
from fedsec.privacy import DPOptimizer, epsilon_spent, make_private
from fedsec.privacy.dpsgd import dp_sgd_steps, dp_train


def _tiny_cnn(seed: int = 0, *, inplace: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(inplace=inplace),  # in place on a layer's output: make_private allows it
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    return data.train_x[:n], data.train_y[:n]


def _smooth_ce(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits, y, label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_zero_noise_step_is_clipped_per_example_gradients_over_batch_size(
    loss_reduction: str,
) -> None:
    """sigma = 0: the step's gradient is sum_i clip_C(g_i) / B, g_i by autograd per example."""
    x, y = _digits(64)
    model = _tiny_cnn()
    reference = copy.deepcopy(model)
    batch_size = 16
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    gen = torch.Generator().manual_seed(3)
    model, opt, private_loader = make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
        noise_multiplier=0.0, max_grad_norm=1.0, loss_reduction=loss_reduction, generator=gen,
    )  # fmt: skip
    xb, yb = next(iter(private_loader))
    assert 0 < len(yb) < 64

    # Naive per-example gradients of the user's loss, one autograd call each.
    per_example = []
    for i in range(len(yb)):
        reference.zero_grad()
        _smooth_ce(reference(xb[i : i + 1]), yb[i : i + 1]).backward()
        per_example.append([p.grad.clone() for p in reference.parameters()])  # type: ignore[union-attr]
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in per_example])
    clip = float(norms.median())  # about half the examples get clipped
    opt.max_grad_norm = clip
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    expected = [
        sum(f * gs[k] for f, gs in zip(factors, per_example, strict=True)) / batch_size
        for k in range(len(per_example[0]))
    ]

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _smooth_ce(model(xb), yb, reduction=loss_reduction).backward()
    opt.step()
    for b, p, e in zip(before, model.parameters(), expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e, rtol=0, atol=1e-5)
    assert opt.accountant.steps == 1


def test_noise_is_gaussian_with_std_sigma_c_over_expected_batch() -> None:
    """A noise-only step on 10,100 parameters: mean and std of N(0, (sigma C / B)^2).

    Margins: |mean| < 5 standard errors; std within 3 % (its relative standard
    error is 1/sqrt(2 * 10100) = 0.7 %).
    """
    model = nn.Linear(100, 100)
    loader = DataLoader(TensorDataset(torch.zeros(40, 100), torch.zeros(40)), batch_size=8)
    sigma, clip, batch = 2.0, 3.0, 8
    _, opt, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
        noise_multiplier=sigma, max_grad_norm=clip, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    opt.zero_grad()
    opt.step()  # no forward pass since zero_grad: the empty-batch, noise-only step
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    std = sigma * clip / batch
    assert noise.numel() == 10_100
    assert abs(float(noise.mean())) < 5 * std / noise.numel() ** 0.5
    assert abs(float(noise.std()) / std - 1) < 0.03


def test_loader_samples_poisson_batches_with_dp_train_step_counts() -> None:
    """Batch sizes average q N = B (margin 1.5 = 4.3 standard errors over 400 batches),
    vary, include the empty batch as zero-length tensors, and epochs have dp_train's steps."""
    n, batch = 1000, 50
    ds = TensorDataset(torch.randn(n, 3), torch.arange(n))
    lin = nn.Linear(3, 2)
    _, _, loader = make_private(
        lin, torch.optim.SGD(lin.parameters(), lr=0.1), DataLoader(ds, batch_size=batch),
        noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    sizes = []
    for _ in range(20):
        batches = list(loader)
        assert len(batches) == 20
        sizes += [len(yb) for _, yb in batches]
        assert all(len(set(yb.tolist())) == len(yb) for _, yb in batches)  # no repeats
    mean = sum(sizes) / len(sizes)
    assert abs(mean - batch) < 1.5, mean
    assert len(set(sizes)) > 5

    # Epoch lengths follow dp_train: 3 epochs of n = 50, B = 15 take 10 steps.
    small = TensorDataset(torch.randn(50, 3), torch.zeros(50, dtype=torch.long))
    lin2 = nn.Linear(3, 2)
    _, _, loader2 = make_private(
        lin2, torch.optim.SGD(lin2.parameters(), lr=0.1), DataLoader(small, batch_size=15),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    assert sum(len(list(loader2)) for _ in range(3)) == dp_sgd_steps(50, 15, 3) == 10

    # A rate so low that most batches are empty: they come out as [0, ...] tensors.
    tiny = TensorDataset(torch.randn(1000, 3), torch.zeros(1000, dtype=torch.long))
    lin3 = nn.Linear(3, 2)
    _, opt3, loader3 = make_private(
        lin3, torch.optim.SGD(lin3.parameters(), lr=0.1), DataLoader(tiny, batch_size=1),
        noise_multiplier=1.0, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    xb, yb = next(b for b in loader3 if len(b[1]) == 0)
    assert xb.shape == (0, 3) and yb.shape == (0,) and yb.dtype == torch.long
    opt3.zero_grad()
    F.cross_entropy(lin3(xb), yb, reduction="sum").backward()
    opt3.step()  # a noise-only step
    assert opt3.accountant.steps == 1


def test_epsilon_and_weights_equal_dp_train_for_the_same_run() -> None:
    """The user's loop with cross-entropy and SGD, seeded like dp_train, is dp_train:
    same steps, the same epsilon (exactly), the same weights (1e-5)."""
    x, y = _digits(300)
    sigma, clip, batch, epochs, delta = 1.1, 1.0, 32, 2, 1e-5
    theirs = _tiny_cnn(seed=4, inplace=False)  # dp_train refuses in-place ops
    ours = copy.deepcopy(theirs)
    res = dp_train(theirs, x, y, epochs=epochs, batch_size=batch, lr=0.3,
                   noise_multiplier=sigma, max_grad_norm=clip, seed=7)  # fmt: skip

    ours, opt, loader = make_private(
        ours, torch.optim.SGD(ours.parameters(), lr=0.3), DataLoader(TensorDataset(x, y), batch_size=batch),
        noise_multiplier=sigma, max_grad_norm=clip, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(ours(xb), yb).backward()
            opt.step()

    assert opt.accountant.steps == res.steps == dp_sgd_steps(300, batch, epochs)
    assert opt.accountant.sample_rate == res.sample_rate
    assert opt.accountant.history == [(sigma, res.sample_rate, res.steps)]
    eps = epsilon_spent(noise_multiplier=res.noise_multiplier, sample_rate=res.sample_rate,
                        steps=res.steps, delta=delta)  # fmt: skip
    assert opt.accountant.epsilon(delta) == eps
    assert 0 < eps < float("inf")
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_users_own_loop_and_loss_learn_digits() -> None:
    """Own model, label-smoothing loss, Adam, sigma = 1, C = 1, batch 64, 5 epochs
    (112 steps, epsilon 3.78 at delta 1e-5) on the 1437 training digits; test
    accuracy measured 0.90-0.93 over generator seeds 0-4, we require >= 0.80
    (chance: 0.10)."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=64)
    model, optimizer, loader = make_private(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for _ in range(5):
        for xb, yb in loader:
            optimizer.zero_grad()
            _smooth_ce(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        acc = float((model(data.test_x).argmax(1) == data.test_y).float().mean())
    assert acc >= 0.80, acc
    assert 0 < optimizer.accountant.epsilon(1e-5) < 10
    assert list(model.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias"]


@pytest.mark.parametrize(
    ("layer", "name", "match"),
    [
        (nn.BatchNorm1d(10), "BatchNorm1d", "GroupNorm"),
        (nn.BatchNorm1d(10, affine=False), "BatchNorm1d", "GroupNorm"),  # mixes, no params
        (nn.LSTM(10, 10), "LSTM", "not supported"),
    ],
)
def test_unsupported_layers_refused_naming_the_layer(
    layer: nn.Module, name: str, match: str
) -> None:
    model = nn.Sequential(nn.Linear(4, 10), layer)
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    with pytest.raises(ValueError, match=match) as info:
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                     noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
    message = str(info.value)
    assert "\n" not in message and f"'1' ({name})" in message
    assert not model[0]._forward_hooks  # nothing attached on refusal


def test_bad_arguments_raise_one_line_value_errors() -> None:
    model = nn.Linear(4, 2)
    ds = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    good: dict[str, object] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    cases: list[tuple[dict[str, object], str]] = [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"loss_reduction": "none"}, "loss_reduction"),
        ({"accountant": "gdp"}, "accountant"),
        ({"secure_mode": True, "generator": torch.Generator()}, "generator"),
    ]
    for override, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            make_private(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                DataLoader(ds, batch_size=4),
                **{**good, **override},
            )  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="not the module's"):
        make_private(
            model, torch.optim.SGD(other.parameters(), lr=0.1), DataLoader(ds, batch_size=4), **good
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'bias' is not in the optimizer"):
        make_private(
            model, torch.optim.SGD([model.weight], lr=0.1), DataLoader(ds, batch_size=4), **good
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=9), **good
        )  # type: ignore[arg-type]
    _, opt, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=4), **good
    )  # type: ignore[arg-type]
    assert isinstance(opt, DPOptimizer)
    with pytest.raises(ValueError, match="already private"):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=4), **good
        )  # type: ignore[arg-type]
    opt.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_dp_train_is_a_user_of_the_private_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """dp_train builds its DP-SGD step with make_private's private_optimizer (one
    implementation) and steps it once per Poisson batch."""
    import fedsec.privacy.dpsgd as dpsgd
    from fedsec.privacy import dp_loop

    built: list[DPOptimizer] = []
    real = dp_loop.private_optimizer

    def spy(*args: object, **kwargs: object) -> DPOptimizer:
        opt = real(*args, **kwargs)  # type: ignore[arg-type]
        built.append(opt)
        return opt

    monkeypatch.setattr(dpsgd, "private_optimizer", spy)
    x, y = _digits(100)
    res = dp_train(_tiny_cnn(inplace=False), x, y, epochs=2, batch_size=20, lr=0.1,
                   noise_multiplier=1.0, max_grad_norm=1.0, seed=1)  # fmt: skip
    assert len(built) == 1
    assert built[0].accountant.steps == res.steps == 10
    assert built[0].expected_batch_size == 20


def test_backward_outputs_equals_backward_and_refuses_modified_outputs() -> None:
    """backward_outputs (no parameter gradients) steps to the same weights as
    loss.backward(); an in-place op on a layer's output is refused in one line."""
    x, y = _digits(120)
    from fedsec.privacy.dp_loop import private_optimizer

    weights = []
    for fast in (False, True):
        model = _tiny_cnn(seed=2, inplace=False)
        opt = private_optimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.2), num_samples=120, batch_size=30,
            noise_multiplier=0.5, max_grad_norm=1.0, loss_reduction="sum",
            generator=torch.Generator().manual_seed(5), keep_outputs=fast,
        )  # fmt: skip
        for first in range(0, 120, 30):
            loss = F.cross_entropy(
                model(x[first : first + 30]), y[first : first + 30], reduction="sum"
            )
            if fast:
                opt.backward_outputs(loss)
            else:
                opt.zero_grad()
                loss.backward()
            opt.step()
        opt.detach()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    model = _tiny_cnn(inplace=True)  # ReLU(inplace=True) right after GroupNorm's output
    opt = private_optimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.2), num_samples=120, batch_size=30,
        noise_multiplier=0.5, max_grad_norm=1.0, keep_outputs=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="in-place") as info:
        opt.backward_outputs(F.cross_entropy(model(x[:30]), y[:30]))
    assert "\n" not in str(info.value)
    linear = nn.Linear(64, 10)
    plain = private_optimizer(
        linear, torch.optim.SGD(linear.parameters(), lr=0.1), num_samples=10, batch_size=5,
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="keep_outputs"):
        plain.backward_outputs(linear(x[:5].flatten(1)).sum())


def test_a_plain_sgd_steps_on_the_foreach_path_bit_identically_and_hooks_turn_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DPOptimizer steps a plain SGD through ForeachSGD: the same weights as SGD.step."""
    from fedsec.training import ForeachSGD

    x, y = _digits(64)

    def three_steps(hook: bool) -> tuple[list[torch.Tensor], list[str]]:
        model = _tiny_cnn(seed=1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        calls: list[str] = []
        if hook:  # a hook of the user's: the fast path must step aside so that it runs
            sgd.register_step_post_hook(lambda *args: calls.append("hook"))
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
        model, opt, private = make_private(
            model, sgd, loader, noise_multiplier=1.0, max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(2),
            noise_generator=torch.Generator().manual_seed(4),
        )  # fmt: skip
        for _, (xb, yb) in zip(range(3), private, strict=False):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], calls

    fast, _ = three_steps(hook=False)
    hooked, calls = three_steps(hook=True)
    assert calls == ["hook"] * 3
    monkeypatch.setattr(ForeachSGD, "wraps", staticmethod(lambda opt: False))
    reference, _ = three_steps(hook=False)
    for a, b, c in zip(fast, hooked, reference, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)
