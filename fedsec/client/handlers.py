"""The fedsec ClientApp's training side: local training and evaluation.

:mod:`fedsec.client.app` names the ClientApp and imports this module only
when a message needs it (training, evaluation): torch, the models, the data
and the attacks are imported here, so that a SuperNode's SecAgg key and
unmask stages (each a fresh ``flwr-clientapp`` process in Flower 1.42) never
pay for them. Every public name here is also reachable as
``fedsec.client.app.<name>``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from fedsec.assembly import build_configured_attack
from fedsec.attacks.data_poisoning import DataPoisoningAttack
from fedsec.attacks.threat import round_generator, simulated_adversary
from fedsec.client.app import _is_malicious, config_from_message, partition_id_of
from fedsec.client.privacy import (
    LedgerUnavailableError,
    NodeLedger,
    node_requires_client_dp,
    open_node_ledger,
    plan_round,
)
from fedsec.config import ExperimentConfig
from fedsec.data import SplitData, client_dataset, load_dataset
from fedsec.models import make_model
from fedsec.npy import record_from_state_dict, state_dict_from_record
from fedsec.params import flatten_state, unflatten_state
from fedsec.privacy.client_level import privatize_update
from fedsec.privacy.dpsgd import dp_sgd_steps, dp_step_probe, dp_train
from fedsec.privacy.modes import ledger_mode_names, mode_of
from fedsec.training import (
    PRECISIONS,
    TrainResult,
    autocast_dtype,
    measure_batch_cap,
    resolve_device,
    train_step_probe,
)
from fedsec.training import (
    evaluate as evaluate_model,
)
from fedsec.training import (
    train as train_model,
)
from fedsec.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DELTA_CAP_KEY,
    DEVICE_KEY,
    EPSILON_CAP_KEY,
    LOCAL_WORK_REFUSED,
    MAX_BATCH_KEY,
    MAX_LOCAL_EXAMPLES_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    PRECISION_KEY,
    PRIVACY_BUDGET_EXHAUSTED,
    PRIVACY_LEDGER_UNUSABLE,
    PRIVATE_EVALUATION_REFUSED,
    SERVER_ROUND_KEY,
    TRUTH_TAG,
)

__all__ = [
    "Hardware",
    "batch_cap",
    "client_partition",
    "dp_against_server",
    "evaluate",
    "local_train",
    "local_work",
    "node_hardware",
    "train",
]

logger = logging.getLogger("fedsec.client.app")


def client_partition(
    cfg: ExperimentConfig, data: SplitData, partition_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition ``partition_id`` of ``data`` as the config's partitioner splits it."""
    return client_dataset(
        data,
        partition_id,
        cfg.data.num_clients,
        cfg.data.partition,
        seed=cfg.experiment.seed,
        alpha=cfg.data.alpha,
        shards_per_partition=cfg.data.shards_per_client,
    )


@dataclass(frozen=True)
class Hardware:
    """Where and how this node computes: device, autocast precision, batch cap."""

    device: torch.device
    precision: str = "fp32"
    #: Examples per forward/backward pass; 0 = automatic (CUDA: fit free memory).
    max_batch: int = 0


def node_hardware(cfg: ExperimentConfig, context: Context) -> Hardware:
    """The experiment's device settings, overridden by this node's node config.

    A SuperNode knows its own hardware: ``--node-config "device='cuda:0'
    precision='bf16' max-batch=64"`` overrides ``experiment.device``,
    ``client.precision`` and ``client.max_batch`` for that node only. A
    deployed node never takes them from the server (defaults ``auto``,
    ``fp32`` and none): they are its hardware, and a server could otherwise
    move it off its GPU, slow it with an autocast its CPU lacks, or make it
    pass one example at a time.

    Raises
    ------
    ValueError
        On an unknown or unavailable device, an unknown precision, or a
        negative ``max-batch``, naming the node config key.
    """
    node = context.node_config
    # A deployed node's device, precision and batch cap are its own (see the docstring).
    simulated = simulated_adversary()
    device = resolve_device(
        str(node.get(DEVICE_KEY, cfg.experiment.device if simulated else "auto"))
    )
    precision = str(node.get(PRECISION_KEY, cfg.client.precision if simulated else "fp32"))
    if precision not in PRECISIONS:
        raise ValueError(
            f"node config precision '{precision}' is unknown; valid: {', '.join(PRECISIONS)}"
        )
    raw_cap = node.get(MAX_BATCH_KEY, cfg.client.max_batch if simulated else 0)
    if isinstance(raw_cap, bool) or not isinstance(raw_cap, int) or raw_cap < 0:
        raise ValueError(f"node config max-batch must be an integer >= 0, got {raw_cap!r}")
    autocast_dtype(precision, device)  # refuses fp16 off CUDA, bf16 where unsupported
    return Hardware(device=device, precision=precision, max_batch=raw_cap)


