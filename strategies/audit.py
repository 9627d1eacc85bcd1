"""``fedsec audit``: what an honest-but-curious server learns, with and without protections.

The attacks themselves are Flower-free math in :mod:`fedsec.audit`; this
module runs the scenarios (including real in-process federated runs for
membership inference) and writes the report.

For one experiment config, :func:`run_audit` compares these scenarios in one
report:

* **Gradient inversion** (:mod:`fedsec.audit.inversion`) against the update
  the server sees, for ``images`` target examples, each held by a different
  client, all attacked on the initial global model (where inversion works
  best):

  - ``plain``: the client's own single-example SGD update (FedAvg);
  - ``dp-sgd eps=E``: the same step under DP-SGD at each epsilon (one step,
    sample rate 1, the config's clipping bound and delta);
  - ``secure sum k=K``: the sum of the target's and ``K - 1`` other clients'
    one-example updates, all the server sees under secure aggregation (the
    worst case for it: few, large per-example gradients);
  - ``bucket s=S``: the same over one bucket of ``S`` clients, what the
    server sees under bucketed secure aggregation;
  - ``secure sum k=K, whole partitions``: the sum of ``K`` clients' FedSGD
    updates, each one step on the client's whole partition (a realistic
    round).

  Each reconstruction's PSNR and SSIM are taken against the best-matching
  image among those mixed into the update, and compared with the random
  guess scored the same way (held-out digits, best match among the same
  images), so that mixing more images does not flatter the attack.

* **Membership inference** (:mod:`fedsec.audit.membership`) against the final
  global model of a federated run of the config (in-process, the real apps):
  once without DP and once with DP-SGD at each epsilon. Members are the
  clients' training examples, non-members the server's held-out split, in
  equal numbers per label. Secure aggregation does not change the global
  model, so its membership risk is the plain run's.

Outputs in ``out_dir``: ``report.md`` (tables), ``audit.json`` (every number)
and ``inversion.png`` (originals against reconstructions).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsec.audit.inversion import (
    client_update,
    dp_sgd_update,
    invert_update,
    noise_multiplier_for,
    psnr,
    ssim,
    sum_updates,
    to_pixels,
)
from fedsec.audit.membership import balanced_split, calibrated_attack, loss_attack
from fedsec.checkpoint import load_checkpoint
from fedsec.client.app import app as client_app
from fedsec.client.app import client_partition
from fedsec.config import ExperimentConfig, parse_config
from fedsec.data import SplitData, load_dataset, pixel_bounds
from fedsec.models import make_model
from fedsec.runs import RunDirectory

from .inprocess import InProcessGrid
from .server_app import run_experiment

__all__ = ["AuditSettings", "run_audit"]


@dataclass(frozen=True)
class AuditSettings:
    """What :func:`run_audit` measures.

    Parameters
    ----------
    images : int
        Target examples attacked by gradient inversion (one per client).
    epsilons : tuple of float
        DP-SGD budgets compared (inversion: per step; membership: whole run).
    secure_clients : int
        Clients whose updates form one secure sum (k).
    bucket_size : int
        Clients per bucket under bucketed secure aggregation (s).
    inversion_steps : int
        Optimisation steps of each reconstruction.
    membership : bool
        Whether to train the global models and run membership inference.
    """

    images: int = 4
    epsilons: tuple[float, ...] = (1.0, 8.0)
    secure_clients: int = 5
    bucket_size: int = 2
    inversion_steps: int = 200
    membership: bool = True

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"images must be >= 1, got {self.images}")
        if not self.epsilons or any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ValueError(f"epsilons must be finite numbers > 0, got {list(self.epsilons)}")
        if self.bucket_size < 2:
            raise ValueError(f"bucket_size must be >= 2, got {self.bucket_size}")
        if self.secure_clients < 2:
            raise ValueError(f"secure_clients must be >= 2, got {self.secure_clients}")
        if self.inversion_steps < 1:
            raise ValueError(f"inversion_steps must be >= 1, got {self.inversion_steps}")


@dataclass
class _Scenario:
    name: str
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    guess: list[float] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)


def run_audit(
    cfg: ExperimentConfig, out_dir: Path, settings: AuditSettings | None = None
) -> dict[str, Any]:
    """Run the audit of ``cfg`` and write ``report.md``, ``audit.json``, ``inversion.png``.

    Raises
    ------
    ValueError
        If the config has fewer clients than a scenario needs.
    """
    settings = settings or AuditSettings()
    needed = max(settings.images, settings.secure_clients, settings.bucket_size)
    if cfg.data.num_clients < needed:
        raise ValueError(
            f"the audit needs at least {needed} clients (data.num_clients = {cfg.data.num_clients})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)
    results: dict[str, Any] = {
        "config": cfg.experiment.name,
        "settings": dataclasses.asdict(settings),
        "inversion": _inversion(cfg, data, settings, out_dir),
    }
    if settings.membership:
        results["membership"] = _membership(cfg, data, settings)
    (out_dir / "audit.json").write_text(json.dumps(results, indent=2))
    (out_dir / "report.md").write_text(_markdown(results))
    return results


# -- gradient inversion ---------------------------------------------------------------


def _inversion(
    cfg: ExperimentConfig, data: SplitData, settings: AuditSettings, out_dir: Path
) -> dict[str, Any]:
    info = data.info
    model = make_model(cfg.model.name, info.input_shape, info.num_classes, seed=cfg.experiment.seed)
    lr = cfg.client.lr
    generator = torch.Generator().manual_seed(cfg.experiment.seed)
    partitions = [client_partition(cfg, data, client) for client in range(cfg.data.num_clients)]
    # Client i's first example, and its one-example update (the worst case).
    examples = [(x[:1], y[:1]) for x, y in partitions]
    single = [client_update(model, x, y, lr=lr) for x, y in examples]
    k = settings.secure_clients
    # A realistic FedSGD update: one step on the client's whole partition.
    full = [client_update(model, x, y, lr=lr) for x, y in partitions[:k]]
    noise = [
        noise_multiplier_for(eps, cfg.privacy.delta, steps=1, sample_rate=1.0)
        for eps in settings.epsilons
    ]
    names = ["plain"] + [f"dp-sgd eps={eps:g}" for eps in settings.epsilons]
    names += [f"secure sum k={k}", f"bucket s={settings.bucket_size}"]
    names += [f"secure sum k={k}, whole partitions"]
    scenarios = [_Scenario(name) for name in names]
    bounds = pixel_bounds(info)
    pool = data.test_x[:_GUESS_POOL]
    n = cfg.data.num_clients
    for target in range(settings.images):
        x, y = examples[target]
        # What the server sees for this target, and the images mixed into it.
        seen: list[tuple[Any, torch.Tensor]] = [(single[target], x)]
        for sigma in noise:
            update = dp_sgd_update(
                model,
                x,
                y,
                lr=lr,
                noise_multiplier=sigma,
                max_grad_norm=cfg.privacy.max_grad_norm,
                generator=generator,
            )
            seen.append((update, x))
        for size in (k, settings.bucket_size):
            group = [(target + i) % n for i in range(size)]
            mixed = torch.cat([examples[i][0] for i in group])
            seen.append((sum_updates([single[i] for i in group]), mixed))
        seen.append((sum_updates(full), torch.cat([p[0] for p in partitions[:k]])))
        for scenario, (update, mixed_in) in zip(scenarios, seen, strict=True):
            result = invert_update(
                model,
                update,
                input_shape=info.input_shape,
                num_classes=info.num_classes,
                lr=lr,
                steps=settings.inversion_steps,
                seed=cfg.experiment.seed + target,
                bounds=bounds,
            )
            guess = to_pixels(result.images[0], info)
            targets = to_pixels(mixed_in, info)
            scenario.psnr.append(max(psnr(o, guess, 1.0) for o in targets))
            scenario.ssim.append(max(ssim(o, guess, 1.0) for o in targets))
            scenario.guess.append(_best_of_random_guess(targets, to_pixels(pool, info)))
            scenario.images.append(guess)
    originals = [to_pixels(examples[t][0][0], info) for t in range(settings.images)]
    _write_grid(out_dir / "inversion.png", originals, scenarios)
    return {
        "noise_multipliers": dict(zip([f"{e:g}" for e in settings.epsilons], noise, strict=True)),
        "scenarios": {
            s.name: {
                "psnr": s.psnr,
                "ssim": s.ssim,
                "random_guess_psnr": s.guess,
                "mean_psnr": _mean(s.psnr),
                "mean_ssim": _mean(s.ssim),
                "mean_random_guess_psnr": _mean(s.guess),
            }
            for s in scenarios
        },
    }


#: Images of the server's held-out split drawn as "random guesses".
_GUESS_POOL = 64


def _best_of_random_guess(originals: torch.Tensor, pool: torch.Tensor) -> float:
    """The random-guess level when a reconstruction is scored against its best match.

    A reconstruction is scored by its best PSNR over the ``m`` images mixed
    into what the server saw, so the fair reference scores each image of
    ``pool`` (held-out digits: guesses that know the data but not the
    clients) the same way and averages: the best-of-``m`` random guess. For
    ``m = 1`` it is :func:`fedsec.audit.inversion.random_guess_psnr`.
    """
    best = [max(psnr(o, guess, 1.0) for o in originals) for guess in pool]
    return sum(best) / len(best)


def _mean(values: list[float]) -> float:
    finite = [min(v, 100.0) for v in values]  # an exact reconstruction has infinite PSNR
    return sum(finite) / len(finite)


def _write_grid(path: Path, originals: list[torch.Tensor], scenarios: list[_Scenario]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", originals)] + [(s.name, s.images) for s in scenarios]
    cols = len(originals)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols + 1.6, 1.4 * len(rows)))
    axes = [[axes]] if len(rows) == 1 and cols == 1 else axes
    for r, (name, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c] if cols > 1 else axes[r]
            image = images[c].detach().cpu()
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- membership inference ---------------------------------------------------------------


def _membership(cfg: ExperimentConfig, data: SplitData, settings: AuditSettings) -> dict[str, Any]:
    runs = {"plain": _with_privacy(cfg, None)}
    for eps in settings.epsilons:
        runs[f"dp-sgd eps={eps:g}"] = _with_privacy(cfg, eps)
    members_x, members_y = data.train_x, data.train_y
    generator = torch.Generator().manual_seed(cfg.experiment.seed)
    # Equal numbers per label, so the attack cannot win on label frequencies alone.
    members, non_members = balanced_split(
        members_x, members_y, data.test_x, data.test_y, generator=generator, stratify=True
    )
    out: dict[str, Any] = {}
    for name, run_cfg in runs.items():
        final, initial, accuracy = _train_global(run_cfg, data)
        loss = loss_attack(final, members, non_members)
        calibrated = calibrated_attack(final, initial, members, non_members)
        out[name] = {
            "test_accuracy": accuracy,
            "loss_auc": loss.auc,
            "loss_tpr_at_1pct_fpr": loss.tpr_at_1pct_fpr,
            "calibrated_auc": calibrated.auc,
            "calibrated_tpr_at_1pct_fpr": calibrated.tpr_at_1pct_fpr,
            "num_members": loss.num_members,
        }
    return out


def _with_privacy(cfg: ExperimentConfig, epsilon: float | None) -> ExperimentConfig:
    raw = cfg.to_dict()
    raw["secagg"]["enabled"] = False  # the global model is the same with or without it
    if epsilon is None:
        raw["privacy"] = {"mode": "none"}
    else:
        privacy = raw["privacy"]
        privacy.update(mode="dp-sgd", target_epsilon=epsilon, noise_multiplier=0.0)
        privacy["epsilon_budget"] = 0.0
    return parse_config(raw)


def _train_global(
    cfg: ExperimentConfig, data: SplitData
) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """Final and initial global model of an in-process federated run, and test accuracy."""

    info = data.info
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDirectory.create(cfg, tmp)
        grid = InProcessGrid(client_app, cfg.data.num_clients)
        rounds = run_experiment(grid.as_grid(), cfg, run)
        models = []
        for entry in (run.checkpoints[0], run.checkpoints[-1]):
            state = load_checkpoint(run.path / entry["file"], entry["sha256"])
            model = make_model(cfg.model.name, info.input_shape, info.num_classes)
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fedsec.")})
            models.append(model.eval())
    return models[1], models[0], float(rounds[-1]["test_accuracy"])


# -- report -------------------------------------------------------------------------------


def _markdown(results: dict[str, Any]) -> str:
    inv = results["inversion"]
    settings = results["settings"]
    lines = [
        f"# Privacy audit: {results['config']}",
        "",
        "## Gradient inversion",
        "",
        f"Inverting Gradients (Geiping et al. 2020) with analytic label recovery, "
        f"{settings['inversion_steps']} steps, on the initial global model, for "
        f"{settings['images']} target clients. PSNR / SSIM against the best-matching image "
        "among those mixed into what the server sees (PSNR capped at 100 dB); one-example "
        "updates except in the last row.",
        "",
        "| what the server sees | mean PSNR (dB) | mean SSIM | random guess (dB) | above it (dB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, sc in inv["scenarios"].items():
        lines.append(
            f"| {name} | {sc['mean_psnr']:.1f} | {sc['mean_ssim']:.3f} | "
            f"{sc['mean_random_guess_psnr']:.1f} | "
            f"{sc['mean_psnr'] - sc['mean_random_guess_psnr']:+.1f} |"
        )
    lines += [
        "",
        "Random guess: held-out digits scored like the reconstruction (best match among "
        "the images mixed into the update), so a reconstruction at that level has "
        "revealed nothing about the clients' images.",
        "",
        "![originals and reconstructions](inversion.png)",
        "",
    ]
    if "membership" in results:
        lines += [
            "## Membership inference",
            "",
            "Final global model of an in-process federated run of the config; members are "
            "the clients' training examples, non-members the server's held-out split, in "
            "equal numbers per label. Loss attack: Yeom et al. 2018; calibrated: the loss "
            "drop from the initial global model (Watson et al. 2022, without shadow "
            "models). Secure aggregation leaves the global model, hence these figures, "
            "unchanged.",
            "",
            "| training | test accuracy | loss AUC | TPR @ 1% FPR | calibrated AUC | "
            "calibrated TPR @ 1% FPR |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, m in results["membership"].items():
            lines.append(
                f"| {name} | {m['test_accuracy']:.3f} | {m['loss_auc']:.3f} | "
                f"{m['loss_tpr_at_1pct_fpr']:.3f} | {m['calibrated_auc']:.3f} | "
                f"{m['calibrated_tpr_at_1pct_fpr']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)
