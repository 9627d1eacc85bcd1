"""DP-SGD local training (fedsec.privacy.dpsgd) against its definition and Opacus."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsec.data import load_dataset
from fedsec.models import make_model
from fedsec.privacy.dpsgd import (
    DPSGDResult,
    clipped_gradient_sum,
    dp_train,
    per_sample_gradients,
    poisson_sample,
)
from fedsec.training import evaluate, train

DIGITS = (1, 8, 8)


def _batch(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _reference_per_sample(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients by brute force: vmap(grad) over the whole model."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    out: dict[str, torch.Tensor] = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return out


def _assert_close_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


# ---- per-example gradients and clipping -------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "n"),
    [
        ("mlp", DIGITS, 16),
        ("cnn-digits", DIGITS, 16),
        ("cnn28", (1, 28, 28), 4),
        ("resnet", (3, 32, 32), 4),
    ],
)
def test_per_sample_gradients_match_vmap_reference(
    name: str, shape: tuple[int, ...], n: int
) -> None:
    model = make_model(name, shape, 10, seed=0)
    x, y = _batch(shape, n)
    _assert_close_dicts(per_sample_gradients(model, x, y), _reference_per_sample(model, x, y))


class _Scale(nn.Module):
    """A layer no grad sampler knows: exercises the functorch fallback."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_per_sample_gradients_of_other_layers() -> None:
    """Strided, dilated, 'same', grouped and reflect-padded convolutions, LayerNorm, a custom layer.

    These take the three other routes: our Conv2d rule, Opacus's grad samplers
    (grouped conv, LayerNorm) and the functorch fallback (reflect padding, _Scale).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.LayerNorm(6 * 4 * 4),
        _Scale(6 * 4 * 4),
        nn.Linear(6 * 4 * 4, 10),
    )
    x, y = _batch((2, 8, 8), 6)
    _assert_close_dicts(per_sample_gradients(model, x, y), _reference_per_sample(model, x, y))


def test_shared_layer_used_twice() -> None:
    """A layer called twice per forward: its per-example gradients are summed before clipping."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice()
    x, y = _batch((8,), 8)
    ref = _reference_per_sample(model, x, y)
    _assert_close_dicts(per_sample_gradients(model, x, y), ref)
    clipped = per_sample_gradients(model, x, y, max_grad_norm=0.1)
    summed = clipped_gradient_sum(model, x, y, max_grad_norm=0.1)
    _assert_close_dicts({k: v.sum(0) for k, v in clipped.items()}, summed)


@pytest.mark.parametrize("name", ["mlp", "cnn-digits"])
@pytest.mark.parametrize("clip", [1e-3, 0.3, 1e3])
def test_clipped_per_sample_norms_never_exceed_bound(name: str, clip: float) -> None:
    model = make_model(name, DIGITS, 10, seed=1)
    x, y = _batch(DIGITS, 32, seed=1)
    raw = per_sample_gradients(model, x, y)
    clipped = per_sample_gradients(model, x, y, max_grad_norm=clip)
    raw_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in raw.values()))
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in clipped.values()))
    assert bool((norms <= clip * (1 + 1e-5)).all()), (norms.max(), clip)
    # Examples under the bound are untouched; those over it land on it.
    under = raw_norms < clip
    torch.testing.assert_close(norms[under], raw_norms[under])
    torch.testing.assert_close(
        norms[~under], torch.full_like(norms[~under], clip), rtol=1e-4, atol=0
    )
    # The fast (factored) path of dp_train sums exactly these clipped gradients.
    _assert_close_dicts(
        {k: v.sum(0) for k, v in clipped.items()},
        clipped_gradient_sum(model, x, y, max_grad_norm=clip),
    )


