"""Per-client model poisoning for simulations, as a Flower mod on any ClientApp.

:func:`attack_mod` wraps a ClientApp's ``train`` handler, as Flower's own
``LocalDpMod`` does. On a malicious node it lets the handler train honestly,
takes the update (returned minus received floating-point arrays of the
``arrayrecord_key`` ArrayRecord), transforms it with one of fedsec's
non-colluding model-poisoning attacks
(:class:`~fedsec.attacks.model_poisoning.PerClientAttack`: ``sign-flip``,
``gaussian``, ``scaling``) and replies with received + malicious update. The
attack math is the attack's own ``perturb``; the mod only moves arrays.

Policies
--------
- Honest nodes' replies are returned as the handler made them (the same
  object), and so are error replies, non-train messages and replies without
  the ArrayRecord.
- Non-float arrays (integer and boolean buffers such as BatchNorm's
  ``num_batches_tracked``) are not part of an update (the float-only policy of
  :mod:`fedsec.strategies.arrays`): they pass through as the handler set them.
- Simulation only: the mod attacks only while
  :func:`~fedsec.attacks.threat.simulated_adversary` is true, checked on every
  message, not at creation. The flag is often set after the app is built
  (``InProcessGrid`` sets it in its constructor, Ray workers get it through
  their ``runtime_env``), and the module defining the ClientApp is also
  imported by processes that run no clients, so refusing at creation would
  break correct simulations while a creation-time check would prove nothing
  about where messages are later handled. Outside a simulation every message
  is answered unchanged and one warning is logged per mod.
- Data-poisoning attacks (``label-flip``, ``backdoor``) must change the
  training data, which a reply mod never sees; colluding attacks need every
  malicious update of the round. Both are refused at creation in one line.

Example
-------
::

    app = ClientApp(mods=[attack_mod("sign-flip", malicious={0, 1}, params={"scale": 4.0})])
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsec.attacks.base import ModelPoisoningAttack
from fedsec.attacks.data_poisoning import DATA_ATTACKS, DataPoisoningAttack
from fedsec.attacks.model_poisoning import MODEL_ATTACKS, PerClientAttack, Scaling
from fedsec.attacks.threat import SIMULATED_ADVERSARY_ENV, build_attack, simulated_adversary
from fedsec.wire import ARRAYS_KEY, PARTITION_ID_KEY, SERVER_ROUND_KEY

__all__ = ["attack_mod"]

logger = logging.getLogger("fedsec")

Malicious = Collection[int] | Callable[[Context], bool]


def _data_refusal(label: str) -> ValueError:
    return ValueError(
        f"attack '{label}' poisons the training data, which a reply mod never sees; "
        "apply its poison(x, y, generator) in your own data loading instead"
    )


def _collusion_refusal(label: str) -> ValueError:
    return ValueError(
        f"attack '{label}' colludes (it needs every malicious update of the round), "
        "which one client's mod cannot see; run it with fedsec.simulation.Collusion "
        "(its client_mod and server_filter)"
    )


def _resolve_attack(
    attack: PerClientAttack | str, params: Mapping[str, Any] | None
) -> PerClientAttack:
    """The configured attack object, refused in one line if a mod cannot run it."""
    if isinstance(attack, str):
        if attack in DATA_ATTACKS:
            raise _data_refusal(attack)
        if not issubclass(MODEL_ATTACKS.get(attack), PerClientAttack):  # unknown: lists names
            raise _collusion_refusal(attack)
        built = build_attack(attack, dict(params or {}), omniscient=False)
        assert isinstance(built, PerClientAttack)
        return built
    if params:
        raise ValueError("params= only applies to an attack given by name")
    if isinstance(attack, DataPoisoningAttack):
        raise _data_refusal(attack.name)
    if isinstance(attack, ModelPoisoningAttack) and not isinstance(attack, PerClientAttack):
        raise _collusion_refusal(attack.name)
    if not isinstance(attack, PerClientAttack):
        raise TypeError(
            "attack must be a registered attack name or a PerClientAttack, got "
            f"{type(attack).__name__}"
        )
    return attack


def _membership(malicious: Malicious) -> Callable[[Context], bool]:
    """Turn ``malicious`` into a predicate on the node's context."""
    if callable(malicious):
        return malicious
    if isinstance(malicious, str | bytes) or not isinstance(malicious, Collection):
        raise TypeError(
            "malicious must be a set of partition ids or a callable(Context) -> bool, "
            f"got {type(malicious).__name__}"
        )
    ids = frozenset(malicious)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"malicious partition ids must be integers >= 0, got {bad[0]!r}")

    def is_malicious(context: Context) -> bool:
        pid = context.node_config.get(PARTITION_ID_KEY)
        if pid is None:
            raise ValueError(
                f"malicious= a set of partition ids needs the node config '{PARTITION_ID_KEY}' "
                "(set by Flower's simulation); pass a callable(Context) -> bool instead"
            )
        return int(pid) in ids

    return is_malicious


