"""The fedsec ServerApp: the round loop with checkpoints, resume and server-side evaluation.

``app`` is the ServerApp that ``flwr run .`` starts (see ``[tool.flwr.app]`` in
pyproject.toml); ``fedsec run`` builds one with :func:`make_server_app` so it
can show live progress. Both run :func:`run_experiment`.

Unlike ``Strategy.start`` this loop checkpoints the global model after every
round, can start from the last checkpoint of an interrupted run, and keeps the
global model unchanged when a round fails. It is built on the same public
pieces a Flower app uses: the strategy's :meth:`~FedSecStrategy.train_round`
over ``pipeline(grid, [adversary, verifier])``
(:mod:`fedsec.strategies.pipeline`), a
:class:`~fedsec.strategies.secagg.SecureAggregation` built from the config
(:func:`make_secagg_workflow`) and a
:class:`~fedsec.strategies.signatures.SignatureFilter`
(:func:`~fedsec.strategies.signatures.with_signatures`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from fedsec.aggregation import Rule
from fedsec.assembly import (
    build_aggregator,
    build_configured_attack,
    secure_bucket_size,
    secure_norm_bound,
)
from fedsec.attacks.threat import is_colluding, simulated_adversary
from fedsec.checkpoint import CheckpointError
from fedsec.client.app import local_train
from fedsec.client.privacy import simulation_ledger_config
from fedsec.config import ExperimentConfig, default_config, load_config
from fedsec.data import SplitData, load_dataset
from fedsec.models import make_model
from fedsec.npy import record_from_state_dict, state_dict_from_record
from fedsec.params import flatten_state
from fedsec.privacy.modes import mode_of
from fedsec.runs import EngineStoppedError, RoundMetrics, RunDirectory
from fedsec.training import evaluate, resolve_device
from fedsec.wire import WIRE_CONFIG_KEY

from .pipeline import Filter, pipeline
from .secagg import SecureAggregation
from .signatures import with_signatures
from .strategy import MAX_EXAMPLES_CEILING, FedSecStrategy

if TYPE_CHECKING:
    from .adversary import AdversaryFilter

logger = logging.getLogger("fedsec")

RoundCallback = Callable[[RoundMetrics], None]


def make_reference_fn(
    cfg: ExperimentConfig, data: SplitData, device: torch.device
) -> Callable[[ArrayRecord], torch.Tensor]:
    """The server's own update on a small root data set, for FLTrust-style rules.

    The root set is ``aggregation.root_size`` examples drawn (seeded) from the
    training pool, as in Cao et al. (NDSS 2021); the server trains the global
    model on it with the clients' local settings and returns the flat update.
    """
    generator = torch.Generator().manual_seed(cfg.experiment.seed + 7919)
    index = torch.randperm(len(data.train_y), generator=generator)[: cfg.aggregation.root_size]
    x_root, y_root = data.train_x[index], data.train_y[index]
    calls = 0

    def reference(arrays: ArrayRecord) -> torch.Tensor:
        nonlocal calls
        calls += 1
        model = make_model(cfg.model.name, data.info.input_shape, data.info.num_classes)
        model.load_state_dict(state_dict_from_record(arrays))
        before = _flat_state(model)
        local_train(cfg, model, x_root, y_root, device=device, seed=cfg.experiment.seed + calls)
        return _flat_state(model) - before

    return reference


def _flat_state(model: torch.nn.Module) -> torch.Tensor:
    # Same order as the ArrayRecord built from this state dict (ArraySpec).
    return flatten_state(model.state_dict())


def build_strategy(
    cfg: ExperimentConfig,
    rule: Rule | None = None,
    reference_fn: Callable[[ArrayRecord], torch.Tensor] | None = None,
    *,
    train_size: int | None = None,
    filters: Sequence[Filter] = (),
) -> FedSecStrategy:
    """The strategy an experiment config describes (``rule`` defaults to the configured one).

    ``train_size`` (the data set's training split) is the largest example count
    a reply may claim unless ``server.max_examples`` sets one; either way at
    most :data:`MAX_EXAMPLES_CEILING`. With ``secagg.enabled`` its training
    rounds are secure (:func:`make_secagg_workflow`); ``filters`` are its
    server-side pipeline, outermost first.
    """
    return FedSecStrategy(
        rule=rule if rule is not None else build_aggregator(cfg),
        rule_name=cfg.aggregation.rule,
        fraction_train=cfg.client.fraction,
        fraction_evaluate=cfg.client.evaluate_fraction,
        min_available_nodes=cfg.data.num_clients,
        seed=cfg.experiment.seed,
        server_lr=cfg.server.lr,
        server_momentum=cfg.server.momentum,
        node_wait_timeout=cfg.server.round_timeout,
        reference_fn=reference_fn,
        secure=make_secagg_workflow(cfg) if cfg.secagg.enabled else None,
        filters=filters,
        max_examples=max_examples(cfg, train_size),
    )


def max_examples(cfg: ExperimentConfig, train_size: int | None) -> int:
    """``server.max_examples``, or the training split's size when it is 0; at most 2**31.

    No client holds more examples than the whole training split, so an honest
    count never exceeds it; without a data set to ask, only the ceiling applies.
    """
    if cfg.server.max_examples > 0:
        return min(cfg.server.max_examples, MAX_EXAMPLES_CEILING)
    if train_size is not None and train_size > 0:
        return min(train_size, MAX_EXAMPLES_CEILING)
    return MAX_EXAMPLES_CEILING


def make_server_evaluator(
    cfg: ExperimentConfig, data: SplitData, device: torch.device
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Server-side evaluation on the held-out test split.

    Always test loss and accuracy; with a backdoor attack configured, its
    attack success rate (triggered test images whose true class is not the
    target, classified as the target); with ``evasion.attack``, robust accuracy
    under FGSM or PGD at ``evasion.eps`` (pixel units).
    """
    from fedsec.attacks.data_poisoning import Backdoor
    from fedsec.attacks.evasion import pixel_eps_to_input, robust_accuracy
    from fedsec.data import pixel_bounds

    attack = build_configured_attack(cfg)
    backdoor = attack if isinstance(attack, Backdoor) else None
    ev = cfg.evasion
    count = ev.eval_samples or len(data.test_y)
    x_robust, y_robust = data.test_x[:count], data.test_y[:count]

    def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
        result = evaluate(model, data.test_x, data.test_y, device=device)
        out = {"test_loss": result.loss, "test_accuracy": result.accuracy}
        if backdoor is not None:
            out["attack_success_rate"] = backdoor.attack_success_rate(
                model, data.test_x, data.test_y, device=device
            )
        if ev.attack != "none":
            out["robust_accuracy"] = robust_accuracy(
                model,
                x_robust,
                y_robust,
                attack="fgsm" if ev.attack == "fgsm" else "pgd",
                eps=pixel_eps_to_input(ev.eps, data.info),
                alpha=pixel_eps_to_input(ev.alpha, data.info) if ev.alpha else None,
                steps=ev.steps,
                device=device,
                generator=torch.Generator().manual_seed(cfg.experiment.seed),
                bounds=pixel_bounds(data.info),
            )
        return out

    return evaluate_fn


def run_experiment(
    grid: Grid,
    cfg: ExperimentConfig,
    run: RunDirectory,
    on_round: RoundCallback | None = None,
    *,
    plot: bool = True,
) -> list[RoundMetrics]:
    """Run (or resume) an experiment's rounds on ``grid``, recording each in ``run``.

    Round 0 is the evaluation of the initial model. ``plot``: draw the run's
    ``accuracy.png`` when it finishes (a grid's cells do not: its report draws
    the figures, and matplotlib's drawing is a noticeable share of a small
    cell's CPU). When ``run`` already has checkpoints, the loop restarts after
    the last one, whose SHA-256 must match the manifest.

    A failed round (no usable reply, or aggregation raised) keeps the global
    model and is recorded; after ``server.max_failed_rounds`` of them in a row
    the loop stops with :class:`EngineStoppedError` (the engine or every client
    has most likely died), leaving a run that ``--resume`` continues. Once
    ``run`` is closed (:meth:`RunDirectory.close`, e.g. on Ctrl-C) the loop
    records nothing more and returns at the next round.

    Raises
    ------
    EngineStoppedError
        After ``server.max_failed_rounds`` consecutive failed rounds.
    CheckpointError
        If resuming from a checkpoint that is missing, altered or incompatible.
    ConfigError
        If ``signatures.required`` and its key dir is missing, empty or malformed.
    """
    verifier = with_signatures(cfg)  # a bad key dir fails here, before round 0
    device = resolve_device(cfg.experiment.device)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)
    model = make_model(
        cfg.model.name,
        data.info.input_shape,
        data.info.num_classes,
        seed=cfg.experiment.seed,
    ).to(device)
    rule = build_aggregator(cfg)
    reference_fn = make_reference_fn(cfg, data, device) if "reference" in rule.requires else None
    # The adversary (simulations only) is outside the verifier: it must see verified
    # replies, and its crafted updates are simulated attackers' (under SecAgg the
    # colluders mask and sign them; in plain rounds it rewrites verified replies).
    # An adaptive adversary against FLTrust knows the root data (Cao et al., NDSS 2021):
    # its own reference function, so the server's seeds stay as without an attack.
    adversary_reference = (
        make_reference_fn(cfg, data, device)
        if cfg.attack.adaptive and "reference" in rule.requires
        else None
    )
    adversary = _with_adversary(cfg, adversary_reference)
    filters: list[Filter] = [f for f in (adversary, verifier) if f is not None]
    strategy = build_strategy(
        cfg, rule, reference_fn, train_size=len(data.train_y), filters=filters
    )
    exchange = pipeline(grid, strategy.filters)
    strategy.summary()
    server_evaluate = make_server_evaluator(cfg, data, device)
    on_round = on_round or (lambda _: None)

    elapsed_before = 0.0
    if run.last_round is None:
        start_round = 1
        initial = {
            "round": 0,
            "status": "initial",
            **server_evaluate(model),
        }
        initial["elapsed_s"] = 0.0
        run.record_round(initial, model.state_dict())
        on_round(initial)
    else:
        last, model_state, server_state = run.load_last_checkpoint()
        try:
            model.load_state_dict(model_state)
        except RuntimeError as err:
            raise CheckpointError(
                f"checkpoint of round {last} does not fit model '{cfg.model.name}': "
                f"{str(err).splitlines()[0]}"
            ) from None
        strategy.load_state_dict(server_state)
        start_round = last + 1
        elapsed_before = float(run.rounds[-1].get("elapsed_s", 0.0)) if run.rounds else 0.0
        logger.info("resuming %s after round %d", run.name, last)

    secure = strategy.secure
    arrays = record_from_state_dict(model.state_dict())
    config_json = json.dumps(cfg.to_dict())
    # A simulation's client ledgers live in the run folder, so --resume continues them.
    ledger_config = simulation_ledger_config(cfg, run.path, fresh=start_round == 1)
    t_start = time.perf_counter()
    failed_in_a_row: list[int] = []
    for server_round in range(start_round, cfg.experiment.rounds + 1):
        if run.closed:  # interrupted: a leftover loop must not start another round
            return run.rounds
        t_round = time.perf_counter()
        train_config = ConfigRecord({WIRE_CONFIG_KEY: config_json, **ledger_config})
        metrics: RoundMetrics = {"round": server_round, "status": "ok"}
        new_arrays: ArrayRecord | None
        train_metrics: MetricRecord | None
        try:
            new_arrays, train_metrics = strategy.train_round(
                exchange,
                grid,
                server_round,
                arrays,
                train_config,
                timeout=cfg.server.round_timeout,
                next_round=server_round + 1 if server_round < cfg.experiment.rounds else None,
            )
            if secure is not None and secure.last_error:
                metrics["error"] = secure.last_error
            if secure is None and train_metrics is not None:
                train_metrics.update(_detection(adversary, strategy, server_round))
        except Exception as err:  # a failed round leaves the global model as it was
            # One line; the traceback only with --verbose (a dead engine fails every round).
            logger.warning(
                "round %d failed (%s: %s); global model unchanged",
                server_round,
                type(err).__name__,
                str(err).splitlines()[0][:300] if str(err) else "",
            )
            logger.debug("round %d traceback", server_round, exc_info=True)
            new_arrays, train_metrics = None, None
            metrics["error"] = f"{type(err).__name__}: {err}"
        if new_arrays is None:
            metrics["status"] = "failed"
            failed_in_a_row.append(server_round)
        else:
            failed_in_a_row.clear()
            arrays = new_arrays
            model.load_state_dict(state_dict_from_record(arrays))
        metrics.update(dict(train_metrics or {}))

        if strategy.fraction_evaluate > 0:
            eval_config = ConfigRecord({WIRE_CONFIG_KEY: config_json})
            federated = strategy.evaluate_round(
                exchange,
                grid,
                server_round,
                arrays,
                eval_config,
                timeout=cfg.server.round_timeout,
            )
            metrics.update({f"federated_{k}": v for k, v in (federated or {}).items()})
        if verifier is not None:
            metrics["signatures_rejected"] = len(verifier.take_rejected())

        metrics.update(server_evaluate(model))
        metrics.update(_privacy_metrics(cfg, server_round))
        metrics["round_time_s"] = time.perf_counter() - t_round
        metrics["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
        if run.closed:  # interrupted while this round ran: it is not recorded
            return run.rounds
        run.record_round(
            metrics, model.state_dict(), strategy.state_dict(), _decisions(strategy, server_round)
        )
        logger.info(
            "round %d: test accuracy %.4f, loss %.4f",
            server_round,
            metrics["test_accuracy"],
            metrics["test_loss"],
        )
        on_round(metrics)
        if len(failed_in_a_row) >= cfg.server.max_failed_rounds:
            raise EngineStoppedError(_stopped_reason(failed_in_a_row, metrics, strategy))
    if run.closed:
        return run.rounds
    run.finish(plot=plot)
    return run.rounds


def _stopped_reason(rounds: list[int], metrics: RoundMetrics, strategy: FedSecStrategy) -> str:
    """One line: which rounds failed and what the last one saw."""
    if "error" in metrics:
        cause = str(metrics["error"]).splitlines()[0][:300]
    else:
        sampled, replies = metrics.get("num-sampled"), metrics.get("num-replies")
        cause = f"{replies} of {sampled} sampled clients replied"
        report = strategy.last_report
        if replies and report is not None and report.excluded:
            reason = next(iter(report.excluded.values())).splitlines()[0][:200]
            cause += f", none usable (e.g. {reason})"
    span = f"rounds {rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else f"round {rounds[0]}"
    return (
        f"no usable reply in {len(rounds)} consecutive rounds ({span}; last: {cause}); "
        "the engine or the clients have likely stopped (server.max_failed_rounds)"
    )


def make_secagg_workflow(cfg: ExperimentConfig) -> SecureAggregation:
    """The :class:`SecureAggregation` a config describes (bucketing, norm bound, DP).

    Stage timeout: ``secagg.stage_timeout``, or (0) the round's
    ``server.round_timeout``. Signed mode trusts the ``<identity>.pub`` keys
    in ``secagg.key_dir`` when the server has that folder.
    """
    sa = cfg.secagg
    return SecureAggregation(
        clip=sa.clip,
        bits=sa.bits,
        modulus_bits=sa.modulus_bits,
        weight_cap=sa.weight_cap,
        degree=sa.degree,
        threshold=sa.threshold,
        dropout_rate=sa.dropout_rate,
        corrupt_fraction=sa.corrupt_fraction,
        timeout=sa.stage_timeout or cfg.server.round_timeout,
        signed=sa.signed,
        trusted_keys=sa.key_dir if sa.signed and sa.key_dir else None,
        bucket_size=secure_bucket_size(cfg),
        norm_bound=secure_norm_bound(cfg),
        noise_multiplier=mode_of(cfg).secure_noise_multiplier(cfg),
        delta=cfg.privacy.delta,
        seed=cfg.experiment.seed,
    )


def _privacy_metrics(cfg: ExperimentConfig, server_round: int) -> dict[str, object]:
    """The round's privacy bookkeeping, from the privacy mode (:mod:`fedsec.privacy.modes`).

    Delta and accountant; the epsilon where the server accounts (central DP).
    With client-side DP each client reports its own ledger's epsilon
    (``dp_epsilon_max``: the largest among the round's clients).
    """
    return mode_of(cfg).round_metrics(cfg, server_round)


def _detection(
    adversary: AdversaryFilter | None, strategy: FedSecStrategy, server_round: int
) -> dict[str, float]:
    """The rule's exclusions scored against the referee's ground truth.

    Only in rounds where the rule excluded someone (weight 0): precision is
    the share of excluded clients that were malicious, recall the share of
    the round's accepted malicious clients that were excluded.
    """
    report = strategy.last_report
    if adversary is None or report is None or report.server_round != server_round:
        return {}
    excluded = {node for node, weight in report.weights.items() if weight == 0}
    malicious = adversary.malicious_nodes & set(report.weights)
    if not excluded or not malicious:
        return {}
    caught = len(excluded & malicious)
    return {
        "detection_precision": caught / len(excluded),
        "detection_recall": caught / len(malicious),
    }


def _decisions(strategy: FedSecStrategy, server_round: int) -> dict[str, object]:
    """The round's line of decisions.jsonl: who was sampled, excluded, weighted.

    Keyed by Flower's node ids (random per simulation and per SuperNode
    start), plus ``clients``: one entry per sampled or replying node with the
    partition it claims in its reply (``partition-id``; None when it did not
    reply or sent none), so a line can be read against partitions and the
    simulation's malicious set. A partition is the client's claim, not verified.
    """
    report = strategy.last_report
    if report is None or report.server_round != server_round:
        return {"round": server_round}
    clients = []
    for node in sorted(set(report.sampled) | set(report.excluded) | set(report.accepted)):
        entry: dict[str, object] = {"node": node, "partition": report.partitions.get(node)}
        if node in report.excluded:
            entry["status"], entry["reason"] = "excluded", report.excluded[node]
        elif node in report.accepted:
            entry["status"] = "accepted"
            if node in report.weights:
                entry["weight"] = round(report.weights[node], 6)
        else:
            entry["status"] = "no reply"
        if node in report.duplicates:
            entry["duplicates_ignored"] = report.duplicates[node]
        clients.append(entry)
    clients.sort(key=lambda e: (e["partition"] is None, e["partition"] or 0, e["node"]))
    return {
        "round": server_round,
        "sampled": report.sampled,
        "excluded": {str(k): v for k, v in report.excluded.items()},
        "weights": {str(k): round(v, 6) for k, v in report.weights.items()},
        "duplicates": {str(k): v for k, v in report.duplicates.items()},
        "clients": clients,
    }


def _with_adversary(
    cfg: ExperimentConfig, reference_fn: Callable[[ArrayRecord], torch.Tensor] | None = None
) -> AdversaryFilter | None:
    """The adversary component (and referee) as a filter when an attack is configured.

    ``reference_fn`` gives an adaptive adversary the server's root update (FLTrust).

    Only in a simulation's adversary mode: the component rewrites replies
    after the server received them, so a deployment must never run it, whatever
    its config names.
    """
    from .adversary import AdversaryFilter  # simulation-only code, loaded only when used

    attack = cfg.attack
    built = build_configured_attack(cfg)
    if built is None:
        return None
    if not simulated_adversary():
        logger.warning("attack %r ignored: not a simulation in adversary mode", attack.name)
        return None
    if not is_colluding(built):
        return AdversaryFilter(None)  # referee only
    # An adaptive adversary knows the rule; it gets its own copy, so probing it
    # cannot disturb the server's state (centered clipping's centre, FoolsGold's history).
    rule = build_aggregator(cfg) if attack.adaptive else None
    logger.info(
        "adversary: %s, %s knowledge%s", built, attack.knowledge, ", adaptive" if rule else ""
    )
    return AdversaryFilter(
        built,
        omniscient=attack.knowledge == "omniscient",
        rule=rule,
        reference_fn=reference_fn if rule is not None else None,
        boost=attack.boost,
        server_lr=cfg.server.lr,
        seed=cfg.experiment.seed,
    )


def make_server_app(
    cfg: ExperimentConfig, run: RunDirectory, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp bound to one config and run directory (used by ``fedsec run``)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_experiment(grid, cfg, run, on_round)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: reads ``config-file`` and ``results-dir``."""
    config_file = str(context.run_config.get("config-file", ""))
    cfg = load_config(Path(config_file).expanduser()) if config_file else default_config()
    results_dir = str(context.run_config.get("results-dir", "")) or None
    run = RunDirectory.create(cfg, results_dir)
    # Flower streams its own logger to `flwr run --stream`, so report through it.
    flwr_log(INFO, "fedsec: writing results to %s", run.path)
    built = build_configured_attack(cfg)
    if built is not None and (is_colluding(built) or not simulated_adversary()):
        flwr_log(
            WARNING,
            "fedsec: attack '%s' needs the simulation's adversary mode "
            "(FEDSEC_SIMULATED_ADVERSARY=1 in the server's and clients' environment; "
            "`fedsec run` sets it): without it no colluder acts and the server "
            "neither crafts updates nor scores detection",
            cfg.attack.name,
        )
    run_experiment(grid, cfg, run, on_round=_log_round)
    final = run.rounds[-1]
    flwr_log(
        INFO,
        "fedsec: final test accuracy %.2f%% (round %d)",
        100 * final["test_accuracy"],
        final["round"],
    )


def _log_round(metrics: RoundMetrics) -> None:
    flwr_log(
        INFO,
        "fedsec: round %d: test accuracy %.2f%%, test loss %.4f (%s)",
        metrics["round"],
        100 * metrics["test_accuracy"],
        metrics["test_loss"],
        metrics["status"],
    )