@pytest.mark.parametrize("name", ["mlp", "cnn-digits"])
def test_clipped_sum_matches_opacus_dpoptimizer(name: str) -> None:
    """Same batch, same C: our clipped sum equals Opacus's DPOptimizer.summed_grad."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = make_model(name, DIGITS, 10, seed=2)
    x, y = _batch(DIGITS, 32, seed=2)
    ours = clipped_gradient_sum(model, x, y, max_grad_norm=0.5)

    gsm = GradSampleModule(copy.deepcopy(model))  # hooks mode, Opacus's default
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=32,
    )
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x), y).backward()
    opt.clip_and_accumulate()
    theirs = {k.removeprefix("_module."): p.summed_grad for k, p in gsm.named_parameters()}
    _assert_close_dicts(ours, theirs)


def test_one_step_matches_opacus_step() -> None:
    """dp_train's first step (sigma=0) equals an Opacus DPOptimizer step on the same Poisson batch."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    data = load_dataset("digits")
    x, y = data.train_x[:200], data.train_y[:200]
    model = make_model("cnn-digits", DIGITS, 10, seed=3)
    reference = copy.deepcopy(model)
    dp_train(
        model,
        x,
        y,
        epochs=1,
        batch_size=20,
        lr=0.3,
        noise_multiplier=0.0,
        max_grad_norm=0.2,
        seed=7,
        max_steps=1,
    )

    idx = poisson_sample(200, 0.1, generator=torch.Generator().manual_seed(7))
    gsm = GradSampleModule(reference)
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.3),
        noise_multiplier=0.0,
        max_grad_norm=0.2,
        expected_batch_size=20,
    )
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x[idx]), y[idx], reduction="sum").div(20).backward()
    opt.step()
    gsm._close()
    for (k, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


# ---- noise --------------------------------------------------------------------


def _zero_gradient_setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A model whose per-example gradients are exactly zero: W x with x = 0."""
    model = nn.Sequential(nn.Linear(1000, 20, bias=False))
    nn.init.zeros_(model[0].weight)
    x = torch.zeros(64, 1000)
    y = torch.arange(64) % 10
    return model, x, y


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_std_is_sigma_c_over_expected_batch(secure_mode: bool) -> None:
    """With zero gradients, one SGD step at lr=1 moves the weights by exactly -noise / B.

    d = 20,000 draws: the sample std has relative standard error 1/sqrt(2d) =
    0.5 %; we allow 3 % (6 standard errors), and |mean| < 5 standard errors.
    """
    model, x, y = _zero_gradient_setup()
    sigma, clip, batch = 1.7, 0.6, 32
    res = dp_train(
        model, x, y, epochs=1, batch_size=batch, lr=1.0, noise_multiplier=sigma,
        max_grad_norm=clip, seed=11, secure_mode=secure_mode, max_steps=1,
    )  # fmt: skip
    assert res.steps == 1
    delta = -model[0].weight.detach().flatten().double()
    expected = sigma * clip / batch
    assert abs(delta.std().item() / expected - 1) < 0.03
    assert abs(delta.mean().item()) < 5 * expected / math.sqrt(delta.numel())
    # Gaussian, not e.g. uniform: excess kurtosis ~ 0 (SE sqrt(24/d) = 0.035).
    z = (delta - delta.mean()) / delta.std()
    assert abs(z.pow(4).mean().item() - 3) < 0.2


def test_zero_noise_zero_gradient_leaves_model_unchanged() -> None:
    model, x, y = _zero_gradient_setup()
    dp_train(model, x, y, epochs=2, batch_size=16, lr=1.0, noise_multiplier=0.0, max_grad_norm=1.0)
    assert torch.count_nonzero(model[0].weight) == 0


# ---- sampling ----------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
def test_poisson_sampling_rate(secure: bool) -> None:
    """Batch sizes ~ Binomial(n, q); every example included with probability q.

    n = 200, q = 0.1, 2000 draws: the mean batch size has SE sqrt(nq(1-q)/2000)
    = 0.095 (we allow 0.4, > 4 SE); per-example frequencies have SE 0.0067 (we
    allow 0.035, > 5 SE, for the max over 200 examples); the batch-size
    variance nq(1-q) = 18 within 15 %.
    """
    n, q, draws = 200, 0.1, 2000
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = poisson_sample(n, q, generator=gen, secure=secure)
        assert idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, no repeats
        counts[idx] += 1
        sizes.append(idx.numel())
    size_t = torch.tensor(sizes, dtype=torch.float64)
    assert abs(size_t.mean().item() - n * q) < 0.4
    assert abs(size_t.var().item() / (n * q * (1 - q)) - 1) < 0.15
    assert (counts / draws - q).abs().max().item() < 0.035


def test_empty_batches_take_noise_only_steps() -> None:
    """n = 10, batch 1 (q = 0.1): about a third of the batches are empty; every step counts."""
    x, y = _batch(DIGITS, 10, seed=4)
    model = make_model("mlp", DIGITS, 10, seed=4)
    before = copy.deepcopy(model.state_dict())
    res = dp_train(
        model, x, y, epochs=5, batch_size=1, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0
    )
    assert res.steps == 50 and res.train.steps == 50
    assert res.sample_rate == pytest.approx(0.1)
    # Nothing selected on the first draws of this seed would still move the weights.
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_steps_follow_epochs_over_sample_rate() -> None:
    data = load_dataset("digits")
    x, y = data.train_x[:150], data.train_y[:150]
    kwargs = {"batch_size": 32, "lr": 0.1, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    res = dp_train(make_model("mlp", DIGITS, 10, seed=0), x, y, epochs=3, **kwargs)
    assert res.steps == round(3 * 150 / 32) == 14
    assert res.sample_rate == pytest.approx(32 / 150)
    assert res.noise_multiplier == 1.0
    assert res.train.num_examples == 150
    assert math.isfinite(res.train.loss) and 0.0 <= res.train.accuracy <= 1.0
    res = dp_train(make_model("mlp", DIGITS, 10, seed=0), x, y, epochs=3, max_steps=5, **kwargs)
    assert res.steps == 5


# ---- reproducibility and the model object -------------------------------------


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_deterministic_with_seed_and_not_in_secure_mode() -> None:
    data = load_dataset("digits")
    x, y = data.train_x[:300], data.train_y[:300]
    kwargs = {
        "epochs": 2,
        "batch_size": 32,
        "lr": 0.1,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
    }

    def run(seed: int, secure: bool = False) -> dict[str, torch.Tensor]:
        model = make_model("cnn-digits", DIGITS, 10, seed=0)
        dp_train(model, x, y, seed=seed, secure_mode=secure, **kwargs)
        return _state(model)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    s1, s2 = run(1, secure=True), run(1, secure=True)
    assert not all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("name", ["mlp", "cnn-digits"])
def test_model_keeps_its_state_dict_keys_and_no_hooks(name: str) -> None:
    data = load_dataset("digits")
    model = make_model(name, DIGITS, 10, seed=0)
    keys = list(model.state_dict())
    before = _state(model)
    dp_train(model, data.train_x[:100], data.train_y[:100], epochs=1, batch_size=20, lr=0.1,
             noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
    assert list(model.state_dict()) == keys
    assert not any(k.startswith("_module") for k in model.state_dict())
    assert type(model) is nn.Sequential
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    # The trained model still loads into a fresh instance of its class.
    make_model(name, DIGITS, 10).load_state_dict(model.state_dict())


def test_frozen_parameters_stay_frozen() -> None:
    model = make_model("mlp", DIGITS, 10, seed=0)
    first = model[1]
    first.weight.requires_grad_(False)
    first.bias.requires_grad_(False)
    before = first.weight.detach().clone()
    x, y = _batch(DIGITS, 64)
    dp_train(model, x, y, epochs=1, batch_size=16, lr=0.5, noise_multiplier=1.0, max_grad_norm=1.0)
    assert torch.equal(first.weight, before)
    assert list(per_sample_gradients(model, x[:4], y[:4])) == [
        "3.weight",
        "3.bias",
        "5.weight",
        "5.bias",
    ]


# ---- utility ----------------------------------------------------------------


def test_dp_sgd_on_digits_mlp_still_learns() -> None:
    """sigma = 1, C = 1, batch 32, 3 epochs on the 1437 training digits.

    Measured: 87-91 % test accuracy over seeds 0-2 (non-private training with
    the same settings: ~96 %); we require >= 80 % (chance: 10 %).
    """
    data = load_dataset("digits")
    model = make_model("mlp", DIGITS, 10, seed=0)
    res = dp_train(model, data.train_x, data.train_y, epochs=3, batch_size=32, lr=0.5,
                   noise_multiplier=1.0, max_grad_norm=1.0, seed=0)  # fmt: skip
    assert isinstance(res, DPSGDResult)
    acc = evaluate(model, data.test_x, data.test_y).accuracy
    assert acc >= 0.80, acc
    assert res.train.accuracy >= 0.6


def test_same_call_shape_as_train() -> None:
    """dp_train accepts train()'s optimizer options and returns a TrainResult inside."""
    data = load_dataset("digits")
    x, y = data.train_x[:128], data.train_y[:128]
    plain = train(make_model("mlp", DIGITS, 10, seed=0), x, y, epochs=1, batch_size=32)
    private = dp_train(make_model("mlp", DIGITS, 10, seed=0), x, y, epochs=1, batch_size=32, lr=0.01,
                       optimizer="adam", weight_decay=1e-4, noise_multiplier=0.5, max_grad_norm=1.0)  # fmt: skip
    assert type(private.train) is type(plain)
    assert private.train.num_examples == plain.num_examples == 128
    assert private.steps == plain.steps == 4


# ---- errors ----------------------------------------------------------------------

_GOOD = {"epochs": 1, "batch_size": 8, "lr": 0.1, "noise_multiplier": 1.0, "max_grad_norm": 1.0}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": True}, "max_grad_norm"),
        ({"max_steps": 0}, "max_steps"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"optimizer": "lbfgs"}, "lbfgs"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_parameters_raise_one_line_value_errors(
    override: dict[str, object], match: str
) -> None:
    x, y = _batch(DIGITS, 20)
    with pytest.raises(ValueError, match=match) as info:
        dp_train(make_model("mlp", DIGITS, 10), x, y, **{**_GOOD, **override})  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_bad_data_and_models_raise_one_line_value_errors() -> None:
    x, y = _batch(DIGITS, 20)
    cases = [
        (make_model("mlp", DIGITS, 10), x[:0], y[:0], "empty"),
        (make_model("mlp", DIGITS, 10), x, y[:5], "labels"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)), x, y, "BatchNorm"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.ReLU(inplace=True)), x, y, "in-place"),
    ]
    for model, xs, ys, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            dp_train(model, xs, ys, **_GOOD)
        assert "\n" not in str(info.value)
    frozen = make_model("mlp", DIGITS, 10).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dp_train(frozen, x, y, **_GOOD)
    for bad_n, bad_q in [(0, 0.1), (10, 0.0), (10, 1.5)]:
        with pytest.raises(ValueError):
            poisson_sample(bad_n, bad_q)


