"""Membership inference (fedsec.audit.membership): unit tests and a federated audit on digits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fedsec.audit.membership import (
    MembershipResult,
    balanced_split,
    calibrated_attack,
    loss_attack,
    per_example_loss,
    score_attack,
)
from fedsec.checkpoint import load_checkpoint
from fedsec.client.app import app as client_app
from fedsec.config import parse_config
from fedsec.data import client_dataset, load_dataset
from fedsec.models import make_model
from fedsec.runs import RunDirectory
from fedsec.strategies.inprocess import InProcessGrid
from fedsec.strategies.server_app import run_experiment


def _chance_auc_sd(n: int, m: int) -> float:
    """Standard deviation of the AUC of a score independent of membership (Mann-Whitney)."""
    return math.sqrt((n + m + 1) / (12 * n * m))


class _Table(nn.Module):
    """Returns row ``x[:, 0]`` of a fixed logit table: per-example losses chosen exactly."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def _table_for_losses(losses: torch.Tensor) -> _Table:
    """Two-class table whose cross-entropy on label 0 at row i is ``losses[i]`` (> 0)."""
    p = torch.exp(-losses.double())
    return _Table(torch.stack([p.log(), (1 - p).log()], dim=1).float())


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32)[:, None]


# ---- per_example_loss ------------------------------------------------------------


def test_per_example_loss_matches_cross_entropy_and_keeps_the_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))
    x, y = torch.randn(37, 5), torch.randint(0, 3, (37,))
    model.train()
    losses = per_example_loss(model, x, y, batch_size=8)
    assert model.training  # restored
    model.eval()
    expected = F.cross_entropy(model(x), y, reduction="none")
    assert losses.shape == (37,) and losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected.double(), rtol=1e-5, atol=1e-6)
    # Eval mode (dropout off) and batching do not change the result.
    torch.testing.assert_close(per_example_loss(model, x, y, batch_size=1), losses)


def test_per_example_loss_keeps_tiny_losses_apart() -> None:
    # Margins of 20 and 30 nats: float32 cross-entropy rounds both to exactly 0.
    model = _Table(torch.tensor([[20.0, 0.0], [30.0, 0.0]]))
    y = torch.zeros(2, dtype=torch.long)
    assert F.cross_entropy(model(_rows(2)), y, reduction="none").tolist() == [0.0, 0.0]
    losses = per_example_loss(model, _rows(2), y)
    assert 0 < losses[1] < losses[0]
    assert losses[0].item() == pytest.approx(math.exp(-20), rel=1e-5)


# ---- score_attack and the loss attack --------------------------------------------


def test_perfect_separator_scores_auc_1_and_tpr_1() -> None:
    result = score_attack(torch.linspace(1, 2, 50), torch.linspace(-2, -1, 70))
    assert result == MembershipResult(
        auc=1.0, tpr_at_1pct_fpr=1.0, num_members=50, num_non_members=70
    )
    # The same through the loss attack: members fit (loss 0.01), non-members not (loss 3).
    losses = torch.cat([torch.full((40,), 0.01), torch.full((40,), 3.0)])
    model = _table_for_losses(losses)
    x, y = _rows(80), torch.zeros(80, dtype=torch.long)
    result = loss_attack(model, (x[:40], y[:40]), (x[40:], y[40:]))
    assert (result.auc, result.tpr_at_1pct_fpr) == (1.0, 1.0)
    # ... and the reverse ranking is the worst possible attack.
    result = loss_attack(model, (x[40:], y[40:]), (x[:40], y[:40]))
    assert (result.auc, result.tpr_at_1pct_fpr) == (0.0, 0.0)


