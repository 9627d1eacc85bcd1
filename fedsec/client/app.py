"""The fedsec ClientApp: local training and evaluation on the client's partition.

A client in the configured malicious set (see :mod:`fedsec.attacks.threat`)
poisons its training data (data-poisoning attacks, in the handler), perturbs or
boosts its own update (attacks that need no collusion: the public
:func:`~fedsec.client.attack_mods.attack_mod`, configured from the round's
config by :func:`configured_attack_mod`), or colludes through the simulation's
adversary (colluding attacks: :func:`~fedsec.client.collusion.collusion_mod`
around ``secagg_mod``), from ``attack.start_round`` on, and only in a
simulation's adversary mode. The app is built from the same public mods a user
composes: ``signing_mod`` outermost, then secure aggregation, then the attack.

The server sends the validated experiment config with every message (as JSON
under ``fedsec-config``), so a client needs nothing but its node config:
``partition-id`` (which Flower's simulation engine sets, and a SuperNode gets
from ``--node-config``). Replies carry the trained model in the ArrayRecord
``arrays`` and ``num-examples`` plus metrics in the MetricRecord ``metrics``.

The user's own code: a config may name the model, data set, partitioner and
training function as dotted ``"package.module:factory"`` names
(:mod:`fedsec.registry`). A config from the server is not the node's to
trust, so outside a simulation (:func:`~fedsec.attacks.threat.simulated_adversary`)
this node resolves dotted names only in the module prefixes its operator lists
in the node config ``user-modules`` (``--node-config "partition-id=0
user-modules='mypkg,lab.models'"``; none by default) and refuses every other
config in one line (:func:`fedsec.registry.restrict_user_code`). Likewise the
configured attack (who is malicious, what it does) acts only in a simulation:
a server cannot make a deployed node poison, flip or boost its own update.

With client-side DP a node keeps its privacy ledger on disk, in its node
config's ``state-dir`` (``--node-config "partition-id=0 state-dir='/path'"``;
see :mod:`fedsec.client.privacy` for the default and for simulations), and
writes each round's spend there before its update leaves.

Import cost: Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process
for every message, which imports this module first. So it imports nothing
heavy: the signing and SecAgg mods need only numpy and cryptography, and the
training side (:mod:`fedsec.client.handlers`: torch, the models, the data,
Opacus where an accountant is used) is imported by the handlers, when a
message trains or evaluates. SecAgg's key and unmask stages never import it.
The training side's public names (:class:`Hardware`, :func:`local_train`, ...)
stay importable from here.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedsec.client.collusion import collusion_mod
from fedsec.client.secagg_mod import secagg_mod
from fedsec.client.signing_mod import signing_mod
from fedsec.config import DataSection, ExperimentConfig, parse_config
from fedsec.registry import check_module_prefixes, restrict_user_code
from fedsec.wire import (
    CONFIG_KEY,
    DATA_DIR_KEY,
    PARTITION_ID_KEY,
    SERVER_ROUND_KEY,
    USER_MODULES_KEY,
    WIRE_CONFIG_KEY,
)

if TYPE_CHECKING:
    from fedsec.client.handlers import (
        Hardware,
        batch_cap,
        client_partition,
        local_train,
        node_hardware,
    )

__all__ = [
    "USER_MODULES_KEY",
    "Hardware",
    "app",
    "batch_cap",
    "client_partition",
    "config_from_message",
    "configured_attack_mod",
    "evaluate_handler",
    "is_colluding_client",
    "local_train",
    "node_data_dir",
    "node_hardware",
    "partition_id_of",
    "train_handler",
    "user_modules",
]

#: Names defined by the training side, loaded on first access (PEP 562).
_TRAINING_SIDE = frozenset(
    {"Hardware", "batch_cap", "client_partition", "local_train", "node_hardware"}
)

# USER_MODULES_KEY (node config: comma-separated module prefixes in which this node
# resolves the dotted names of a config the server sends; none by default) is defined in
# fedsec.wire (re-exported here).

logger = logging.getLogger("fedsec.client.app")

app = ClientApp()


def config_from_message(msg: Message, context: Context | None = None) -> ExperimentConfig:
    """Parse and validate the experiment config the server sent.

    Outside a simulation the config's dotted names resolve only in the module
    prefixes of ``context``'s node config ``user-modules`` (none without a
    context): the server must not choose what this node imports or calls.

    Raises
    ------
    ValueError
        If the message carries no config or an invalid one (a refused dotted
        name among them), or the node config ``user-modules`` is malformed.
    """
    config_record = msg.content.config_records.get(CONFIG_KEY)
    if config_record is None or WIRE_CONFIG_KEY not in config_record:
        raise ValueError(f"message carries no '{WIRE_CONFIG_KEY}' config")
    allowed = user_modules(context)
    # A deployed node validates (data set sizes, limits) and trains on its own data folder.
    folder = None if allowed is None else node_data_dir(context)
    return _parse_wire_config(str(config_record[WIRE_CONFIG_KEY]), allowed, folder)


def node_data_dir(context: Context | None) -> str:
    """The folder a deployed node loads its data sets from: its own, never the server's.

    Node config ``data-dir`` (``--node-config "partition-id=0
    data-dir='/srv/mnist'"``), which must be an existing folder, else the
    config's default (``data``, under the SuperNode's working directory). The
    ``data.data_dir`` of the config the server sends is replaced by it before
    the config is validated, since a server could otherwise point the node at
    data its operator did not mean to train on (and so expose), or probe the
    node's file system through validation errors. Simulations, whose server
    and clients are one user's processes, keep the config's folder.

    Raises
    ------
    ValueError
        If ``data-dir`` is set and is not an existing folder, naming the key.
    """
    default = DataSection().data_dir
    if context is None or DATA_DIR_KEY not in context.node_config:
        return default
    folder = Path(str(context.node_config[DATA_DIR_KEY])).expanduser()
    if not folder.is_dir():
        raise ValueError(f"node config {DATA_DIR_KEY} '{folder}' is not an existing folder")
    return str(folder)


def user_modules(context: Context | None) -> tuple[str, ...] | None:
    """Module prefixes in which a server's config may name code; None: any (simulation).

    Raises
    ------
    ValueError
        If the node config ``user-modules`` is not a comma-separated list of
        module names, or lists a standard-library module.
    """
    from fedsec.attacks.threat import simulated_adversary

    if simulated_adversary():  # the config is the simulation's user's own
        return None
    value = "" if context is None else context.node_config.get(USER_MODULES_KEY, "")
    if not isinstance(value, str):
        raise ValueError(
            f"node config '{USER_MODULES_KEY}' must be comma-separated module names, got {value!r}"
        )
    prefixes = [part.strip() for part in value.split(",") if part.strip()]
    return check_module_prefixes(prefixes, where=f"node config '{USER_MODULES_KEY}'")


@functools.lru_cache(maxsize=8)
def _parse_wire_config(
    text: str, allowed: tuple[str, ...] | None, data_dir: str | None = None
) -> ExperimentConfig:
    # The same config arrives every round; validation builds the rule and the
    # attack and may solve for the DP noise, so do it once per process. The
    # policy is part of the key: a config accepted under one is not under another.
    # data_dir is a deployed node's own folder (None: a simulation's client).
    raw = json.loads(text)
    if data_dir is not None and isinstance(raw, dict):  # anything else: parse_config refuses
        _deployed_node_settings(raw, data_dir)
    if allowed is None:
        return parse_config(raw)
    with restrict_user_code(allowed):
        return parse_config(raw)


def _deployed_node_settings(raw: dict[str, Any], data_dir: str) -> None:
    """Replace, in a server-sent config, what a deployed node decides itself.

    Its data folder (see :func:`node_data_dir`), and its accountant: PRV's
    memory grows without bound as the noise (or delta) falls, both of which the
    server chooses, and RDP's epsilon bounds PRV's from above, so accounting
    with RDP spends no more of the budget than the config allows.
    """
    if raw.get("data") is None:
        raw["data"] = {}
    data = raw["data"]
    if isinstance(data, dict):  # anything else: parse_config refuses
        sent = data.get("data_dir", DataSection().data_dir)
        if sent != data_dir:
            logger.warning(
                "using this node's data folder %r, not the server's data.data_dir %r "
                "(node config %s)",
                data_dir,
                sent,
                DATA_DIR_KEY,
            )
        data["data_dir"] = data_dir
    privacy = raw.get("privacy")
    if isinstance(privacy, dict) and privacy.get("accountant") == "prv":
        logger.warning("a deployed node accounts with 'rdp', not the server's 'prv'")
        privacy["accountant"] = "rdp"


def partition_id_of(context: Context, cfg: ExperimentConfig) -> int:
    """This node's partition, checked against the configured number of clients."""
    if PARTITION_ID_KEY not in context.node_config:
        raise ValueError("node config has no 'partition-id' (set it with --node-config)")
    partition_id = int(context.node_config[PARTITION_ID_KEY])
    if not 0 <= partition_id < cfg.data.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {cfg.data.num_clients}) (data.num_clients)"
        )
    return partition_id


