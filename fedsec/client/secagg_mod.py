"""Client side of secure aggregation as a Flower mod on the ``train`` handler.

The server's SecAgg+ workflow (:mod:`fedsec.strategies.secagg`) sends each
protocol stage as a ``train`` message carrying the ConfigRecord
``fedsec-secagg``; messages without it pass straight to the training function.
The mod keeps the round's :class:`~fedsec.secagg.client.SecAggClient` state in
``context.state`` between messages. At the masked-input stage it runs the
training function, turns the returned model into the update (returned minus
received), weights it by ``min(num_examples, weight_cap) / weight_cap`` and
replies with the masked vector only: no model, no per-client metrics. Every
parameter the mod needs travels in the protocol's own messages (``weight_cap``
in the masked-input request), so it works in any Flower ClientApp, with no
application config on the wire.

The masked vector holds the model's floating point arrays only, flattened as
float32 in the record's order: the layout and ``dim`` of the server's
``ArraySpec`` (:mod:`fedsec.strategies.arrays`). Integer and boolean arrays
(buffers such as BatchNorm's ``num_batches_tracked``) never enter it; in a
secure round the server keeps its own values of them (no client's value is
seen), so a node's counters never leave the node.

Anything the mod refuses (a malformed or out-of-order request, a tampered
share, too few neighbours) becomes an error reply, which the server treats as
a dropout; the client's state is left as it was.

Signed mode (malicious server): the client's identity is the node config
``secagg-identity`` (default ``client-<partition-id>``); its Ed25519 key
``<identity>.pem`` and every trusted ``<name>.pub`` are read from the node
config ``secagg-key-dir``, which in a simulation may come from the
experiment's ``secagg.key_dir`` instead (there server and clients share a
machine; a deployment must not take its trust anchors from the server). A
node whose config names ``secagg-key-dir`` or ``secagg-identity`` refuses
unsigned rounds, so the server cannot downgrade it.

No plain rounds (node config ``secagg-required = true``): a training request
without a SecAgg stage otherwise passes straight to the training function, as
with Flower's own ``secaggplus_mod``, and its reply carries the trained model
in plain. That is how a plain federation works, but it also lets any server
(including one that promised secure aggregation, or one that a signed node
refuses for unsigned rounds) simply ask for a plain update. A node that must
never reveal its update sets ``secagg-required``; it then refuses, before
training, every ``train`` message that carries no SecAgg stage of this round.

Node limits (what a server can make this node spend on one round): the node
config ``secagg-max-nodes`` (default and ceiling 100,000) and
``secagg-max-degree`` (default and ceiling 1,024) refuse, at advertise-keys and
before any work, a round of more clients or a larger graph degree. A client
builds only its own row of the neighbour graph, and every list a request
carries is refused beyond ``k`` (neighbours, shares) or ``n`` (survivors,
signatures) before it is parsed further. ``secagg-min-sum`` (default 2): no
survivor set smaller than this is unmasked.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from fedsec.secagg.client import (
    DEFAULT_MAX_DEGREE,
    DEFAULT_MAX_NODES,
    ClientStage,
    SecAggClient,
)
from fedsec.secagg.messages import (
    MAX_CLIENTS,
    MAX_DEGREE,
    AdvertiseKeysRequest,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    ProtocolError,
    ShareKeysRequest,
    UnmaskRequest,
    request_from_record,
)
from fedsec.wire import (  # the wire names this module's __all__ re-exports
    ARRAYS_KEY,
    CONFIG_KEY,
    DP_EPSILON_MAX_KEY,
    IDENTIFY_STAGE,
    MASKED_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SECAGG_IDENTITY_KEY,
    SECAGG_KEY,
    SECAGG_KEY_DIR_KEY,
    SECAGG_MIN_SUM_KEY,
    SECAGG_NEXT_KEY,
    SECAGG_REFUSED,
    SECAGG_REQUIRED_KEY,
    WIRE_CONFIG_KEY,
)

if TYPE_CHECKING:
    # torch only at masked input: a SuperNode runs each message in a fresh process,
    # and the other stages (keys, unmask) must not pay for importing it.
    import torch

__all__ = [
    "IDENTIFY_STAGE",
    "MASKED_KEY",
    "SECAGG_KEY",
    "SECAGG_NEXT_KEY",
    "SECAGG_REFUSED",
    "SECAGG_REQUIRED_KEY",
    "load_identity",
    "secagg_mod",
]

logger = logging.getLogger("fedsec")

# SECAGG_KEY, SECAGG_NEXT_KEY, MASKED_KEY, SECAGG_REFUSED, IDENTIFY_STAGE and
# SECAGG_REQUIRED_KEY are defined in fedsec.wire (re-exported here).
#: Metrics a client may reveal under secure aggregation (they are not about its data).
PUBLIC_METRICS = (DP_EPSILON_MAX_KEY,)


def _refuse(msg: Message, reason: str) -> Message:
    logger.warning("secagg: refused %s", reason)
    return Message(Error(code=SECAGG_REFUSED, reason=reason), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the SecAgg+ stages a ``train`` message carries, or pass it on.

    ``fedsec-secagg`` holds a stage of the current round; ``fedsec-secagg-next``
    (pipelining) a set-up stage of the next round, answered after it under the
    same key. Each round's state lives in its own slot of ``context.state``.
    """
    records = msg.content.config_records
    if msg.metadata.message_type != MessageType.TRAIN or not (
        SECAGG_KEY in records or SECAGG_NEXT_KEY in records
    ):
        # Any train message ("train" or a named "train.<action>") leaves a plain reply.
        if msg.metadata.message_type.split(".")[0] == MessageType.TRAIN:
            refusal = _plain_round_refusal(context)
            if refusal:
                return _refuse(msg, refusal)
        return call_next(msg, context)
    reply = RecordDict()
    for key in (SECAGG_KEY, SECAGG_NEXT_KEY):
        if key not in records:
            continue
        record = dict(records[key])
        stage = record.get("stage")
        try:
            if stage == IDENTIFY_STAGE and key == SECAGG_KEY:
                reply[key] = ConfigRecord({"identity": load_identity(context, msg)[0]})
                continue
            request = request_from_record(record)
            if key == SECAGG_NEXT_KEY and not isinstance(
                request, AdvertiseKeysRequest | ShareKeysRequest
            ):
                raise ProtocolError(f"stage {request.stage} cannot run ahead")
            client = _load_client(context, msg, request)
            if isinstance(request, MaskedInputRequest):
                trained = _masked_input(msg, context, call_next, client, request)
                if trained.has_error():
                    # An error (e.g. privacy budget exhausted) is a dropout; the state
                    # stays as it was.
                    return trained
                for name, item in trained.content.items():
                    reply[name] = item
            else:
                reply[key] = ConfigRecord(_answer(client, request))
            _save_client(context, client)
        except (ProtocolError, OSError, ValueError) as err:
            reason = f"{stage if isinstance(stage, str) else '?'}: {err}"
            if key == SECAGG_NEXT_KEY:
                # The current round's answer stands; the next round counts this
                # client as dropped at set-up (its reply lacks the record).
                logger.warning("secagg: refused next round's %s", reason)
                continue
            return _refuse(msg, reason)
    return Message(reply, reply_to=msg)


