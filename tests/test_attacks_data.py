"""Data-poisoning attacks (label flipping, BadNets backdoor) and pixel bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsec.attacks.data_poisoning import DATA_ATTACKS, Backdoor, DataPoisoningAttack, LabelFlip
from fedsec.data import DATASETS, DatasetInfo, load_dataset
from fedsec.data.datasets import pixel_bounds
from fedsec.models import make_model
from fedsec.training import evaluate, train

DIGITS_LOW = (0.0 - 0.3053) / 0.3760
DIGITS_HIGH = (1.0 - 0.3053) / 0.3760


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, c: int = 1, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=gen(seed))


# ---- pixel bounds -------------------------------------------------------------


def test_pixel_bounds_digits_match_formula_and_data() -> None:
    low, high = pixel_bounds(DATASETS.get("digits"))
    assert low.shape == high.shape == (1, 1, 1)
    assert low.item() == pytest.approx(DIGITS_LOW, abs=1e-6)
    assert high.item() == pytest.approx(DIGITS_HIGH, abs=1e-6)
    d = load_dataset("digits")
    # Digits use the full 0..16 range, so the data reach both bounds (float32 rounding).
    assert d.train_x.min().item() == pytest.approx(low.item(), abs=1e-5)
    assert d.train_x.max().item() == pytest.approx(high.item(), abs=1e-5)


def test_pixel_bounds_per_channel_and_default() -> None:
    low, high = pixel_bounds(DATASETS.get("cifar10"))
    assert low.shape == (3, 1, 1)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    for c in range(3):
        assert low[c].item() == pytest.approx(-mean[c] / std[c], abs=1e-6)
        assert high[c].item() == pytest.approx((1 - mean[c]) / std[c], abs=1e-6)
    for name in DATASETS:
        info = DATASETS.get(name)
        assert len(info.pixel_mean) == len(info.pixel_std) == info.input_shape[0]
    plain = DatasetInfo("x", 10, (2, 4, 4), 1, 1, "unnormalised")
    low, high = pixel_bounds(plain)
    assert torch.equal(low, torch.zeros(2, 1, 1)) and torch.equal(high, torch.ones(2, 1, 1))
    bad = DatasetInfo("x", 10, (3, 4, 4), 1, 1, "bad", pixel_mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="pixel_mean"):
        pixel_bounds(bad)


# ---- label flipping -------------------------------------------------------------


def test_label_flip_source_target() -> None:
    x = images(12)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 1])
    x0, y0 = x.clone(), y.clone()
    xp, yp = LabelFlip(mode="source-target", source=1, target=7).poison(x, y, gen())
    assert yp.tolist() == [0, 7, 2, 3, 4, 5, 6, 7, 8, 9, 7, 7]
    assert torch.equal(xp, x) and xp.data_ptr() != x.data_ptr()
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched


def test_label_flip_all_to_one() -> None:
    y = torch.arange(10).repeat(3)
    _, yp = LabelFlip(mode="all-to-one", target=3).poison(images(30), y, gen())
    assert torch.equal(yp, torch.full((30,), 3))


def test_label_flip_random_is_a_consistent_derangement() -> None:
    attack = LabelFlip(mode="random", num_classes=10)
    y = torch.arange(10).repeat(5)
    _, yp = attack.poison(images(50), y, gen(3))
    assert bool((yp != y).all())  # no fixed point: every sample mislabelled
    mapping = yp[:10]
    assert sorted(mapping.tolist()) == list(range(10))  # a permutation
    assert torch.equal(yp, mapping.repeat(5))  # same class -> same wrong class
    _, again = attack.poison(images(50), y, gen(3))
    assert torch.equal(again, yp)  # deterministic given the generator
    # With 3 classes the only derangements are the two 3-cycles; both appear.
    small = LabelFlip(mode="random", num_classes=3)
    g = gen(0)
    seen = {tuple(small.permutation(g).tolist()) for _ in range(50)}
    assert seen == {(1, 2, 0), (2, 0, 1)}


def test_label_flip_validation() -> None:
    with pytest.raises(ValueError, match="mode"):
        LabelFlip(mode="swap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source and target"):
        LabelFlip(source=2, target=2)
    with pytest.raises(ValueError, match="target"):
        LabelFlip(target=10)
    with pytest.raises(ValueError, match="num_classes"):
        LabelFlip(num_classes=1)
    with pytest.raises(ValueError, match="labels"):
        LabelFlip().poison(images(2), torch.tensor([0, 10]), gen())


# ---- backdoor -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [
        ("bottom-right", (6, 7), (6, 7)),
        ("bottom-left", (6, 7), (0, 1)),
        ("top-right", (0, 1), (6, 7)),
        ("top-left", (0, 1), (0, 1)),
    ],
)
def test_backdoor_square_placement(
    position: str, rows: tuple[int, int], cols: tuple[int, int]
) -> None:
    bd = Backdoor(size=2, position=position, value=5.0)  # type: ignore[arg-type]
    mask = bd.mask(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    assert torch.equal(mask, expected)


def test_backdoor_plus_pattern() -> None:
    mask = Backdoor(pattern="plus", size=3, value=1.0).mask(8, 8)
    on = {tuple(ix) for ix in mask.nonzero().tolist()}
    # Middle row and column of the 3x3 box in rows/cols 5..7.
    assert on == {(5, 6), (6, 5), (6, 6), (6, 7), (7, 6)}
    with pytest.raises(ValueError, match="odd"):
        Backdoor(pattern="plus", size=2, value=1.0)


def test_backdoor_trigger_value_from_bounds() -> None:
    info = DATASETS.get("digits")
    bd = Backdoor(size=2, bounds=pixel_bounds(info))
    x = images(4)
    x0 = x.clone()
    xt = bd.apply_trigger(x)
    assert torch.equal(x, x0)
    mask = bd.mask(8, 8)
    assert torch.allclose(xt[:, 0][:, mask], torch.full((4, 4), DIGITS_HIGH), atol=1e-6)
    assert torch.equal(xt[:, 0][:, ~mask], x[:, 0][:, ~mask])  # the rest untouched


def test_backdoor_trigger_value_per_channel_and_fallbacks() -> None:
    low, high = pixel_bounds(DATASETS.get("cifar10"))
    x = images(3, c=3, h=32, w=32)
    xt = Backdoor(size=3, bounds=(low, high)).apply_trigger(x)
    for c in range(3):
        assert torch.equal(xt[:, c, -3:, -3:], high[c].expand(3, 3, 3))
    assert torch.equal(Backdoor(value=2.5).apply_trigger(x)[:, :, -1, -1], torch.full((3, 3), 2.5))
    # Neither bounds nor value: the per-channel maximum of the stamped data.
    xt = Backdoor().apply_trigger(x)
    per_channel_max = x.amax(dim=(0, 2, 3))
    assert torch.equal(xt[0, :, -1, -1], per_channel_max)


@pytest.mark.parametrize(("n", "fraction", "count"), [(10, 0.3, 3), (7, 0.5, 3), (9, 1.0, 9)])
def test_backdoor_poisons_exact_fraction_rounded_down(n: int, fraction: float, count: int) -> None:
    bd = Backdoor(target=0, poison_fraction=fraction, value=9.0)
    x = images(n)
    y = torch.arange(1, n + 1) % 10  # few zeros, so relabelled samples stand out
    x0, y0 = x.clone(), y.clone()
    xp, yp = bd.poison(x, y, gen(1))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    triggered = (xp[:, 0, -2:, -2:] == 9.0).all(dim=(1, 2))
    assert int(triggered.sum()) == count
    assert bool((yp[triggered] == 0).all())
    assert torch.equal(xp[~triggered], x[~triggered])  # clean samples untouched
    assert torch.equal(yp[~triggered], y[~triggered])
    xq, yq = bd.poison(x, y, gen(1))
    assert torch.equal(xq, xp) and torch.equal(yq, yp)  # deterministic


def test_triggered_test_set_excludes_target_class() -> None:
    bd = Backdoor(target=2, value=4.0)
    y = torch.tensor([2, 0, 2, 5, 1, 2])
    x = images(6)
    xt, yt = bd.triggered_test_set(x, y)
    assert xt.shape[0] == 3 and torch.equal(yt, torch.full((3,), 2))
    assert torch.equal(xt[:, 0, :6, :6], x[y != 2][:, 0, :6, :6])
    assert bool((xt[:, 0, -2:, -2:] == 4.0).all())


class _TriggerDetector(nn.Module):
    """Predicts ``target`` iff the bottom-right pixel is the trigger value and x[0, 0] > 0.

    Otherwise it predicts class 1.
    """

    def __init__(self, target: int, trigger: float) -> None:
        super().__init__()
        self.target, self.trigger = target, trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fire = (x[:, 0, -1, -1] == self.trigger) & (x[:, 0, 0, 0] > 0)
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 1] = 1.0
        logits[fire, self.target] = 2.0
        return logits


def test_attack_success_rate_on_controlled_model() -> None:
    bd = Backdoor(target=3, value=7.0)
    x = images(40, seed=5)
    y = torch.arange(40) % 10
    model = _TriggerDetector(target=3, trigger=7.0)
    keep = y != 3
    expected = float((x[keep][:, 0, 0, 0] > 0).float().mean())
    assert 0.2 < expected < 0.8  # a non-trivial rate, so the count is really checked
    assert bd.attack_success_rate(model, x, y, "cpu") == pytest.approx(expected)
    # Without the trigger the detector never fires.
    assert evaluate(model, x[keep], torch.full_like(y[keep], 3)).accuracy == 0.0
    with pytest.raises(ValueError, match="target class"):
        bd.attack_success_rate(model, x[:1], torch.tensor([3]))


def test_backdoor_validation() -> None:
    with pytest.raises(ValueError, match="poison_fraction"):
        Backdoor(poison_fraction=0.0, value=1.0)
    with pytest.raises(ValueError, match="size"):
        Backdoor(size=0, value=1.0)
    with pytest.raises(ValueError, match="position"):
        Backdoor(position="middle", value=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target"):
        Backdoor(target=-1, value=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        Backdoor(size=9, value=1.0).apply_trigger(images(1))


def test_backdoor_is_learned_on_digits() -> None:
    """End to end: 10% poisoned digits -> measured ASR 1.00, clean accuracy 0.97.

    A model trained on clean data has ASR 0.00. Margins: ASR >= 0.9, clean
    accuracy >= 0.9, clean-model ASR <= 0.1.
    """
    d = load_dataset("digits")
    bd = Backdoor(target=0, poison_fraction=0.1, bounds=pixel_bounds(d.info))
    x, y = bd.poison(d.train_x, d.train_y, gen(0))
    model = make_model("mlp", d.info.input_shape, 10, seed=0)
    train(model, x, y, epochs=10, batch_size=32, lr=0.05, momentum=0.9)
    clean = make_model("mlp", d.info.input_shape, 10, seed=0)
    train(clean, d.train_x, d.train_y, epochs=10, batch_size=32, lr=0.05, momentum=0.9)
    assert bd.attack_success_rate(model, d.test_x, d.test_y, "cpu") >= 0.9
    assert evaluate(model, d.test_x, d.test_y).accuracy >= 0.9
    assert bd.attack_success_rate(clean, d.test_x, d.test_y, "cpu") <= 0.1


# ---- registry ---------------------------------------------------------------------


def test_registry() -> None:
    assert DATA_ATTACKS.names() == ["label-flip", "backdoor"]
    attack = DATA_ATTACKS.get("label-flip")(mode="all-to-one", target=4)  # type: ignore[call-arg]
    assert isinstance(attack, DataPoisoningAttack)
    assert "all-to-one" in repr(attack)
    assert DATA_ATTACKS.get("backdoor") is Backdoor