def test_identical_distributions_score_auc_near_one_half() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 5000
    result = score_attack(torch.randn(n, generator=gen), torch.randn(n, generator=gen))
    # Chance AUC has sd 0.0058 at 5000 + 5000; allow 4 sd.
    assert abs(result.auc - 0.5) <= 4 * _chance_auc_sd(n, n)  # measured: 0.501
    # At FPR 1 % a useless score has TPR ~1 % (binomial sd ~0.0014 at n = 5000).
    assert result.tpr_at_1pct_fpr <= 0.02  # measured: 0.013

    # An untrained model on two disjoint halves of the same data set.
    data = load_dataset("digits", seed=0)
    model = make_model("mlp", data.info.input_shape, data.info.num_classes, seed=0)
    perm = torch.randperm(len(data.train_y), generator=gen)
    a, b = perm[:700], perm[700:1400]
    result = loss_attack(
        model, (data.train_x[a], data.train_y[a]), (data.train_x[b], data.train_y[b])
    )
    assert abs(result.auc - 0.5) <= 4 * _chance_auc_sd(700, 700)  # 4 sd = 0.062; measured 0.478


def test_tpr_at_1pct_fpr_is_the_best_threshold_with_at_most_1pct_false_positives() -> None:
    non = torch.arange(100, dtype=torch.float64)  # 0..99: one false positive costs 1 %
    members = torch.tensor([200.0, 150.0, 98.5, 50.0])
    # Above 99: 2 members, 0 FP; at 98.5: 3 members and one FP (99), FPR 1 %: allowed;
    # at 98 the FPR is 2 %.
    result = score_attack(members, non)
    assert result.tpr_at_1pct_fpr == 0.75
    # Not interpolated: with 50 non-members a single false positive is already 2 %.
    result = score_attack(torch.tensor([10.0, 0.5]), torch.arange(50, dtype=torch.float64) / 50)
    assert result.tpr_at_1pct_fpr == 0.5
    # Ties count one half for the AUC; a tied threshold takes both sides at once.
    tied = score_attack(torch.zeros(10), torch.zeros(10))
    assert (tied.auc, tied.tpr_at_1pct_fpr) == (0.5, 0.0)


# ---- the calibrated attack ----------------------------------------------------------


def test_calibration_removes_per_example_difficulty() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 300
    difficulty = 0.5 + 2.5 * torch.rand(2 * n, generator=gen)  # loss under any model
    # Training lowers the loss of members by 0.2; the reference never saw them.
    target_loss = difficulty - 0.2 * (torch.arange(2 * n) < n)
    target, reference = _table_for_losses(target_loss), _table_for_losses(difficulty)
    x, y = _rows(2 * n), torch.zeros(2 * n, dtype=torch.long)
    members, non_members = (x[:n], y[:n]), (x[n:], y[n:])

    plain = loss_attack(target, members, non_members)
    calibrated = calibrated_attack(target, reference, members, non_members)
    assert 0.5 < plain.auc < 0.7  # the spread of difficulty (2.5) drowns the 0.2 gap
    assert (calibrated.auc, calibrated.tpr_at_1pct_fpr) == (1.0, 1.0)
    # The score is exactly loss_reference - loss_target.
    scores = [
        per_example_loss(reference, *s) - per_example_loss(target, *s)
        for s in (members, non_members)
    ]
    assert calibrated == score_attack(*scores)


# ---- balanced_split ---------------------------------------------------------------


def test_balanced_split_draws_equal_disjoint_subsets_reproducibly() -> None:
    mx, my = torch.arange(100.0)[:, None], torch.arange(100) % 10
    nx, ny = 1000 + torch.arange(30.0)[:, None], torch.arange(30) % 3

    (bx, by), (cx, cy) = balanced_split(mx, my, nx, ny, generator=torch.Generator().manual_seed(0))
    assert len(bx) == len(cx) == 30
    assert len(set(bx[:, 0].tolist())) == 30 and set(bx[:, 0].tolist()) <= set(range(100))
    assert sorted(cx[:, 0].tolist()) == [1000.0 + i for i in range(30)]
    assert torch.equal(by, bx[:, 0].long() % 10)  # labels stay with their inputs
    assert torch.equal(cy, (cx[:, 0].long() - 1000) % 3)

    again = balanced_split(mx, my, nx, ny, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0][0], bx) and torch.equal(again[1][0], cx)
    small = balanced_split(mx, my, nx, ny, max_per_side=7, generator=torch.Generator())
    assert len(small[0][1]) == len(small[1][1]) == 7