def _plain_round_refusal(context: Context) -> str:
    """Why this node refuses a plain training request ("" when it does not).

    A malformed ``secagg-required`` refuses too (one line naming the key):
    a typo must not silently reopen plain rounds.
    """
    value = context.node_config.get(SECAGG_REQUIRED_KEY, False)
    if value is False:
        return ""
    if value is True:
        return (
            f"plain training request: this node trains only in secure aggregation rounds "
            f"(node config {SECAGG_REQUIRED_KEY})"
        )
    return f"node config {SECAGG_REQUIRED_KEY} must be true or false, got {value!r}"


def _answer(client: SecAggClient, request: Any) -> dict[str, Any]:
    """The record answering a request of any stage but masked-input."""
    if isinstance(request, AdvertiseKeysRequest):
        return client.advertise_keys(request).to_record()
    if isinstance(request, ShareKeysRequest):
        return client.share_keys(request).to_record()
    if isinstance(request, ConsistencyCheckRequest):
        return client.consistency_check(request).to_record()
    assert isinstance(request, UnmaskRequest)
    return client.unmask(request).to_record()


def _masked_input(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    client: SecAggClient,
    request: MaskedInputRequest,
) -> Message:
    """Check the shares, train, then answer with the masked weighted update only."""
    client.receive_shares(request)  # refuse before spending time on training
    setup = client.setup
    assert setup is not None
    _check_distributed_noise(msg, context, setup)
    sent = msg.content.array_records.get(ARRAYS_KEY)
    size = _masked_size(sent) if sent is not None else 0
    if sent is not None and size != setup.dim:  # the round's vector must be the model sent
        raise ProtocolError(
            f"the model sent has {size} float values, the round expects {setup.dim}"
        )
    trained = call_next(msg, context)
    if trained.has_error():
        return trained
    back = trained.content.array_records.get(ARRAYS_KEY)
    if sent is None or back is None:
        raise ProtocolError("masked-input stage needs the model in 'arrays' both ways")
    update = _flat_update(sent, back)
    if update.numel() != setup.dim:
        raise ProtocolError(f"update has {update.numel()} values, the round expects {setup.dim}")
    metrics = trained.content.metric_records.get(METRICS_KEY, MetricRecord())
    masked = client.mask(update, _weight(metrics.get(NUM_EXAMPLES_KEY), request.weight_cap))
    public = MetricRecord({k: metrics[k] for k in PUBLIC_METRICS if k in metrics})
    content = RecordDict(
        {
            MASKED_KEY: ArrayRecord({MASKED_KEY: Array(masked.masked)}),
            METRICS_KEY: public,
        }
    )
    return Message(content, reply_to=msg)