def _is_malicious(cfg: ExperimentConfig, partition_id: int, server_round: int) -> bool:
    """Whether this node plays a malicious client: in a simulation only.

    The config comes from the server; on a deployed node its ``attack`` section
    must not make an honest node poison, flip or boost its update (a boosted
    update would stand out of a secure sum: the server could read it).
    """
    from fedsec.attacks.threat import malicious_partitions, num_malicious, simulated_adversary

    attack = cfg.attack
    if not simulated_adversary() or attack.name == "none" or server_round < attack.start_round:
        return False
    count = num_malicious(cfg.data.num_clients, attack.num_malicious, attack.fraction)
    return partition_id in malicious_partitions(cfg.data.num_clients, count, cfg.experiment.seed)


def is_colluding_client(msg: Message, context: Context) -> bool:
    """Whether this node plays a colluding attacker in the round ``msg`` belongs to.

    Never outside a simulation's adversary mode: the round's config comes from
    the server, which must not be able to make an honest node act as a colluder.
    """
    from fedsec.assembly import build_configured_attack
    from fedsec.attacks.threat import is_colluding, simulated_adversary

    if not simulated_adversary():
        return False
    cfg = config_from_message(msg, context)
    server_round = msg.content.config_records[CONFIG_KEY].get(SERVER_ROUND_KEY, 0)
    if not isinstance(server_round, int) or not _is_malicious(
        cfg, partition_id_of(context, cfg), server_round
    ):
        return False
    return is_colluding(build_configured_attack(cfg))


