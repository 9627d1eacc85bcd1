"""Model-poisoning attacks: each against its paper formula on crafted inputs."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedsec.aggregation import AggregationResult, Rule, make
from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning import (
    ALIE,
    IPM,
    MAX_RULE_CALLS,
    MODEL_ATTACKS,
    FangKrum,
    FangTrimmedMean,
    GaussianNoise,
    Mimic,
    MinMax,
    MinSum,
    Scaling,
    SignFlip,
    halving_search,
    scan_and_refine,
)

# ---- helpers ----------------------------------------------------------------------


def make_view(
    own: torch.Tensor,
    benign: torch.Tensor | None = None,
    n: int | None = None,
    rule: Rule | None = None,
    seed: int = 0,
) -> AdversaryView:
    if n is None:
        n = own.shape[0] + (benign.shape[0] if benign is not None else 9)
    return AdversaryView(
        own=own,
        benign=benign,
        num_clients=n,
        rule=rule,
        generator=torch.Generator().manual_seed(seed),
    )


def updates(rows: int, d: int, seed: int, mean: float = 0.5, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + spread * torch.randn(rows, d, generator=g, dtype=torch.float64)


class CountingRule(Rule):
    """Delegates to an inner rule and counts the calls (to bound adaptive probing)."""

    name = "counting"

    def __init__(self, inner: Rule) -> None:
        self.inner = inner
        self.calls = 0

    def check(self, n: int) -> None:
        self.inner.check(n)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, **context: Any
    ) -> AggregationResult:
        self.calls += 1
        return self.inner(updates, weights)


def sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared distances of each row of a to each row of b, plain NumPy float64."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)


# ---- registry and parameters ---------------------------------------------------------


def test_registry_has_all_attacks() -> None:
    assert MODEL_ATTACKS.names() == [
        "sign-flip",
        "gaussian",
        "scaling",
        "alie",
        "ipm",
        "min-max",
        "min-sum",
        "fang-krum",
        "fang-trimmed-mean",
        "mimic",
        "abstain",
        # discovered: appended after the built-in ones, in module order
        "decorrelated",
        "fltrust-adaptive",
    ]
    for name in MODEL_ATTACKS:
        cls = MODEL_ATTACKS.get(name)
        assert issubclass(cls, ModelPoisoningAttack) and cls.name == name
    assert [n for n in MODEL_ATTACKS if not MODEL_ATTACKS.get(n).collusion] == [
        "sign-flip",
        "gaussian",
        "scaling",
    ]


@pytest.mark.parametrize(
    ("factory", "param"),
    [
        (lambda: SignFlip(scale=0), "scale"),
        (lambda: GaussianNoise(sigma=-1), "sigma"),
        (lambda: GaussianNoise(additive=1), "additive"),  # type: ignore[arg-type]
        (lambda: Scaling(gamma=float("inf")), "gamma"),
        (lambda: Scaling(server_lr=0), "server_lr"),
        (lambda: ALIE(z=True), "z"),  # type: ignore[arg-type]
        (lambda: ALIE(direction="up"), "direction"),  # type: ignore[arg-type]
        (lambda: IPM(epsilon=-0.1), "epsilon"),
        (lambda: MinMax(direction="random"), "direction"),  # type: ignore[arg-type]
        (lambda: MinSum(tau=0), "tau"),
        (lambda: MinMax(gamma_init="10"), "gamma_init"),  # type: ignore[arg-type]
        (lambda: FangKrum(threshold=0), "threshold"),
        (lambda: FangKrum(max_rule_calls=0), "max_rule_calls"),
        (lambda: MinMax(max_rule_calls=26), "max_rule_calls"),
        (lambda: FangTrimmedMean(b=1.0), "b"),
        (lambda: Mimic(omniscient="yes"), "omniscient"),  # type: ignore[arg-type]
    ],
)
def test_invalid_parameters_raise_one_line(factory: Any, param: str) -> None:
    with pytest.raises(ValueError, match=param) as info:
        factory()
    assert "\n" not in str(info.value)


# ---- non-colluding attacks ------------------------------------------------------------


def test_sign_flip() -> None:
    own = updates(3, 7, seed=1)
    out = SignFlip(scale=2.5).craft(make_view(own))
    torch.testing.assert_close(out, -2.5 * own, rtol=0, atol=0)
    one = SignFlip().perturb(own[0], torch.Generator())
    torch.testing.assert_close(one, -own[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="sign-flip: update must be a floating"):
        SignFlip().perturb(own, torch.Generator())


def test_gaussian_replaces_or_adds_seeded_noise() -> None:
    own = updates(3, 5, seed=2).float()
    expected = 0.5 * torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    out = GaussianNoise(sigma=0.5).craft(make_view(own, seed=0))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.dtype == torch.float32
    out = GaussianNoise(sigma=0.5, additive=True).craft(make_view(own, seed=0))
    torch.testing.assert_close(out, own + expected, rtol=0, atol=0)
    # The noise has the requested spread: 20000 draws, std within 3% of sigma.
    wide = GaussianNoise(sigma=3.0).perturb(torch.zeros(20_000), torch.Generator().manual_seed(5))
    assert abs(float(wide.std()) - 3.0) < 0.09 and abs(float(wide.mean())) < 0.1


def test_scaling_default_gamma_is_n_over_eta() -> None:
    own = updates(2, 4, seed=3)
    out = Scaling(server_lr=0.5).craft(make_view(own, n=10))
    torch.testing.assert_close(out, 20.0 * own, rtol=0, atol=0)
    assert Scaling(server_lr=0.5).factor(10) == 20.0
    torch.testing.assert_close(Scaling(gamma=3.0).craft(make_view(own, n=10)), 3.0 * own)
    torch.testing.assert_close(
        Scaling().perturb(own[0], torch.Generator(), num_clients=8), 8.0 * own[0]
    )
    with pytest.raises(ValueError, match=r"gamma=None needs the round's number of clients"):
        Scaling().perturb(own[0], torch.Generator())


# ---- ALIE and IPM ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(50, 10), (25, 5), (20, 4), (12, 3), (10, 2)])
def test_alie_z_follows_the_paper(n: int, m: int) -> None:
    s = math.floor(n / 2 + 1) - m
    assert ALIE.z_max(n, m) == pytest.approx(norm.ppf((n - m - s) / (n - m)), abs=1e-12)


def test_alie_is_mu_minus_z_sigma_per_coordinate() -> None:
    n, m = 50, 10
    own = updates(m, 6, seed=4)
    out = ALIE().craft(make_view(own, n=n))
    z = norm.ppf(0.6)  # s = 26 - 10 = 16, (40 - 16) / 40 = 0.6
    x = own.numpy()
    expected = x.mean(axis=0) - z * x.std(axis=0, ddof=1)  # unbiased std
    np.testing.assert_allclose(out.numpy(), np.tile(expected, (m, 1)), rtol=1e-12, atol=1e-12)
    plus = ALIE(z=1.5, direction="plus").craft(make_view(own, n=n))
    expected = x.mean(axis=0) + 1.5 * x.std(axis=0, ddof=1)
    np.testing.assert_allclose(plus[0].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_alie_omniscient_uses_the_honest_updates() -> None:
    own, benign = updates(1, 6, seed=5), updates(9, 6, seed=6)
    out = ALIE(omniscient=True).craft(make_view(own, benign))
    z = ALIE.z_max(10, 1)
    expected = benign.mean(0) - z * benign.std(0)
    torch.testing.assert_close(out, expected[None], rtol=1e-12, atol=1e-12)


def test_alie_check_errors() -> None:
    with pytest.raises(ValueError, match=r"colluder knowledge needs m >= 2 .* got m=1") as info:
        ALIE().check(1, 10)
    assert "\n" not in str(info.value)
    ALIE(omniscient=True).check(1, 10)  # sigma from the 9 honest updates
    # Majority malicious: s = 6 - 6 = 0, (10 - 6 - 0) / (10 - 6) = 1.
    with pytest.raises(ValueError, match=r"z is undefined for n=10, m=6: .* = 1 with s = .* = 0"):
        ALIE().check(6, 10)
    ALIE(z=1.0).check(6, 10)  # a fixed z needs no formula
    with pytest.raises(ValueError, match="alie needs at least 1 malicious"):
        ALIE().check(0, 10)
    with pytest.raises(ValueError, match=r"h >= 2 honest updates .* n=3, m=2"):
        ALIE(z=1.0, omniscient=True).check(2, 3)


def test_ipm_is_minus_epsilon_times_honest_mean() -> None:
    own, benign = updates(3, 5, seed=7), updates(7, 5, seed=8)
    out = IPM(epsilon=0.1).craft(make_view(own, benign))
    torch.testing.assert_close(out, (-0.1 * benign.mean(0)).expand(3, -1))
    out = IPM(epsilon=100).craft(make_view(own))  # colluders: their own mean
    torch.testing.assert_close(out, (-100 * own.mean(0)).expand(3, -1))


# ---- Min-Max and Min-Sum -------------------------------------------------------------------


def test_halving_search_finds_the_boundary() -> None:
    tau = 1e-5
    found = halving_search(lambda g: g <= 3.3, 10.0, tau, 64)
    assert 3.3 - 2 * tau <= found <= 3.3
    assert halving_search(lambda g: False, 10.0, tau, 64) == 0.0
    # The range is (0, 2 * gamma_init): always succeeding ends just under 20.
    assert 20 - 2 * tau <= halving_search(lambda g: True, 10.0, tau, 64) < 20


def closed_form_terms(
    x: np.ndarray, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    mu = x.mean(axis=0)
    a = ((mu - x) ** 2).sum(axis=1)
    b = (mu - x) @ p
    return a, b, float(p @ p), sq_dist(x, x)


def perturbation(x: np.ndarray, direction: str) -> np.ndarray:
    mu = x.mean(axis=0)
    if direction == "unit":
        return -mu / np.linalg.norm(mu)
    if direction == "std":
        return -x.std(axis=0, ddof=1)
    return -np.sign(mu)


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_min_max_gamma_is_the_largest_within_the_bound(direction: str) -> None:
    own, benign = updates(4, 30, seed=9), updates(16, 30, seed=10)
    attack = MinMax(direction=direction)  # type: ignore[arg-type]
    out = attack.craft(make_view(own, benign))
    x, mal = benign.numpy(), out[0].numpy()
    assert (out == out[0]).all()
    bound = sq_dist(x, x).max()
    # Stated margin: 1e-9 relative for float64 rounding of the expanded distances.
    assert sq_dist(mal[None], x).max() <= bound * (1 + 1e-9)
    gamma = attack.last_gamma
    assert gamma is not None and gamma > 0
    p = perturbation(x, direction)
    np.testing.assert_allclose(mal, x.mean(axis=0) + gamma * p, rtol=1e-12, atol=1e-12)
    # Closed form: the smallest positive root over i of a_i + 2 g b_i + g^2 c = bound.
    a, b, c, _ = closed_form_terms(x, p)
    roots = (-b + np.sqrt(b**2 - c * (a - bound))) / c
    assert roots.min() - 4e-5 <= gamma <= roots.min()  # search tolerance tau = 1e-5
    larger = x.mean(axis=0) + gamma * (1 + 1e-4) * p
    assert sq_dist(larger[None], x).max() > bound


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_min_sum_gamma_is_the_largest_within_the_bound(direction: str) -> None:
    own, benign = updates(4, 30, seed=11), updates(16, 30, seed=12)
    attack = MinSum(direction=direction)  # type: ignore[arg-type]
    out = attack.craft(make_view(own, benign))
    x, mal = benign.numpy(), out[0].numpy()
    bound = sq_dist(x, x).sum(axis=1).max()
    assert sq_dist(mal[None], x).sum() <= bound * (1 + 1e-9)
    gamma = attack.last_gamma
    assert gamma is not None
    p = perturbation(x, direction)
    a, _, c, _ = closed_form_terms(x, p)
    exact = math.sqrt((bound - a.sum()) / (len(x) * c))  # sum_i b_i = 0 around the mean
    assert exact - 4e-5 <= gamma <= exact
    larger = x.mean(axis=0) + gamma * (1 + 1e-4) * p
    assert sq_dist(larger[None], x).sum() > bound


def test_min_max_with_colluder_knowledge_uses_own_updates() -> None:
    own = updates(5, 12, seed=13)
    out = MinMax().craft(make_view(own, n=20))
    x = own.numpy()
    assert sq_dist(out[:1].numpy(), x).max() <= sq_dist(x, x).max() * (1 + 1e-9)
    assert out.shape == (5, 12)


def test_adaptive_min_max_moves_the_median_further_than_the_mean_update() -> None:
    own, benign = updates(5, 40, seed=14), updates(15, 40, seed=15)
    rule = CountingRule(make("median"))
    attack = MinMax()
    out = attack.craft(make_view(own, benign, rule=rule))
    assert 2 <= rule.calls <= MAX_RULE_CALLS
    mu = benign.mean(0)
    median = make("median")
    attacked = median(torch.cat([out, benign])).aggregate
    baseline = median(torch.cat([mu.expand(5, -1), benign])).aggregate  # gamma = 0
    # The tailored update shifts the median at least 1.5x as far as sending the mean.
    assert float((attacked - mu).norm()) > 1.5 * float((baseline - mu).norm())


def test_scan_and_refine_finds_a_peak_below_gamma_init_within_the_call_budget() -> None:
    # Krum-like objective: grows with gamma until the update is rejected at 1.3.
    calls: list[float] = []

    def objective(gamma: float) -> float:
        calls.append(gamma)
        return gamma if gamma <= 1.3 else 0.5

    found = scan_and_refine(objective, 10.0, 1e-5, 25)
    assert len(calls) == 25 and len(set(calls)) == 25  # budget used, nothing twice
    assert 1.25 <= found <= 1.3  # grid point 1.25, refined towards the cliff
    # A plateau keeps the smallest gamma reaching it; a monotone one goes to 2 * gamma_init.
    assert scan_and_refine(lambda g: min(g, 0.5), 10.0, 1e-5, 25) == 10.0 / 2**4
    assert 19.9 < scan_and_refine(lambda g: g, 10.0, 1e-5, 25) < 20.0
    assert scan_and_refine(lambda g: -g, 10.0, 1e-5, 25) == 0.0


@pytest.mark.parametrize("attack", [MinSum(max_rule_calls=6), FangKrum(max_rule_calls=2)])
def test_adaptive_rule_calls_respect_the_budget(attack: ModelPoisoningAttack) -> None:
    own, benign = updates(3, 20, seed=34), updates(9, 20, seed=35)
    rule = CountingRule(make("multi-krum", f=3))
    attack.craft(make_view(own, benign, rule=rule))
    assert 1 <= rule.calls <= attack.max_rule_calls  # type: ignore[attr-defined]


def test_adaptive_min_max_against_krum_keeps_the_malicious_update_selected() -> None:
    own, benign = updates(5, 40, seed=14), updates(15, 40, seed=15)
    krum = make("krum", f=5)
    attack = MinMax()
    out = attack.craft(make_view(own, benign, rule=krum))
    result = krum(torch.cat([out, benign]))
    assert float(result.weights[:5].sum()) == 1.0
    # Selected and moved: at least 0.5 (it is ~7.7 here; 0 at gamma = 0).
    assert float((result.aggregate - benign.mean(0)).norm()) > 0.5
    assert attack.last_gamma is not None and attack.last_gamma < 10.0


def test_adaptive_probing_leaves_a_stateful_rule_unchanged() -> None:
    own, benign = updates(3, 10, seed=16), updates(9, 10, seed=17)
    rule = make("centered-clipping", tau=1.0)
    rule(benign)  # give it a centre
    before = {k: v.clone() for k, v in rule.state_dict().items()}
    MinSum().craft(make_view(own, benign, rule=rule))
    after = rule.state_dict()
    assert before.keys() == after.keys() == {"center"}
    torch.testing.assert_close(after["center"], before["center"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("rule", "omniscient"),
    # The stack has n = 12 rows (colluders model the n - m honest ones): Krum with
    # f = 5 needs n > 12.
    [(make("fltrust"), True), (make("krum", f=5), False)],
    ids=["needs-context", "rejects-stack-size"],
)
def test_adaptive_falls_back_to_agnostic_when_the_rule_cannot_be_probed(
    rule: Rule, omniscient: bool
) -> None:
    own, benign = updates(3, 10, seed=18), updates(9, 10, seed=19)
    view_benign = benign if omniscient else None
    adaptive = MinMax().craft(make_view(own, view_benign, n=12, rule=rule))
    agnostic = MinMax().craft(make_view(own, view_benign, n=12))
    torch.testing.assert_close(adaptive, agnostic, rtol=0, atol=0)


# ---- Fang et al. -------------------------------------------------------------------------


def krum_example() -> tuple[torch.Tensor, torch.Tensor]:
    # Honest updates spread widely around a small mean: a point near the origin
    # is closer to them than they are to each other, so Krum can be fooled.
    return updates(3, 50, seed=20, mean=0.1), updates(9, 50, seed=21, mean=0.1)


def test_fang_krum_makes_krum_select_a_malicious_update() -> None:
    own, benign = krum_example()
    m, d = 3, 50
    attack = FangKrum(epsilon=0.01)
    out = attack.craft(make_view(own, benign))
    lam = attack.last_lambda
    assert lam is not None and lam > attack.threshold
    s = torch.sign(benign.mean(0))
    torch.testing.assert_close(out[0], -lam * s, rtol=0, atol=0)
    assert ((out[1:] - out[0]).norm(dim=1) <= 0.01).all()
    chosen = make("krum", f=m)(torch.cat([out, benign])).weights
    assert float(chosen[:m].sum()) == 1.0
    # The halving stops at the first success: twice lambda is not selected (or the bound).
    bound = FangKrum.lambda_bound(benign, 12, m)
    if lam * 2 <= bound:
        doubled = out - lam * s  # each malicious row moves by another -lam * s
        chosen = make("krum", f=m)(torch.cat([doubled, benign])).weights
        assert float(chosen[:m].sum()) == 0.0
    assert lam <= bound and d == out.shape[1]


def test_fang_krum_lambda_bound_matches_the_paper() -> None:
    benign = updates(9, 20, seed=22)
    n, m, d = 12, 3, 20
    x = benign.numpy()
    dist = np.sqrt(sq_dist(x, x))
    k = n - m - 2  # 7 nearest of the 8 other benign updates
    nearest = np.sort(dist, axis=1)[:, 1 : k + 1].sum(axis=1)
    expected = nearest.min() / ((n - 2 * m - 1) * math.sqrt(d)) + np.linalg.norm(
        x, axis=1
    ).max() / math.sqrt(d)
    assert FangKrum.lambda_bound(benign, n, m) == pytest.approx(expected, rel=1e-12)


def test_fang_krum_adaptive_with_krum_matches_the_closed_form_test() -> None:
    own, benign = krum_example()
    plain, adaptive = FangKrum(), FangKrum()
    out = plain.craft(make_view(own, benign))
    rule = CountingRule(make("krum", f=3))
    out_adaptive = adaptive.craft(make_view(own, benign, rule=rule))
    assert plain.last_lambda == adaptive.last_lambda
    torch.testing.assert_close(out_adaptive, out, rtol=0, atol=0)
    assert 1 <= rule.calls <= MAX_RULE_CALLS


def test_fang_krum_falls_back_to_threshold() -> None:
    # Tight honest cluster far from the origin: no lambda makes Krum pick -lambda * s.
    own, benign = updates(3, 20, seed=23, spread=0.01), updates(9, 20, seed=24, spread=0.01)
    attack = FangKrum(threshold=1e-3)
    out = attack.craft(make_view(own, benign))
    assert attack.last_lambda == 1e-3
    torch.testing.assert_close(out[0], -1e-3 * torch.sign(benign.mean(0)), rtol=0, atol=0)


def test_fang_krum_check() -> None:
    with pytest.raises(ValueError, match=r"n > 2m \+ 2 \(Krum with f = m\), got n=8, m=3"):
        FangKrum().check(3, 8)
    FangKrum().check(3, 9)


def test_fang_trimmed_mean_values_lie_in_the_stated_intervals() -> None:
    # Columns: (s=+1, w_min>0), (s=+1, w_min<0), (s=-1, w_max>0), (s=-1, w_max<0), (s=0).
    benign = torch.tensor(
        [
            [1.0, -1.0, -3.0, -4.0, 1.0],
            [2.0, 3.0, 1.0, -2.0, -1.0],
            [3.0, 4.0, -1.0, -3.0, 0.0],
        ],
        dtype=torch.float64,
    )
    own = torch.zeros(50, 5, dtype=torch.float64)
    out = FangTrimmedMean(b=2.0).craft(make_view(own, benign, n=53))
    lows = torch.tensor([0.5, -2.0, 1.0, -2.0, 0.0], dtype=torch.float64)
    highs = torch.tensor([1.0, -1.0, 2.0, -1.0, 0.0], dtype=torch.float64)
    assert ((out >= lows) & (out <= highs)).all()
    # Each malicious client draws its own values: 50 draws cover most of each interval.
    spread = (out.amax(0) - out.amin(0))[:4] / (highs - lows)[:4]
    assert (spread > 0.8).all()


def test_fang_trimmed_mean_pushes_against_the_honest_direction() -> None:
    benign = updates(16, 200, seed=25, mean=0.0)
    out = FangTrimmedMean().craft(make_view(updates(4, 200, seed=26), benign))
    s = torch.sign(benign.mean(0))
    assert ((out * s) < (benign * s).amin(0) + 1e-12).all()  # beyond every honest value


# ---- Mimic --------------------------------------------------------------------------------


def test_mimic_copies_the_honest_update_furthest_along_the_top_direction() -> None:
    benign = updates(10, 25, seed=27, spread=0.1)
    direction = torch.zeros(25, dtype=torch.float64)
    direction[3] = 1.0
    benign[6] += 2.0 * direction  # clear top principal direction, client 6 on its far end
    benign[2] -= 1.0 * direction
    attack = Mimic(omniscient=True)
    out = attack.craft(make_view(updates(2, 25, seed=28), benign))
    centred = benign - benign.mean(0)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    expected = int(torch.argmax((centred @ v).abs()))
    assert attack.target == expected == 6
    torch.testing.assert_close(out, benign[6].expand(2, -1), rtol=0, atol=0)
    # i* is kept: the next round copies client 6 again, whatever the updates are.
    later = updates(10, 25, seed=29)
    torch.testing.assert_close(attack.craft(make_view(updates(2, 25, seed=30), later))[0], later[6])
    restored = Mimic(omniscient=True)
    restored.load_state_dict(attack.state_dict())
    assert restored.target == 6
    assert Mimic(omniscient=True).state_dict()["target"] == -1


def test_mimic_needs_omniscience() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape('mimic needs omniscient knowledge (attack.knowledge = "omniscient")'),
    ):
        Mimic().check(2, 10)
    with pytest.raises(ValueError, match="mimic needs the honest updates"):
        Mimic(omniscient=True).craft(make_view(updates(2, 5, seed=31), n=10))


# ---- properties shared by all attacks -------------------------------------------------------


def all_attacks() -> list[ModelPoisoningAttack]:
    return [
        SignFlip(),
        GaussianNoise(),
        Scaling(),
        ALIE(),
        IPM(),
        MinMax(),
        MinSum(direction="sign"),
        FangKrum(),
        FangTrimmedMean(),
        Mimic(omniscient=True),
    ]


@pytest.mark.parametrize("attack", all_attacks(), ids=lambda a: a.name)
@pytest.mark.parametrize("adaptive", [False, True])
def test_deterministic_shape_dtype_and_inputs_untouched(
    attack: ModelPoisoningAttack, adaptive: bool
) -> None:
    own, benign = updates(3, 16, seed=32).float(), updates(9, 16, seed=33).float()
    own_copy, benign_copy = own.clone(), benign.clone()
    rule = make("trimmed-mean", beta=0.25) if adaptive else None

    def run(target: ModelPoisoningAttack) -> torch.Tensor:
        return target.craft(make_view(own, benign, rule=rule, seed=7))

    first = run(attack)
    second = run(type(attack)(**{k: v for k, v in vars(attack).items() if not k.startswith("_")}))
    assert first.shape == (3, 16) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(own, own_copy, rtol=0, atol=0)
    torch.testing.assert_close(benign, benign_copy, rtol=0, atol=0)


@pytest.mark.parametrize("attack", all_attacks(), ids=lambda a: a.name)
def test_check_rejects_no_honest_clients(attack: ModelPoisoningAttack) -> None:
    with pytest.raises(ValueError, match=r"got 10 malicious of 10|n=10, m=10") as info:
        attack.check(10, 10)
    assert "\n" not in str(info.value)