def _check_distributed_noise(msg: Message, context: Context, setup: AdvertiseKeysRequest) -> None:
    """Under fedsec's distributed DP, refuse a round that asks less noise than the config.

    The Skellam noise a client adds is the round's ``noise_variance``, which the
    server sends; a server sending 0 would get updates without noise from nodes
    that believe their data protected. The client recomputes the plan from the
    config it validated (its noise multiplier and ``privacy.update_clip``) and
    the round's own encoding and smallest unmasked sum (``min_survivors``, which
    it enforces at unmasking), and refuses anything smaller. A user's ClientApp
    (no fedsec config in the message) is not checked.

    Raises
    ------
    ProtocolError
        If the round clips beyond the config's bound (``privacy.update_clip``),
        names no smallest sum, or asks less noise or headroom than the config's
        noise multiplier needs.
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or WIRE_CONFIG_KEY not in config:
        return
    from fedsec.client.app import config_from_message
    from fedsec.privacy.distributed import plan_skellam
    from fedsec.privacy.modes import mode_of

    cfg = config_from_message(msg, context)
    mode = mode_of(cfg)
    sigma = mode.secure_noise_multiplier(cfg)
    if sigma <= 0:  # the config's mode adds no noise inside the sum
        return
    bound = mode.secure_norm_bound(cfg)
    if not 0.0 < setup.norm_bound <= bound:
        raise ProtocolError(
            f"distributed DP: the round clips updates to {setup.norm_bound}, not within "
            f"(0, {bound}] (the config's bound)"
        )
    if setup.min_survivors < 1:
        raise ProtocolError("distributed DP: the round names no smallest sum to size its noise")
    try:
        plan = plan_skellam(
            noise_multiplier=sigma,
            norm_bound=setup.norm_bound,
            clip=setup.clip,
            dim=setup.dim,
            num_clients=setup.num_clients,
            min_clients=setup.min_survivors,
            modulus_bits=setup.modulus_bits,
            bits=setup.bits,
        )
    except ValueError as err:
        raise ProtocolError(f"distributed DP: the round cannot carry the noise: {err}") from None
    if setup.noise_variance < plan.client_variance * (1 - 1e-9) or setup.headroom < plan.headroom:
        raise ProtocolError(
            f"distributed DP: the round asks noise variance {setup.noise_variance:.6g} "
            f"(headroom {setup.headroom}); the config's noise multiplier needs "
            f"{plan.client_variance:.6g} ({plan.headroom})"
        )


def _masked_size(record: ArrayRecord) -> int:
    """Number of values the masked vector holds for ``record``: its float arrays' sizes.

    The same count as the server's ``ArraySpec.dim``; integer and boolean
    arrays (buffers such as BatchNorm's ``num_batches_tracked``) take no room.
    """
    return sum(math.prod(a.shape) for a in record.values() if _is_float(a))


def _is_float(array: Array) -> bool:
    """Whether ``array`` holds floating point values (decided by its declared dtype)."""
    try:
        return np.dtype(array.dtype).kind == "f"
    except TypeError:  # a dtype numpy does not know is no float array of the update
        return False


def _flat_update(sent: ArrayRecord, back: ArrayRecord) -> torch.Tensor:
    """Returned minus received float arrays, as float32, flattened in the order sent.

    Only floating point arrays form the update, in the record's order: exactly
    the layout of the server's ``ArraySpec``. Integer and boolean arrays
    (buffers) never enter the masked vector; under secure aggregation the
    server keeps its own values of them, so the node's never leave it.
    """
    import torch

    if list(sent.keys()) != list(back.keys()):
        raise ProtocolError("trained model's arrays differ from the ones received")
    parts: list[np.ndarray] = []
    for name, before in sent.items():
        after = back[name]
        if tuple(after.shape) != tuple(before.shape) or _is_float(after) != _is_float(before):
            raise ProtocolError(f"trained model's array '{name}' differs from the one received")
        if _is_float(before):
            new = after.numpy().astype(np.float32, copy=False).reshape(-1)
            old = before.numpy().astype(np.float32, copy=False).reshape(-1)
            parts.append(new - old)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return torch.from_numpy(flat)


def _weight(num_examples: Any, cap: int) -> float:
    """``min(n, cap) / cap``, or 1 when ``cap`` is 0 (equal weights)."""
    if cap == 0:
        return 1.0
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float):
        raise ProtocolError(f"'num-examples' must be a number, got {num_examples!r}")
    if not (math.isfinite(num_examples) and num_examples > 0):
        raise ProtocolError(f"'num-examples' must be > 0, got {num_examples}")
    return min(float(num_examples), cap) / cap


# -- state and identity -------------------------------------------------------------


_SLOT_PREFIX = f"{SECAGG_KEY}.r"


def _slot(server_round: int) -> str:
    """``context.state`` key of one round's client state."""
    return f"{_SLOT_PREFIX}{server_round}"


def _load_client(context: Context, msg: Message, request: Any) -> SecAggClient:
    """The client state of ``request``'s round (a fresh one for advertise-keys)."""
    state = context.state.config_records.get(_slot(request.round))
    fresh = isinstance(request, AdvertiseKeysRequest)
    signed = request.signed if fresh else bool(state and state.get("setup.signed", False))
    identity, key, trusted = load_identity(context, msg) if signed else ("", None, {})
    return SecAggClient.from_state(
        {} if fresh or state is None else dict(state),
        identity=identity,
        signing_key=key,
        trusted_keys=trusted,
        require_signed=_provisioned(context),
        min_sum=int(context.node_config.get(SECAGG_MIN_SUM_KEY, 2)),
        max_nodes=_node_limit(context, "secagg-max-nodes", DEFAULT_MAX_NODES, 2, MAX_CLIENTS),
        max_degree=_node_limit(context, "secagg-max-degree", DEFAULT_MAX_DEGREE, 1, MAX_DEGREE),
    )


def _node_limit(context: Context, key: str, default: int, floor: int, ceiling: int) -> int:
    """The integer node config ``key`` in ``[floor, ceiling]``, or ``default`` when unset.

    A malformed limit refuses every round (one line naming the key) rather
    than silently falling back to the default.
    """
    value = context.node_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not floor <= value <= ceiling:
        raise ProtocolError(
            f"node config {key} must be an integer in [{floor}, {ceiling}], got {value!r}"
        )
    return value


def _provisioned(context: Context) -> bool:
    """A node given its own secagg identity or keys takes part in signed rounds only.

    Otherwise a malicious server could simply ask for an unsigned round and
    relay its own keys as the neighbours' (a downgrade).
    """
    node = context.node_config
    return bool(node.get(SECAGG_KEY_DIR_KEY) or node.get(SECAGG_IDENTITY_KEY))


def _save_client(context: Context, client: SecAggClient) -> None:
    """Keep this round's state; drop it once done, and keep at most two rounds.

    At most two rounds are ever in flight (the current one and the one set up
    ahead of it), so older slots belong to rounds the server abandoned.
    """
    current = client.client_round
    if client.stage is ClientStage.DONE:
        context.state.pop(_slot(current), None)
    else:
        context.state[_slot(current)] = ConfigRecord(client.to_state())
    held = sorted(
        int(name[len(_SLOT_PREFIX) :])
        for name in context.state.config_records
        if name.startswith(_SLOT_PREFIX)
    )
    for stale in held[:-2]:
        del context.state[_slot(stale)]


def load_identity(
    context: Context, msg: Message
) -> tuple[str, Ed25519PrivateKey, dict[str, bytes]]:
    """This node's identity, its Ed25519 signing key and the trusted public keys.

    Raises
    ------
    ProtocolError
        No key directory, or this identity's ``.pem`` is missing or not Ed25519.
    """
    node = context.node_config
    identity = str(node.get(SECAGG_IDENTITY_KEY, "")) or f"client-{node.get(PARTITION_ID_KEY, '')}"
    key_dir = str(node.get(SECAGG_KEY_DIR_KEY, "")) or _key_dir_from_server(msg)
    if not key_dir:
        raise ProtocolError(
            "signed secagg needs the node config 'secagg-key-dir' (this node's own keys)"
        )
    folder = Path(key_dir).expanduser()
    pem = folder / f"{identity}.pem"
    try:
        key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ProtocolError(f"cannot read signing key {pem}: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProtocolError(f"{pem} is not an Ed25519 private key")
    trusted = {path.stem: path.read_bytes() for path in sorted(folder.glob("*.pub"))}
    return identity, key, trusted


def _key_dir_from_server(msg: Message) -> str:
    """The ``secagg.key_dir`` the server names: a fallback in simulations only.

    In a simulation server and clients share a machine and one key folder. A
    deployed node must hold its own key (node config ``secagg-key-dir``): a
    folder the server names could hold every client's private key, and a node
    that borrowed from it could sign as any other (as ``signing_mod`` refuses).
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or WIRE_CONFIG_KEY not in config:
        return ""
    # Imported here: both import torch, which a deployed node's key stages never need.
    from fedsec.attacks.threat import simulated_adversary
    from fedsec.client.app import config_from_message

    if not simulated_adversary():
        return ""
    return config_from_message(msg).secagg.key_dir