def configured_attack_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The config's non-colluding model attack and boost, through the public :func:`attack_mod`.

    fedsec's own ClientApp composes the same mods a user would write
    (:func:`fedsec.client.attack_mods.attack_mod`), built from the round's
    config: the attack's ``perturb`` inside, then the boost (``scaling`` with
    ``gamma`` = the effective boost, Bagdasaryan et al., AISTATS 2020) around
    it. Data-poisoning attacks change the training data in the handler and may
    be boosted here; colluding attacks are left to ``collusion_mod``. Honest
    nodes, other messages and anything outside a simulation pass through.
    """
    from fedsec.attacks.threat import simulated_adversary

    if msg.metadata.message_type.split(".")[0] != "train" or not simulated_adversary():
        return call_next(msg, context)
    cfg = config_from_message(msg, context)
    server_round = msg.content.config_records[CONFIG_KEY].get(SERVER_ROUND_KEY, 0)
    if not isinstance(server_round, int) or not _is_malicious(
        cfg, partition_id_of(context, cfg), server_round
    ):
        return call_next(msg, context)
    from fedsec.assembly import build_configured_attack, sampled_clients
    from fedsec.attacks.model_poisoning import PerClientAttack, Scaling
    from fedsec.attacks.threat import effective_boost, is_colluding, num_malicious
    from fedsec.client.attack_mods import attack_mod

    attack = build_configured_attack(cfg)
    if is_colluding(attack):
        return call_next(msg, context)
    sampled = sampled_clients(cfg)
    expected_attackers = (
        num_malicious(cfg.data.num_clients, cfg.attack.num_malicious, cfg.attack.fraction)
        * sampled
        / cfg.data.num_clients
    )
    boost = effective_boost(cfg.attack.boost, sampled, cfg.server.lr, expected_attackers)
    chosen: list[PerClientAttack] = [] if boost == 1 else [Scaling(gamma=boost)]
    if isinstance(attack, PerClientAttack):
        chosen.append(attack)
    # Outermost first, as in ClientApp(mods=...): the boost scales what the attack made.
    mods = [
        attack_mod(each, malicious=_always, seed=cfg.experiment.seed, num_clients=sampled)
        for each in chosen
    ]
    return make_ffn(call_next, mods)(msg, context)


def _always(context: Context) -> bool:
    # The round's membership was decided by configured_attack_mod (start_round included).
    return True


#: SecAgg's mod inside the colluders' mod, which acts only in a simulation's adversary
#: mode and only on the configured colluders; elsewhere it is ``secagg_mod`` alone.
_secagg_or_collude = collusion_mod(secagg_mod, malicious=is_colluding_client)


@app.train(mods=[signing_mod, _secagg_or_collude, configured_attack_mod])
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition.

    With client-side DP (``dp-sgd``, ``local``) the round runs under the node's
    ledger lock and its spend is committed (written durably) before the reply
    is returned; a ledger that cannot be used makes the node answer with the
    error :data:`~fedsec.client.privacy.PRIVACY_LEDGER_UNUSABLE` instead.
    SecAgg stages other than masked input are answered by :func:`secagg_mod`
    and never reach this function (nor import the training side).
    """
    from fedsec.client.handlers import train

    return train(msg, context)


@app.evaluate(mods=[signing_mod])
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local partition."""
    from fedsec.client.handlers import evaluate

    return evaluate(msg, context)


def __getattr__(name: str) -> Any:
    if name not in _TRAINING_SIDE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("fedsec.client.handlers"), name)
    globals()[name] = value  # later lookups skip this function
    return value