def test_balanced_split_stratified_matches_labels() -> None:
    my = torch.tensor([0] * 50 + [1] * 10 + [2] * 5)  # label 3 only among non-members
    ny = torch.tensor([0] * 5 + [1] * 20 + [3] * 8)
    mx, nx = torch.arange(65.0)[:, None], torch.arange(33.0)[:, None]
    (bx, by), (_, cy) = balanced_split(
        mx, my, nx, ny, stratify=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(by, cy)  # pairwise equal labels
    assert torch.bincount(by, minlength=4).tolist() == [5, 10, 0, 0]
    assert torch.equal(my[bx[:, 0].long()], by)
    (_, by), (_, cy) = balanced_split(
        mx, my, nx, ny, stratify=True, max_per_side=6, generator=torch.Generator().manual_seed(0)
    )
    assert len(by) == 6 and torch.equal(by, cy)


# ---- input validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, e: score_attack(torch.ones(3), torch.ones(0)), "non_member_scores is empty"),
        (
            lambda m, e: score_attack(torch.ones(3, 1), torch.ones(3)),
            "member_scores must be one-dim",
        ),
        (
            lambda m, e: score_attack(torch.tensor([0.0, math.nan]), torch.ones(3)),
            "member_scores contains non-finite values",
        ),
        (lambda m, e: loss_attack(m, (e[0][:0], e[1][:0]), e), "members is empty"),
        (
            lambda m, e: loss_attack(m, e, (e[0], e[1][:-1])),
            "non_members: labels must have shape [4]",
        ),
        (
            lambda m, e: loss_attack(m, e, (e[0], e[1].float())),
            "non_members: labels must be integer",
        ),
        (lambda m, e: loss_attack(m, e, e[0]), "non_members must be an (x, y) pair"),
        (lambda m, e: calibrated_attack(m, m, e, e), "reference_model must be a different model"),
        (lambda m, e: per_example_loss(m, *e, batch_size=0), "batch_size must be >= 1, got 0"),
        (
            lambda m, e: balanced_split(*e, *e, max_per_side=0, generator=torch.Generator()),
            "max_per_side must be >= 1, got 0",
        ),
        (
            lambda m, e: balanced_split(
                *e, e[0], e[1] + 1, stratify=True, generator=torch.Generator()
            ),
            "stratify: no label occurs among both members and non-members",
        ),
    ],
)
def test_input_validation(call: Any, message: str) -> None:
    model = nn.Linear(2, 2)
    examples = (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError) as info:
        call(model, examples)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ---- a federated audit on digits -------------------------------------------------------