#: Default of node config ``max-local-examples``: far above a client's usual round
#: (CIFAR-10 split 10 ways, 10 epochs: 50k) and still a bound on what a server asks.
DEFAULT_MAX_LOCAL_EXAMPLES = 1_000_000


def local_work(cfg: ExperimentConfig, num_examples: int) -> int:
    """Examples a round passes forward and backward, each PGD step counting one more pass.

    Steps times the examples of a step: DP-SGD takes
    :func:`~fedsec.privacy.dpsgd.dp_sgd_steps` of ``batch_size`` examples on
    average, other training (and a user's ``train_fn``, bounded the same way)
    ``epochs * ceil(n / batch_size)`` batches, both capped by
    ``client.local_steps``. Counting examples rather than steps keeps a
    server from inflating each step (one batch of the whole data set).
    """
    client = cfg.client
    cap = client.local_steps or None
    batch = min(client.batch_size, num_examples)
    if mode_of(cfg).private_training:
        steps = dp_sgd_steps(num_examples, client.batch_size, client.local_epochs, cap)
    else:
        steps = client.local_epochs * -(-num_examples // batch)
        steps = steps if cap is None else min(steps, cap)
    passes = 1 + cfg.evasion.steps if cfg.evasion.adversarial_training else 1
    return steps * batch * passes


def _refused_round(
    cfg: ExperimentConfig, context: Context, num_examples: int, *, protected: bool
) -> str | None:
    """Why a deployed node refuses this train round before training (None: it does not).

    The round asks more local work than node config ``max-local-examples``;
    the reason names what was asked, not the node's data size. ``protected``
    is :func:`dp_against_server` of this round.

    Raises
    ------
    ValueError
        If the node config ``max-local-examples`` is not an integer >= 1, or the
        node's data DP protects from the server and the config splits it with a
        Dirichlet partition, whose sizes depend on the labels (and ``num-examples``
        and the privacy spend would reveal them).
    """
    if simulated_adversary():  # the simulation's user sets both sides
        return None
    if cfg.data.partition == "dirichlet" and protected:
        raise ValueError(
            "this node's data is protected by differential privacy: a Dirichlet split's "
            "sizes depend on its labels, which num-examples and the privacy spend would "
            "reveal; use partition 'iid' or 'shards'"
        )
    limit = context.node_config.get(MAX_LOCAL_EXAMPLES_KEY, DEFAULT_MAX_LOCAL_EXAMPLES)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"node config {MAX_LOCAL_EXAMPLES_KEY} must be an integer >= 1, got {limit!r}"
        )
    if local_work(cfg, num_examples) <= limit:
        return None
    client = cfg.client
    asked = f"client.local_epochs {client.local_epochs}, batch size {client.batch_size}"
    if client.local_steps:
        asked += f", client.local_steps {client.local_steps}"
    if cfg.evasion.adversarial_training:
        asked += f", {cfg.evasion.steps} PGD steps per batch"
    return (
        f"this round asks more local work ({asked}) than this node's "
        f"{MAX_LOCAL_EXAMPLES_KEY}, {limit} examples"
    )