def _generator(seed: int, server_round: int, context: Context) -> torch.Generator:
    """Attack randomness per (seed, round, node), reproducible across runs and resumes."""
    who = context.node_config.get(PARTITION_ID_KEY, f"node-{context.node_id}")
    digest = hashlib.sha256(f"fedsec-attack-mod:{seed}:{server_round}:{who}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _server_round(msg: Message) -> int:
    """The round of a train request: Flower's ``server-round`` config, else the group id."""
    for record in msg.content.config_records.values():
        value = record.get(SERVER_ROUND_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else 0


def _poison(
    attack: PerClientAttack,
    received: ArrayRecord,
    returned: ArrayRecord,
    generator: torch.Generator,
    num_clients: int | None,
) -> ArrayRecord:
    """``returned`` with its float arrays moved to received + attacked update."""
    floats: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, array in returned.items():
        if np.dtype(array.dtype).kind != "f":
            continue  # integer and boolean buffers are not part of an update
        if name not in received:
            raise ValueError(f"attack mod: reply array '{name}' is not in the request")
        before, after = received[name].numpy(), array.numpy()
        if before.shape != after.shape:
            raise ValueError(
                f"attack mod: reply array '{name}' has shape {after.shape}, the request's "
                f"{before.shape}"
            )
        floats.append((name, before, after))
    if not floats:
        return returned
    dtype = np.result_type(*(after.dtype for _, _, after in floats))
    update = np.concatenate(
        [(after.astype(dtype) - before.astype(dtype)).ravel() for _, before, after in floats]
    )
    attacked = attack.perturb(torch.from_numpy(update), generator, num_clients).numpy()
    poisoned: dict[str, np.ndarray] = {}
    offset = 0
    for name, before, after in floats:
        size = after.size
        delta = attacked[offset : offset + size].reshape(after.shape)
        poisoned[name] = (before.astype(dtype) + delta).astype(after.dtype)
        offset += size
    record = ArrayRecord()
    for name, array in returned.items():  # keep the reply's order and its other arrays
        record[name] = Array(poisoned[name]) if name in poisoned else array
    return record


def attack_mod(
    attack: PerClientAttack | str,
    *,
    malicious: Malicious,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    num_clients: int | None = None,
    arrayrecord_key: str = ARRAYS_KEY,
) -> Mod:
    """A Flower mod that makes the ``malicious`` nodes of a simulation poison their updates.

    Parameters
    ----------
    attack : PerClientAttack or str
        A configured non-colluding model-poisoning attack (e.g.
        ``SignFlip(scale=4)``) or its registered name (``"sign-flip"``,
        ``"gaussian"``, ``"scaling"``) with ``params``.
    malicious : set of int or callable
        Partition ids (node config ``partition-id``) of the malicious nodes, or
        a predicate ``(Context) -> bool``.
    params : mapping, optional
        The attack's parameters, when ``attack`` is a name.
    seed : int
        Seeds the attack's randomness (per round and node).
    num_clients : int, optional
        Updates aggregated per round (n); needed only by ``scaling`` with its
        default ``gamma = n / server_lr``.
    arrayrecord_key : str
        Key of the model's ArrayRecord in requests and replies (as Flower's ``FedAvg``).

    Returns
    -------
    Mod
        Use it in ``ClientApp(mods=[...])``.

    Raises
    ------
    ValueError
        In one line, for a data-poisoning or colluding attack, an unknown name
        or parameter, bad partition ids, or ``scaling`` without ``gamma`` or
        ``num_clients``.
    """
    chosen = _resolve_attack(attack, params)
    if isinstance(chosen, Scaling) and chosen.gamma is None and num_clients is None:
        raise ValueError(
            "attack 'scaling' with gamma=None needs num_clients= (n of a round): "
            "gamma = n / server_lr"
        )
    if num_clients is not None and (isinstance(num_clients, bool) or num_clients < 1):
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(arrayrecord_key, str) or not arrayrecord_key:
        raise ValueError(f"arrayrecord_key must be a non-empty string, got {arrayrecord_key!r}")
    is_malicious = _membership(malicious)
    warned = False

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        nonlocal warned
        reply = call_next(msg, context)
        if msg.metadata.message_type.split(".")[0] != "train" or reply.has_error():
            return reply
        if not simulated_adversary():
            if not warned:  # a deployed node never attacks, whatever its app says
                warned = True
                logger.warning(
                    "attack_mod(%s): not in a simulation (%s unset), replies are left unchanged",
                    chosen.name,
                    SIMULATED_ADVERSARY_ENV,
                )
            return reply
        if not is_malicious(context):
            return reply
        if arrayrecord_key not in msg.content or arrayrecord_key not in reply.content:
            return reply
        received = msg.content.array_records[arrayrecord_key]
        returned = reply.content.array_records[arrayrecord_key]
        generator = _generator(seed, _server_round(msg), context)
        poisoned = _poison(chosen, received, returned, generator, num_clients)
        content = RecordDict(dict(reply.content.items()))
        content[arrayrecord_key] = poisoned
        reply.content = content
        return reply

    return mod
