"""Client-level DP: local privatization of an update, and the central DP-FedAvg rule."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedsec.aggregation import Bucketing, CoordinateMedian, Krum, Mean
from fedsec.privacy import CentralDPFedAvg, clip_update, privatize_update, secure_standard_normal

D = 200_000
#: Relative tolerance on an empirical std over D = 200k draws: its standard error
#: is 1 / sqrt(2 D) = 0.16 %, so 2 % is over 12 standard errors.
STD_TOL = 0.02


def one_line(error: pytest.ExceptionInfo[ValueError]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def assert_gaussian(noise: torch.Tensor, std: float) -> None:
    """Mean ~ 0, std within 2 %, and the shape of a normal (1-sigma mass, kurtosis)."""
    noise = noise.to(torch.float64)
    n = noise.numel()
    assert abs(float(noise.mean())) < 6 * std / math.sqrt(n)
    assert float(noise.std()) == pytest.approx(std, rel=STD_TOL)
    z = noise / std
    assert float((z.abs() < 1).double().mean()) == pytest.approx(0.6827, abs=0.01)
    assert float((z**4).mean()) == pytest.approx(3.0, abs=0.15)


# ---- clip_update / privatize_update ----------------------------------------------------


def test_clip_update_bounds_the_norm() -> None:
    big = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 10
    clipped = clip_update(big, 2.5)
    assert float(clipped.norm()) <= 2.5 * (1 + 1e-6)
    assert float(clipped.norm()) == pytest.approx(2.5, rel=1e-5)
    assert torch.allclose(clipped / clipped.norm(), big / big.norm(), atol=1e-6)
    small = torch.full((10,), 0.01)
    assert torch.equal(clip_update(small, 1.0), small)
    zero = torch.zeros(5)
    assert torch.equal(clip_update(zero, 1.0), zero)


def test_privatize_update_without_noise_only_clips() -> None:
    update = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 5
    out = privatize_update(update, clip=1.0, noise_multiplier=0.0)
    assert torch.equal(out, clip_update(update, 1.0))
    assert float(out.norm()) <= 1.0 + 1e-6
    assert not torch.equal(out, update)  # the input is not modified in place ...
    assert float(update.norm()) > 1.0  # ... and keeps its norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_privatize_update_noise_std(dtype: torch.dtype) -> None:
    clip, sigma = 0.5, 1.3
    update = (torch.randn(D, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    out = privatize_update(
        update, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(3)
    )
    assert out.dtype == dtype and out.shape == update.shape
    clipped = clip_update(update, clip)
    assert float(clipped.norm()) <= clip * (1 + 1e-6)
    assert_gaussian(out - clipped, sigma * clip)
    # Same seed, same noise; another seed, other noise.
    again = privatize_update(
        update, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out, again)
    other = privatize_update(
        update, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(4)
    )
    assert not torch.equal(out, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_privatize_update_secure_noise_std(dtype: torch.dtype) -> None:
    clip, sigma = 2.0, 0.7
    update = torch.randn(D, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = privatize_update(update, clip=clip, noise_multiplier=sigma, secure=True)
    assert out.dtype == dtype and out.shape == update.shape
    assert_gaussian(out - clip_update(update, clip), sigma * clip)
    # Fresh randomness on every call.
    assert not torch.equal(
        out, privatize_update(update, clip=clip, noise_multiplier=sigma, secure=True)
    )


def test_secure_standard_normal() -> None:
    for n in (0, 1, 2, 3, 7):
        z = secure_standard_normal(n)
        assert z.shape == (n,) and z.dtype == torch.float64
        assert bool(torch.isfinite(z).all())
    z = secure_standard_normal(D + 1)
    assert_gaussian(z, 1.0)
    # The Box-Muller radius is bounded by sqrt(2 * 53 ln 2).
    assert float(z.abs().max()) <= math.sqrt(2 * 53 * math.log(2))
    with pytest.raises(ValueError):
        secure_standard_normal(-1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"clip": 0.0}, "clip"),
        ({"clip": math.inf}, "clip"),
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"secure": True, "generator": torch.Generator()}, "not both"),
        ({"update": torch.zeros(2, 3)}, "shape"),
        ({"update": torch.tensor([1.0, math.inf])}, "finite"),
        ({"update": torch.arange(3)}, "floating"),
    ],
)
def test_privatize_update_rejects_bad_parameters(kwargs: dict[str, Any], fragment: str) -> None:
    arguments: dict[str, Any] = {
        "update": torch.ones(4),
        "clip": 1.0,
        "noise_multiplier": 1.0,
    } | kwargs
    update = arguments.pop("update")
    with pytest.raises(ValueError, match=fragment) as error:
        privatize_update(update, **arguments)
    one_line(error)


# ---- CentralDPFedAvg -------------------------------------------------------------------


def clipped_mean(updates: torch.Tensor, clip: float) -> torch.Tensor:
    return torch.stack([clip_update(row, clip) for row in updates]).mean(dim=0)


def test_dp_fedavg_noise_std_is_sigma_clip_over_n() -> None:
    n, clip, sigma = 10, 0.8, 1.5
    updates = torch.randn(n, D, generator=torch.Generator().manual_seed(6)) * 0.01
    rule = CentralDPFedAvg(Mean(), clip=clip, noise_multiplier=sigma, seed=7)
    assert rule.name == "dp-fedavg"
    result = rule(updates)
    assert result.aggregate.shape == (D,) and result.aggregate.dtype == torch.float32
    assert torch.allclose(result.weights, torch.full((n,), 1 / n))
    assert rule.noise_std(result.weights) == pytest.approx(sigma * clip / n)
    assert_gaussian(result.aggregate - clipped_mean(updates, clip), sigma * clip / n)


def test_dp_fedavg_weighted_noise_covers_the_largest_share() -> None:
    n, clip, sigma = 4, 1.0, 2.0
    updates = torch.zeros(n, D, dtype=torch.float64)
    weights = torch.tensor([1.0, 1.0, 1.0, 5.0])  # largest share 5 / 8
    rule = CentralDPFedAvg(Mean(), clip=clip, noise_multiplier=sigma)
    result = rule(updates, weights)
    assert result.aggregate.dtype == torch.float64
    assert rule.noise_std(weights) == pytest.approx(sigma * clip * 5 / 8)
    assert_gaussian(result.aggregate, sigma * clip * 5 / 8)


def test_dp_fedavg_clips_each_client() -> None:
    updates = torch.tensor([[100.0, 0.0], [0.0, 0.5], [3.0, 4.0]])
    rule = CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=0.0)
    result = rule(updates)
    # Per-client clipping: [1, 0], [0, 0.5], [0.6, 0.8]; not a clipped mean.
    expected = torch.tensor([1.6, 1.3]) / 3
    assert torch.allclose(result.aggregate, expected, atol=1e-6)
    clipped = rule.clip_rows(updates)
    assert bool((clipped.norm(dim=1) <= 1.0 + 1e-6).all())
    assert torch.equal(updates, torch.tensor([[100.0, 0.0], [0.0, 0.5], [3.0, 4.0]]))


def test_dp_fedavg_refuses_non_finite_updates() -> None:
    # Every rule refuses non-finite input in one line (issue 16, case 3); the strategy
    # excludes such replies before the rule, so a round is never lost to one.
    updates = torch.tensor([[math.nan, 1.0], [math.inf, 0.0], [0.3, 0.4]])
    with pytest.raises(ValueError, match=r"non-finite values \(rows 0, 1\)") as error:
        CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=0.0)(updates)
    one_line(error)


@pytest.mark.parametrize(
    "inner",
    [
        CoordinateMedian(),
        Krum(f=1),
        Bucketing(Mean()),
        CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=1.0),
        "mean",
    ],
)
def test_dp_fedavg_refuses_non_mean_inner_rules(inner: Any) -> None:
    with pytest.raises(ValueError, match="inner rule must be mean") as error:
        CentralDPFedAvg(inner, clip=1.0, noise_multiplier=1.0)
    one_line(error)


def test_dp_fedavg_refuses_a_mean_subclass() -> None:
    class ScaledMean(Mean):
        pass

    with pytest.raises(ValueError, match="inner rule must be mean"):
        CentralDPFedAvg(ScaledMean(), clip=1.0, noise_multiplier=1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"clip": -1.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.inf},
        {"seed": -1},
        {"seed": 1.5},
    ],
)
def test_dp_fedavg_rejects_bad_parameters(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"clip": 1.0, "noise_multiplier": 1.0} | kwargs
    with pytest.raises(ValueError) as error:
        CentralDPFedAvg(Mean(), **arguments)
    one_line(error)


def test_dp_fedavg_state_round_trip() -> None:
    updates = torch.randn(5, 1000, generator=torch.Generator().manual_seed(8))
    rule = CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=1.0, seed=3)
    first = rule(updates).aggregate
    state = rule.state_dict()
    assert int(state["counter"]) == 1
    second = rule(updates).aggregate
    assert not torch.equal(first, second)  # fresh noise every round

    resumed = CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=1.0, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(updates).aggregate, second)
    # Same seed from scratch reproduces the first round; another seed does not.
    assert torch.equal(
        CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=1.0, seed=3)(updates).aggregate, first
    )
    assert not torch.equal(
        CentralDPFedAvg(Mean(), clip=1.0, noise_multiplier=1.0, seed=4)(updates).aggregate, first
    )