def batch_cap(
    cfg: ExperimentConfig,
    hardware: Hardware,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> int | None:
    """Examples per pass for this round: the node's cap, or what fits the GPU's free memory.

    Only a cap below the batch size changes anything (the batch then goes in
    chunks); on CPU and MPS, with no cap configured, there is none.
    """
    if hardware.max_batch:
        return hardware.max_batch
    if hardware.device.type != "cuda":
        return None
    model.to(hardware.device)
    probe_x, probe_y = x[:64].to(hardware.device), y[:64].to(hardware.device, dtype=torch.long)
    if len(probe_y) < 16:  # too little data to measure, and too little to need a cap
        return None
    probe = dp_step_probe if mode_of(cfg).private_training else train_step_probe
    cap = measure_batch_cap(
        probe(model, probe_x, probe_y, precision=hardware.precision),
        hardware.device,
        probe_sizes=(len(probe_y) // 2, len(probe_y)),
        reserve=x.nelement() * 4 + y.nelement() * 8,  # the local data, moved there next
    )
    logger.info("memory-aware batch cap on %s: %s examples per pass", hardware.device, cap)
    return cap


def _local_setup(
    msg: Message, context: Context
) -> tuple[ExperimentConfig, int, torch.nn.Module, torch.Tensor, torch.Tensor, Hardware]:
    cfg = config_from_message(msg, context)
    partition_id = partition_id_of(context, cfg)
    hardware = node_hardware(cfg, context)
    # On a deployed node cfg.data.data_dir is already the node's own (config_from_message).
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)
    x, y = client_partition(cfg, data, partition_id)
    model = _resident_model(cfg.model.name, data.info.input_shape, data.info.num_classes)
    model.load_state_dict(state_dict_from_record(msg.content.array_records[ARRAYS_KEY]))
    return cfg, partition_id, model, x, y, hardware


#: One model per (name, input shape, classes) per process, reused by every message.
_MODELS: dict[tuple[str, tuple[int, int, int], int], torch.nn.Module] = {}


def _resident_model(name: str, shape: tuple[int, int, int], classes: int) -> torch.nn.Module:
    """The process's model of that architecture, built once (keeping models resident).

    Every message loads the full global state into it (``load_state_dict`` is
    strict), so nothing of an earlier message survives, and messages are
    handled one at a time per process (Flower's simulation actors, the
    in-process grid, one ``flwr-clientapp`` process per message when
    deployed). A model with non-persistent buffers (state the state dict does
    not carry), or built by a user's factory (``"pkg.mod:factory"``), is built
    afresh every time.
    """
    if ":" in name:  # a user's factory: its model may keep state we cannot see
        return make_model(name, shape, classes)
    key = (name, shape, classes)
    model = _MODELS.get(key)
    if model is None:
        model = make_model(name, shape, classes)
        persistent = set(model.state_dict())
        if any(n not in persistent for n, _ in model.named_buffers()):
            return model
        _MODELS[key] = model
    # A loop that zeroes gradients after its step would otherwise start from the
    # last message's; state_dict does not carry .grad, load_state_dict keeps it.
    model.zero_grad(set_to_none=True)
    return model


def local_train(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device,
    seed: int,
    adversarial: Any = None,
    precision: str = "fp32",
    max_batch: int | None = None,
) -> TrainResult:
    """Local training with the config's client settings (clients and the FLTrust server).

    ``client.train_fn`` names the user's own loop, which then replaces fedsec's
    (:func:`fedsec.registry.run_train_fn`).
    """
    if cfg.client.train_fn:
        from fedsec.registry import run_train_fn

        return run_train_fn(cfg, model, x, y, device=device, seed=seed)
    return train_model(
        model,
        x,
        y,
        epochs=cfg.client.local_epochs,
        batch_size=cfg.client.batch_size,
        optimizer=cfg.client.optimizer,
        lr=cfg.client.lr,
        momentum=cfg.client.momentum,
        weight_decay=cfg.client.weight_decay,
        device=device,
        seed=seed,
        adversarial=adversarial,
        max_steps=cfg.client.local_steps or None,
        precision=precision,
        max_batch=max_batch,
    )


def _adversarial_hook(cfg: ExperimentConfig, seed: int) -> Any:
    """PGD adversarial training (Madry et al. 2018) when ``evasion.adversarial_training``."""
    if not cfg.evasion.adversarial_training:
        return None
    from fedsec.attacks.evasion import pgd_adversary, pixel_eps_to_input
    from fedsec.data import DATASETS, pixel_bounds

    info = DATASETS.get(cfg.data.dataset)
    eps = pixel_eps_to_input(cfg.evasion.eps, info)
    alpha = cfg.evasion.alpha or 2.5 * cfg.evasion.eps / cfg.evasion.steps
    return pgd_adversary(
        eps=eps,
        alpha=pixel_eps_to_input(alpha, info),
        steps=cfg.evasion.steps,
        bounds=pixel_bounds(info),
        seed=seed,
    )


def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition (the ``train`` handler's body).

    With client-side DP (``dp-sgd``, ``local``) the round runs under the node's
    ledger lock and its spend is committed (written durably) before the reply
    is returned; a ledger that cannot be used makes the node answer with the
    error :data:`~fedsec.client.privacy.PRIVACY_LEDGER_UNUSABLE` instead.
    """
    cfg, partition_id, model, x, y, hardware = _local_setup(msg, context)
    round_config = msg.content.config_records[CONFIG_KEY]
    server_round = round_config.get(SERVER_ROUND_KEY, 0)
    if not isinstance(server_round, int):
        raise ValueError(f"'server-round' must be an integer, got {server_round!r}")
    # Where DP protects the data from the server, training loss and accuracy (exact
    # statistics of it) stay on the node, and label-dependent splits are refused.
    protected = dp_against_server(cfg, context)
    refused = _refused_round(cfg, context, len(y), protected=protected)
    if refused is not None:  # before the ledger: a refused round spends nothing
        return Message(Error(code=LOCAL_WORK_REFUSED, reason=refused), reply_to=msg)
    if not mode_of(cfg).keeps_ledger:
        if node_requires_client_dp(context):
            # A server must not turn a node's DP off: its caps would then cap nothing.
            reason = (
                f"this node caps its privacy spend ({EPSILON_CAP_KEY}/{DELTA_CAP_KEY}) and "
                f"trains only with client-side DP ({', '.join(ledger_mode_names())}), not privacy "
                f"mode '{cfg.privacy.mode}'"
            )
            return Message(Error(code=PRIVACY_LEDGER_UNUSABLE, reason=reason), reply_to=msg)
        return _train(
            msg, cfg, partition_id, model, x, y, hardware, server_round, None, not protected
        )
    try:
        with open_node_ledger(context, cfg, round_config, partition_id) as node_ledger:
            return _train(
                msg,
                cfg,
                partition_id,
                model,
                x,
                y,
                hardware,
                server_round,
                node_ledger,
                not protected,
            )
    except LedgerUnavailableError as err:
        return Message(Error(code=PRIVACY_LEDGER_UNUSABLE, reason=str(err)), reply_to=msg)


def _train(
    msg: Message,
    cfg: ExperimentConfig,
    partition_id: int,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hardware: Hardware,
    server_round: int,
    node_ledger: NodeLedger | None,
    stats: bool,
) -> Message:
    device = hardware.device
    # Distinct, reproducible randomness per client and round.
    seed = cfg.experiment.seed * 1_000_003 + server_round * 10_007 + partition_id
    malicious = _is_malicious(cfg, partition_id, server_round)
    attack = build_configured_attack(cfg) if malicious else None
    if isinstance(attack, DataPoisoningAttack):
        x, y = attack.poison(x, y, round_generator(seed, server_round, salt=1))
    # The DP noise's randomness: outside a simulation never derived from the run's
    # config, which the server sends (seed, round, partition): a server knowing the
    # noise could subtract it. In a simulation it stays reproducible.
    noise_seed = seed if simulated_adversary() else secrets.randbits(63)
    ledger, plan = None, None
    if node_ledger is not None:
        ledger = node_ledger.ledger
        plan = plan_round(cfg, len(y))
        if ledger.would_exceed(plan.noise_multiplier, plan.sample_rate, plan.steps)[0]:
            reason = ledger.refusal_reason(plan.noise_multiplier, plan.sample_rate, plan.steps)
            return Message(Error(code=PRIVACY_BUDGET_EXHAUSTED, reason=reason), reply_to=msg)
    mode = mode_of(cfg)
    # The received model, to privatize the update against (local DP only).
    global_state = (
        {k: v.clone() for k, v in model.state_dict().items()} if mode.noises_update else {}
    )
    max_batch = batch_cap(cfg, hardware, model, x, y)
    if mode.private_training:
        assert ledger is not None and plan is not None
        dp_result = dp_train(
            model,
            x,
            y,
            epochs=cfg.client.local_epochs,
            batch_size=cfg.client.batch_size,
            lr=cfg.client.lr,
            momentum=cfg.client.momentum,
            weight_decay=cfg.client.weight_decay,
            optimizer=cfg.client.optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            device=device,
            seed=noise_seed,
            secure_mode=cfg.privacy.secure_mode,
            max_steps=cfg.client.local_steps or None,
            precision=hardware.precision,
            max_batch=max_batch,
        )
        result = dp_result.train
        ledger.record(plan.noise_multiplier, dp_result.sample_rate, dp_result.steps)
    else:
        result = local_train(
            cfg,
            model,
            x,
            y,
            device=device,
            seed=seed,
            adversarial=_adversarial_hook(cfg, seed),
            precision=hardware.precision,
            max_batch=max_batch,
        )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES_KEY: result.num_examples,
            # Names this client in the server's decisions.jsonl (node ids are random).
            PARTITION_ID_KEY: partition_id,
        }
    )
    if stats:
        metrics["train_loss"] = result.loss
        metrics["train_accuracy"] = result.accuracy
    state = model.state_dict()
    if mode.noises_update:
        # Clip and noise the whole update on the device, before anything leaves it.
        assert ledger is not None and plan is not None
        update = privatize_update(
            flatten_state(state) - flatten_state(global_state),
            clip=cfg.privacy.update_clip,
            noise_multiplier=plan.noise_multiplier,
            generator=None
            if cfg.privacy.secure_mode
            else (
                round_generator(seed, server_round, 4)
                if simulated_adversary()
                else torch.Generator().manual_seed(noise_seed)
            ),
            secure=cfg.privacy.secure_mode,
        )
        state = unflatten_state(flatten_state(global_state) + update, global_state)
        ledger.record(plan.noise_multiplier, plan.sample_rate, plan.steps)
    if node_ledger is not None:
        # Durable before the update leaves: a crash from here on over-counts, never under.
        node_ledger.commit()
        metrics["dp_epsilon_max"] = node_ledger.ledger.spent()
    if malicious and simulated_adversary():
        # The referee's tag. The update itself is poisoned outside this handler, by
        # the public attack_mod (fedsec.client.app.configured_attack_mod) or, for
        # colluders, collusion_mod, which also tags.
        metrics[TRUTH_TAG] = 1
    content = RecordDict({ARRAYS_KEY: record_from_state_dict(state), METRICS_KEY: metrics})
    return Message(content=content, reply_to=msg)


def dp_against_server(cfg: ExperimentConfig, context: Context) -> bool:
    """Whether this deployed node's data is protected by DP from the server itself.

    True for the privacy modes whose noise the clients add (``dp-sgd``,
    ``local``, ``distributed``) and for a node that caps its spend. Such a
    node sends nothing about its data but the privatised update and its size:
    no evaluation replies and no training loss or accuracy, which are exact
    statistics of its data outside the budget (a server sending a model that
    always predicts class k learns how many examples of class k the node
    holds). Simulations keep every metric.
    """
    if simulated_adversary():
        return False
    return mode_of(cfg).runs_on in ("client", "secure-sum") or node_requires_client_dp(context)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local partition (the ``evaluate`` body).

    A deployed node whose data DP protects from the server refuses
    (:func:`dp_against_server`), before it loads any data.
    """
    cfg = config_from_message(msg, context)
    if dp_against_server(cfg, context):
        reason = (
            f"this node's data is protected by differential privacy (privacy mode "
            f"'{cfg.privacy.mode}'); an evaluation reply would release exact statistics of "
            f"it outside the privacy budget"
        )
        return Message(Error(code=PRIVATE_EVALUATION_REFUSED, reason=reason), reply_to=msg)
    _, _, model, x, y, hardware = _local_setup(msg, context)
    result = evaluate_model(
        model,
        x,
        y,
        batch_size=min(512, hardware.max_batch or 512),
        device=hardware.device,
        precision=hardware.precision,
    )
    content = RecordDict(
        {
            METRICS_KEY: MetricRecord(
                {
                    "eval_loss": result.loss,
                    "eval_accuracy": result.accuracy,
                    NUM_EXAMPLES_KEY: result.num_examples,
                }
            )
        }
    )
    return Message(content=content, reply_to=msg)