#: 16 IID partitions of the digits training pool, of which 2 take part (the other 14
#: nodes never answer, like dropouts): the members are the ~180 examples of those two
#: clients, about half the server's test split, little enough that the plain model
#: overfits measurably -- with all 1437 examples the loss attack's AUC is ~0.53, too
#: close to chance to tell DP apart. Each client runs 5 rounds.
NUM_PARTITIONS, ONLINE = 16, 2
PLAIN: dict[str, Any] = {
    "client": {"local_epochs": 5, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
}
#: DP-SGD at epsilon 3 (delta 1e-5, clip 1): Poisson batches of 45 of ~90 examples.
DP: dict[str, Any] = {
    "client": {"local_epochs": 2, "lr": 0.5, "momentum": 0.0, "batch_size": 45},
    "privacy": {"mode": "dp-sgd", "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
}
#: Three independent replicates (seed: data split, partitions, init, DP noise): one run's
#: AUC on ~170 + 170 examples has sd ~0.03 from sampling alone, as much as the effect.
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Audit:
    loss: MembershipResult
    calibrated: MembershipResult
    test_accuracy: float
    epsilon: float | None


def _audit(tmp: Path, seed: int, recipe: dict[str, Any]) -> Audit:
    raw = {
        "experiment": {"name": "mia", "rounds": 5, "seed": seed, "device": "cpu"},
        "data": {"partition": "iid", "num_clients": NUM_PARTITIONS},
        **recipe,
    }
    cfg = parse_config(raw)
    run = RunDirectory.create(cfg, tmp)
    offline = range(ONLINE + 1, NUM_PARTITIONS + 1)  # node i holds partition i - 1
    grid = InProcessGrid(client_app, NUM_PARTITIONS, dead=offline)
    rounds = run_experiment(grid.as_grid(), cfg, run)
    # Every round aggregated both online clients, so every member was trained on.
    assert [r["status"] for r in rounds[1:]] == ["ok"] * 5

    data = load_dataset("digits", seed=seed)
    parts = [client_dataset(data, pid, NUM_PARTITIONS, "iid", seed=seed) for pid in range(ONLINE)]
    # Label-matched so the attack cannot win on the members' label frequencies.
    members, non_members = balanced_split(
        torch.cat([x for x, _ in parts]),
        torch.cat([y for _, y in parts]),
        data.test_x,
        data.test_y,
        stratify=True,
        generator=torch.Generator().manual_seed(seed),
    )

    def model_of_round(index: int) -> nn.Module:
        entry = run.checkpoints[index]
        model = make_model(cfg.model.name, data.info.input_shape, data.info.num_classes)
        model.load_state_dict(load_checkpoint(run.path / entry["file"], entry["sha256"]))
        return model

    final, initial = model_of_round(-1), model_of_round(0)
    assert run.checkpoints[0]["round"] == 0
    return Audit(
        loss=loss_attack(final, members, non_members),
        calibrated=calibrated_attack(final, initial, members, non_members),
        test_accuracy=float(rounds[-1]["test_accuracy"]),
        epsilon=rounds[-1].get("dp_epsilon_max"),
    )


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Audit]]:
    tmp = tmp_path_factory.mktemp("mia")
    return {
        name: [_audit(tmp, seed, recipe) for seed in SEEDS]
        for name, recipe in (("plain", PLAIN), ("dp", DP))
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_membership_auc_moves_toward_one_half_with_dp(audits: dict[str, list[Audit]]) -> None:
    plain, dp = audits["plain"], audits["dp"]
    for name, rows in audits.items():
        print(
            f"\n{name}: loss AUC {[round(a.loss.auc, 3) for a in rows]}, "
            f"TPR@1%FPR {[round(a.loss.tpr_at_1pct_fpr, 3) for a in rows]}; "
            f"calibrated (round-0 reference) AUC {[round(a.calibrated.auc, 3) for a in rows]}, "
            f"TPR@1%FPR {[round(a.calibrated.tpr_at_1pct_fpr, 3) for a in rows]}; "
            f"test acc {[round(a.test_accuracy, 3) for a in rows]}; "
            f"eps {[a.epsilon and round(a.epsilon, 2) for a in rows]}; "
            f"n/side {[a.loss.num_members for a in rows]}"
        )
    for a in plain + dp:
        assert a.loss.num_members == a.loss.num_non_members >= 150  # ~170 label-matched pairs

    # The plain model leaks: the mean of 3 chance AUCs on ~170 + 170 examples has sd
    # ~0.018, so 0.55 is ~2.8 sd above chance (measured: 0.618, 0.602, 0.598).
    plain_auc = _mean([a.loss.auc for a in plain])
    assert plain_auc >= 0.55

    # DP-SGD at epsilon <= 3 brings the AUC toward 0.5 (measured: 0.520, 0.536, 0.567),
    # by at least 0.02 on average (measured: distance 0.041 against 0.106).
    dp_distance = _mean([abs(a.loss.auc - 0.5) for a in dp])
    assert dp_distance <= (plain_auc - 0.5) - 0.02
    assert all(a.epsilon is not None and a.epsilon <= 3.0 for a in dp)
    # ... while still learning something (chance is 0.1; measured 0.511, 0.378, 0.453).
    assert _mean([a.test_accuracy for a in dp]) >= 0.3

    # The calibrated attack with the untrained round-0 model as reference is reported
    # (it removes the initialisation's per-example offsets only): it stays above chance
    # on the plain model (measured: 0.588, 0.582, 0.577; DP: 0.522, 0.535, 0.566).
    assert _mean([a.calibrated.auc for a in plain]) >= 0.55