@pytest.mark.parametrize(
    ("n", "batch", "epochs"), [(72, 16, 5), (359, 32, 4), (90, 45, 2), (50, 7, 3)]
)
def test_privacy_plan_counts_the_steps_dp_train_takes(n: int, batch: int, epochs: int) -> None:
    """The ledger plans exactly the steps DP-SGD will take (else it refuses the last round)."""
    from fedsec.client.privacy import plan_round
    from fedsec.config import parse_config
    from fedsec.privacy.dpsgd import dp_sgd_steps

    torch.manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))
    model = make_model("mlp", (1, 8, 8), 10, seed=0)
    taken = dp_train(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch,
        lr=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    ).steps
    assert dp_sgd_steps(n, batch, epochs) == taken
    cfg = parse_config(
        {
            "data": {"num_clients": 2},
            "client": {"batch_size": batch, "local_epochs": epochs},
            "privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0},
        }
    )
    assert plan_round(cfg, n).steps == taken


@pytest.mark.parametrize("secure", [False, True])
def test_poisson_batches_are_successive_poisson_samples(secure: bool) -> None:
    """An epoch's batches in one draw: with a generator exactly the batches of successive
    poisson_sample calls; the mean batch size is q n within 5 standard errors."""
    from fedsec.privacy.poisson import poisson_batches

    n, q, steps = 200, 0.1, 400
    gen = None if secure else torch.Generator().manual_seed(3)
    batches = poisson_batches(steps, n, q, generator=gen, secure=secure)
    assert len(batches) == steps
    if not secure:
        again = torch.Generator().manual_seed(3)
        for batch in batches[:5]:
            assert torch.equal(batch, poisson_sample(n, q, generator=again))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    stderr = (n * q * (1 - q) / steps) ** 0.5
    assert abs(float(sizes.mean()) - n * q) < 5 * stderr
    assert all(torch.all(b[1:] > b[:-1]) for b in batches if len(b) > 1)
    assert poisson_batches(0, n, q) == []
    with pytest.raises(ValueError, match="steps"):
        poisson_batches(-1, n, q)


