"""Gradient inversion audit: metrics, label recovery, reconstruction and the protections.

Scenario: the server holds the ``mlp`` global model of the first round (seed 0,
untrained), a client takes one SGD step (lr 0.1) on one digit of the training
pool, and the server inverts the update. The "random-guess level" of a digit is
:func:`random_guess_psnr` against the 360 held-out test digits (mean over the
pool, in pixel space): about 8.3-9.4 dB for the digits used here. A protection
"works" when the best reconstruction stays within ``MARGIN_DB`` of it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from fedsec.audit.inversion import (
    InversionResult,
    Update,
    bucket_sums,
    client_update,
    dp_sgd_update,
    from_pixels,
    invert_update,
    noise_multiplier_for,
    psnr,
    random_guess_psnr,
    recover_label,
    ssim,
    sum_updates,
    to_pixels,
)
from fedsec.data import SplitData, load_dataset
from fedsec.data.datasets import pixel_bounds
from fedsec.models import make_model
from fedsec.privacy.accounting import epsilon_spent, solve_noise_multiplier

LR = 0.1
#: A protection holds when the best PSNR is at most random guess + this.
MARGIN_DB = 1.0
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the tensors are tiny, and on a busy 2-core machine two
    threads made this module 6x slower (54 s instead of 9 s)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def digits() -> SplitData:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model("mlp", SHAPE, 10, seed=0)


def bounds(data: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
    return pixel_bounds(data.info)


def one(data: SplitData, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return data.train_x[i : i + 1], data.train_y[i : i + 1]


def score(data: SplitData, original: torch.Tensor, image: torch.Tensor) -> tuple[float, float]:
    o, r = to_pixels(original, data.info), to_pixels(image, data.info)
    return psnr(o, r, 1.0), ssim(o, r, 1.0)


def flat(update: Update) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in update.values()])


# ---- metrics ---------------------------------------------------------------------


def test_identical_images_have_infinite_psnr_and_unit_ssim() -> None:
    img = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert psnr(img, img.clone(), 1.0) == math.inf
    assert ssim(img, img.clone(), 1.0) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_has_known_psnr_and_ssim() -> None:
    # PSNR = 10 log10(1 / 0.1^2) = 20 dB exactly, for any image.
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(1, 8, 8, generator=gen, dtype=torch.float64) * 0.8
    assert psnr(img, img + 0.1, 1.0) == pytest.approx(20.0, abs=1e-9)
    # Constant a = 0.3 vs a + c = 0.4: no variance, so SSIM is the luminance term
    # (2 a (a + c) + C1) / (a^2 + (a + c)^2 + C1) with C1 = (0.01)^2.
    flat_img = torch.full((1, 8, 8), 0.3, dtype=torch.float64)
    expected = (2 * 0.3 * 0.4 + 1e-4) / (0.3**2 + 0.4**2 + 1e-4)
    assert ssim(flat_img, flat_img + 0.1, 1.0) == pytest.approx(expected, abs=1e-6)
    # data_range scales both: the same images in 0..255 units give the same values.
    assert psnr(flat_img * 255, (flat_img + 0.1) * 255, 255.0) == pytest.approx(20.0, abs=1e-9)
    assert ssim(flat_img * 255, (flat_img + 0.1) * 255, 255.0) == pytest.approx(expected, abs=1e-6)


def test_noise_lowers_psnr_and_ssim(digits: SplitData) -> None:
    img = to_pixels(digits.train_x[0], digits.info)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(img.shape, generator=gen)
    scores = [
        (psnr(img, img + s * noise, 1.0), ssim(img, img + s * noise, 1.0)) for s in (0.02, 0.1, 0.3)
    ]
    assert scores[0][0] > scores[1][0] > scores[2][0]
    assert 1.0 > scores[0][1] > scores[1][1] > scores[2][1]
    # The inverted digit anti-correlates with the original: structure term < 0.
    assert ssim(img, 1.0 - img, 1.0) < 0.0


def test_pixel_conversion_round_trips_to_unit_range(digits: SplitData) -> None:
    pixels = to_pixels(digits.train_x, digits.info)
    assert pixels.min().item() == pytest.approx(0.0, abs=1e-6)
    assert pixels.max().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(from_pixels(pixels, digits.info), digits.train_x)


def test_random_guess_level_of_digits(digits: SplitData) -> None:
    levels = [random_guess_psnr(digits.train_x[i], digits.test_x, digits.info) for i in range(5)]
    # Typical 8x8 digits differ by ~0.35 RMS in [0, 1] pixels: ~9 dB.
    assert all(7.0 < v < 11.0 for v in levels), levels


# ---- updates and labels ----------------------------------------------------------


def test_client_update_is_one_sgd_step_and_leaves_model(
    digits: SplitData, model: nn.Module
) -> None:
    x, y = digits.train_x[:4], digits.train_y[:4]
    before = copy.deepcopy(model.state_dict())
    update = client_update(model, x, y, lr=LR)
    stepped = copy.deepcopy(model)
    opt = torch.optim.SGD(stepped.parameters(), lr=LR)
    nn.functional.cross_entropy(stepped(x), y).backward()
    opt.step()
    for name, p in stepped.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], update[name], atol=1e-7, rtol=1e-5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_recover_label_from_single_example_updates(digits: SplitData, model: nn.Module) -> None:
    for i in range(12):  # labels 3, 9, 1, 3, 1, 9, 4, 4, 2, 8, 3, 5
        x, y = one(digits, i)
        label = int(y)
        update = client_update(model, x, y, lr=LR)
        grads = {name: -v / LR for name, v in update.items()}
        assert recover_label(update, model) == label
        assert recover_label(flat(update), model) == label
        assert recover_label(update, model, kind="update") == label
        assert recover_label(grads, model, kind="gradient") == label
        assert recover_label(flat(grads), model) == label


def test_recover_label_bias_free_last_layer(digits: SplitData) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10, bias=False))
    for i in range(6):
        x, y = one(digits, i)
        assert recover_label(client_update(net, x, y, lr=LR), net) == int(y)


def test_dp_sgd_update_clips_and_adds_calibrated_noise(digits: SplitData, model: nn.Module) -> None:
    x, y = digits.train_x[:3], digits.train_y[:3]
    # No noise and a bound above every gradient norm: plain SGD.
    plain = dp_sgd_update(model, x, y, lr=LR, noise_multiplier=0.0, max_grad_norm=1e6)
    for name, value in client_update(model, x, y, lr=LR).items():
        torch.testing.assert_close(plain[name], value, atol=1e-6, rtol=1e-4)
    # One example clipped to C = 0.5 (its gradient norm is about 3.3).
    xi, yi = one(digits, 0)
    clipped = flat(dp_sgd_update(model, xi, yi, lr=1.0, noise_multiplier=0.0, max_grad_norm=0.5))
    assert clipped.norm().item() == pytest.approx(0.5, rel=1e-4)
    # Noise std sigma * C / B on each of the ~17k coordinates, within 3 %.
    noisy = dp_sgd_update(
        model,
        x,
        y,
        lr=1.0,
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    clean = dp_sgd_update(model, x, y, lr=1.0, noise_multiplier=0.0, max_grad_norm=0.5)
    assert (flat(noisy) - flat(clean)).std().item() == pytest.approx(2.0 * 0.5 / 3, rel=0.03)


def test_noise_multiplier_for_uses_the_rdp_accountant() -> None:
    sigma = noise_multiplier_for(8.0, 1e-5)
    assert sigma == solve_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0, steps=1
    )
    assert 7.9 <= epsilon_spent(noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=1e-5) <= 8.0
    assert noise_multiplier_for(1.0, 1e-5) > noise_multiplier_for(8.0, 1e-5, steps=1)


def test_sum_and_bucket_sums(digits: SplitData, model: nn.Module) -> None:
    ups = [client_update(model, *one(digits, i), lr=LR) for i in range(5)]
    total = sum_updates(ups)
    torch.testing.assert_close(flat(total), sum(flat(u) for u in ups))
    buckets = bucket_sums(ups, 2)
    assert len(buckets) == 3  # 2 + 2 + 1
    torch.testing.assert_close(flat(buckets[1]), flat(ups[2]) + flat(ups[3]))
    torch.testing.assert_close(flat(buckets[2]), flat(ups[4]))
    assert all(torch.equal(flat(b), flat(u)) for b, u in zip(bucket_sums(ups, 1), ups, strict=True))


# ---- reconstruction --------------------------------------------------------------


def test_unprotected_single_example_update_is_reconstructed(
    digits: SplitData, model: nn.Module
) -> None:
    # Issue requirement: PSNR >= 20 dB. Measured with the defaults (200 steps):
    # 46-70 dB, SSIM >= 0.98, on the first 20 digits (50-60 dB on these 5);
    # the random guess is 8.3-9.4 dB.
    before = copy.deepcopy(model.state_dict())
    for i in range(5):
        x, y = one(digits, i)
        result = invert_update(
            model,
            client_update(model, x, y, lr=LR),
            input_shape=SHAPE,
            num_classes=10,
            lr=LR,
            bounds=bounds(digits),
        )
        assert isinstance(result, InversionResult)
        assert result.images.shape == (1, *SHAPE)
        assert result.labels.tolist() == y.tolist()  # recovered, not given
        value, structure = score(digits, x[0], result.images[0])
        assert value >= 20.0, (i, value)
        assert structure >= 0.9, (i, structure)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_inversion_is_deterministic_for_a_seed(digits: SplitData, model: nn.Module) -> None:
    update = client_update(model, *one(digits, 0), lr=LR)
    kwargs = {"input_shape": SHAPE, "num_classes": 10, "lr": LR, "steps": 15}
    a = invert_update(model, update, seed=3, **kwargs)  # type: ignore[arg-type]
    b = invert_update(model, update, seed=3, **kwargs)  # type: ignore[arg-type]
    c = invert_update(model, update, seed=4, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(a.images, b.images) and a.loss == b.loss
    assert not torch.equal(a.images, c.images)


def test_dp_sgd_at_epsilon_8_falls_to_random_guess(digits: SplitData, model: nn.Module) -> None:
    # One DP-SGD step, sample rate 1, (8, 1e-5)-DP: sigma ~ 0.64, C = 1 (the
    # gradient norms are ~3, so clipping is active; the signal-to-noise ratio
    # does not depend on C). The attacker is given the true label and keeps the
    # best of 3 restarts. Measured: best 6.0-7.0 dB vs random guess 8.3-9.4 dB.
    sigma = noise_multiplier_for(8.0, 1e-5, steps=1, sample_rate=1.0)
    for i in range(5):
        x, y = one(digits, i)
        update = dp_sgd_update(
            model,
            x,
            y,
            lr=LR,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(i),
        )
        best = max(
            score(
                digits,
                x[0],
                invert_update(
                    model,
                    update,
                    input_shape=SHAPE,
                    num_classes=10,
                    lr=LR,
                    labels=y,
                    seed=seed,
                    bounds=bounds(digits),
                ).images[0],
            )[0]
            for seed in range(3)
        )
        level = random_guess_psnr(x[0], digits.test_x, digits.info)
        assert best <= level + MARGIN_DB, (i, best, level)


@pytest.fixture(scope="module")
def secure_sum_attack(digits: SplitData, model: nn.Module) -> dict[str, list[float]]:
    """Best PSNR per original when the server sees only the sum of 5 clients' updates.

    Two attacks on the sum: one image with the recovered label (the server
    treats the sum as one update), and 5 images given the 5 true labels, with
    twice the default steps (a batch is a harder problem: 200 steps reach only
    22.5 dB on the worst of the 5 digits).
    """
    xs, ys = digits.train_x[:5], digits.train_y[:5]
    total = sum_updates([client_update(model, *one(digits, i), lr=LR) for i in range(5)])
    kw = {"input_shape": SHAPE, "num_classes": 10, "lr": LR, "bounds": bounds(digits)}
    single = invert_update(model, total, **kw).images  # type: ignore[arg-type]
    batch = invert_update(model, total, num_images=5, labels=ys, steps=400, **kw).images  # type: ignore[arg-type]
    return {
        "single": [max(score(digits, o, r)[0] for r in single) for o in xs],
        "batch": [max(score(digits, o, r)[0] for r in batch) for o in xs],
        "level": [random_guess_psnr(o, digits.test_x, digits.info) for o in xs],
    }


@pytest.mark.xfail(
    strict=True,
    reason=(
        "not met: the sum of 5 single-example mlp updates does not hide the digits; "
        "measured best PSNR 36-45 dB (5-image attack with labels) and 20.7 dB "
        "(1-image attack, recovered label) vs random guess 8.3-9.4 dB"
    ),
)
def test_secure_sum_of_five_falls_to_random_guess(
    secure_sum_attack: dict[str, list[float]],
) -> None:
    for key in ("single", "batch"):
        for best, level in zip(secure_sum_attack[key], secure_sum_attack["level"], strict=True):
            assert best <= level + MARGIN_DB, (key, best, level)


def test_secure_sum_of_five_still_leaks_every_image(
    secure_sum_attack: dict[str, list[float]],
) -> None:
    # What the audit measures instead: with the labels, every one of the 5
    # digits comes back (measured 36-45 dB; threshold 25 dB), and even the
    # label-blind 1-image attack beats the random guess by > 5 dB (measured 11).
    print("secure sum of 5 one-example updates, best PSNR per image (dB):", secure_sum_attack)
    assert min(secure_sum_attack["batch"]) >= 25.0, secure_sum_attack
    assert max(secure_sum_attack["single"]) >= max(secure_sum_attack["level"]) + 5.0


# ---- bad input -------------------------------------------------------------------


def test_invert_update_rejects_bad_input(digits: SplitData, model: nn.Module) -> None:
    update = client_update(model, *one(digits, 0), lr=LR)
    ok = {"input_shape": SHAPE, "num_classes": 10, "lr": LR}
    low, high = bounds(digits)
    cases: list[tuple[dict[str, object], str]] = [
        ({"num_images": 0}, "num_images"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"tv_weight": -1.0}, "tv_weight"),
        ({"step_size": float("nan")}, "step_size"),
        ({"num_classes": 1}, "num_classes"),
        ({"input_shape": (8, 8)}, "input_shape"),
        ({"labels": [1, 2]}, "labels"),
        ({"labels": [10]}, "labels"),
        ({"labels": [0.5]}, "labels"),
        ({"num_images": 11}, "cannot recover 11 labels"),
        ({"num_classes": 5}, "num_classes is 5"),
        ({"bounds": (high, low)}, "low < high"),
        ({"bounds": (torch.zeros(3, 1, 1), torch.ones(3, 1, 1))}, "broadcast"),
        ({"seed": 1.5}, "seed"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            invert_update(model, update, **{**ok, **change})  # type: ignore[arg-type]
    missing = {k: v for k, v in update.items() if k != "5.bias"}
    bad_shape = {**update, "5.bias": torch.zeros(3)}
    for bad, message in [
        (missing, "missing"),
        (bad_shape, r"update\['5.bias'\]"),
        (flat(update)[:-1], "flat update"),
        ({k: torch.zeros_like(v) for k, v in update.items()}, "not all zeros"),
    ]:
        with pytest.raises(ValueError, match=message):
            invert_update(model, bad, **ok)  # type: ignore[arg-type]


def test_other_functions_reject_bad_input(digits: SplitData, model: nn.Module) -> None:
    img = torch.rand(1, 8, 8)
    x, y = one(digits, 0)
    update = client_update(model, x, y, lr=LR)
    two_class = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    y0 = torch.zeros(1, dtype=torch.int64)
    calls = [
        (lambda: psnr(img, torch.rand(1, 8, 7), 1.0), "shapes differ"),
        (lambda: psnr(img[0], img[0], 1.0), "one image"),
        (lambda: psnr(img, img, 0.0), "data_range"),
        (lambda: ssim(torch.rand(1, 1, 8), torch.rand(1, 1, 8), 1.0), "2x2"),
        (lambda: to_pixels(torch.rand(3, 8, 8), digits.info), "1, H, W"),
        (lambda: random_guess_psnr(x[0], x, digits.info), "no image other"),
        (lambda: random_guess_psnr(x[0], x[0], digits.info), "pool"),
        (lambda: recover_label(update, model, kind="grad"), "kind"),  # type: ignore[arg-type]
        (lambda: recover_label(client_update(two_class, x, y0, lr=LR), two_class), "two classes"),
        (lambda: client_update(model, x, y.float(), lr=LR), "int64"),
        (lambda: client_update(model, x, y[:0], lr=LR), "same number"),
        (lambda: client_update(model, x, y, lr=-1.0), "lr"),
        (
            lambda: dp_sgd_update(model, x, y, lr=LR, noise_multiplier=-1.0, max_grad_norm=1.0),
            "noise",
        ),
        (
            lambda: dp_sgd_update(model, x, y, lr=LR, noise_multiplier=1.0, max_grad_norm=0.0),
            "max_grad",
        ),
        (lambda: noise_multiplier_for(0.0, 1e-5), "target_epsilon"),
        (lambda: sum_updates([]), "non-empty"),
        (lambda: sum_updates([update, {"a": torch.zeros(1)}]), "update 1"),
        (lambda: bucket_sums([update], 0), "bucket_size"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