def test_poisson_batches_draw_in_bounded_chunks_with_the_same_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """steps x n uniforms grow as n^2 / batch_size: drawn in chunks, the batches stay the same."""
    from fedsec.privacy import poisson

    n, q, steps = 300, 0.05, 50
    whole = poisson.poisson_batches(steps, n, q, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(poisson, "_DRAW_CHUNK", 7 * n + 1)  # 7 rows a draw, then a short one
    chunked = poisson.poisson_batches(steps, n, q, generator=torch.Generator().manual_seed(5))
    assert len(chunked) == steps
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    assert len(poisson.poisson_batches(3, n, q, secure=True)) == 3


def test_a_huge_epoch_count_with_a_step_cap_allocates_nothing_per_epoch() -> None:
    """A server sends local_steps = 1 (the ledger sees 1 step) and epochs = 10**7: dp_train
    listed every epoch's first step before the cap applied (a list of 10**7 ints)."""
    import tracemalloc

    model = make_model("mlp", (1, 8, 8), 10, seed=0)
    x, y = _batch((1, 8, 8), 64)
    tracemalloc.start()
    try:
        result = dp_train(
            model,
            x,
            y,
            epochs=10**7,
            batch_size=16,
            lr=0.1,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            max_steps=2,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.steps == 2
    assert peak < 50 * 2**20, peak
