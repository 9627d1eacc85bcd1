"""Signed client replies: a Flower mod that signs every reply a node sends.

The mod wraps the ``train`` and ``evaluate`` handlers (outermost, so SecAgg
stage replies are signed too). It lets the handler answer, then adds the
ConfigRecord ``fedsec-signature`` (``identity``: str, ``signature``: bytes)
holding an Ed25519 signature (:func:`fedsec.deploy.signatures.sign_reply`)
over the run id, the id of the instruction it answers, the message type, the
group id, the node's identity and :func:`content_digest` of every other
record of the reply. Error replies carry no content and stay unsigned.

The node's key, first match wins:

1. node config ``signing-key``: path of the node's Ed25519 PEM; its identity
   is the node config ``signing-identity``, or else the file's stem
   (``client-0.pem`` signs as ``client-0``);
2. node config ``secagg-key-dir``: ``<dir>/<identity>.pem`` with the identity
   ``secagg-identity``, or else ``client-<partition-id>``;
3. only in a simulation (server and clients share a machine; the process
   runs under :func:`fedsec.attacks.threat.simulated_adversary`), the
   server-sent config's ``signatures.key_dir``:
   ``<key_dir>/client-<partition-id>.pem``. A deployed node never borrows a
   key from a folder the server names: that folder holds every node's keys,
   so any node could sign as any other.

A key that is named (1) but unusable, or found (2, 3) but unreadable, makes
the node answer with an error rather than reply unsigned. A node without a
key replies unsigned unless the server's config says ``signatures.required``:
then it answers with an error naming the node config to set, before
training. A node with a key signs whether or not signatures are required.
Keys are loaded once per process.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsec.attacks.threat import simulated_adversary
from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig
from fedsec.deploy.signatures import ContentHasher, SignatureError, load_signing_key, sign_reply

__all__ = [
    "SIGNATURE_KEY",
    "SIGNING_REFUSED",
    "content_digest",
    "resolve_signer",
    "sign_message",
    "signing_mod",
]

logger = logging.getLogger("fedsec")

#: RecordDict key of the reply signature (a ConfigRecord: ``identity``, ``signature``).
SIGNATURE_KEY = "fedsec-signature"
#: Error code of a reply the node refuses to send unsigned (no key, unusable key).
SIGNING_REFUSED = 4602

_KEYS: dict[Path, Ed25519PrivateKey] = {}


def content_digest(content: RecordDict) -> bytes:
    """SHA-256 over every record of ``content`` but the signature record.

    Records in sorted name order, each tagged with its kind and name; an
    ArrayRecord's arrays in sorted key order with key, dtype, shape, stype
    and data bytes; MetricRecord and ConfigRecord entries in sorted key order
    with their typed values (:class:`~fedsec.deploy.signatures.ContentHasher`).

    Raises
    ------
    TypeError
        If a record or value is of a type Flower's records do not hold.
    """
    hasher = ContentHasher()
    names = sorted(name for name in content if name != SIGNATURE_KEY)
    hasher.update(len(names))
    for name in names:
        record = content[name]
        if isinstance(record, ArrayRecord):
            keys = sorted(record)
            hasher.update_all(("array", name, len(keys)))
            for key in keys:
                array = record[key]
                hasher.update_all((key, array.dtype, list(array.shape), array.stype, array.data))
        elif isinstance(record, MetricRecord | ConfigRecord):
            kind = "metric" if isinstance(record, MetricRecord) else "config"
            keys = sorted(record)
            hasher.update_all((kind, name, len(keys)))
            for key in keys:
                hasher.update(key).update(record[key])
        else:
            raise TypeError(f"record {name!r} is a {type(record).__name__}, not a Flower record")
    return hasher.digest()


def sign_message(reply: Message, request: Message, identity: str, key: Ed25519PrivateKey) -> None:
    """Add the ``fedsec-signature`` record to ``reply``, the answer to ``request`` (in place).

    The metadata bound are the instruction's as this node received it: run
    id, message id, message type and group id. Flower copies them into a
    reply made with ``Message(content, reply_to=request)`` (the message id
    as ``reply_to_message_id``), which is where the server reads them.
    """
    meta = request.metadata
    signature = sign_reply(
        key,
        run_id=meta.run_id,
        message_id=meta.message_id,
        message_type=meta.message_type,
        group_id=meta.group_id,
        identity=identity,
        content_digest=content_digest(reply.content),
    )
    reply.content[SIGNATURE_KEY] = ConfigRecord({"identity": identity, "signature": signature})


def resolve_signer(
    context: Context, cfg: ExperimentConfig | None
) -> tuple[str, Ed25519PrivateKey] | None:
    """This node's signing identity and key, or None when it has none.

    ``cfg`` is the experiment config the server sent (None if the message
    carried none); only its ``signatures.key_dir`` is used, as the last resort.

    Raises
    ------
    SignatureError
        If ``signing-key`` names an unusable key, or a found key is unreadable.
    """
    node = context.node_config
    named = str(node.get("signing-key", ""))
    if named:
        path = Path(named).expanduser()
        identity = str(node.get("signing-identity", "")) or path.stem
        return identity, _load(path)
    partition = node.get("partition-id")
    default = "" if partition is None else f"client-{partition}"
    if node.get("secagg-key-dir"):
        identity = str(node.get("secagg-identity", "")) or default
        folder = Path(str(node["secagg-key-dir"])).expanduser()
    elif cfg is not None and cfg.signatures.key_dir and simulated_adversary():
        identity, folder = default, Path(cfg.signatures.key_dir).expanduser()
    else:
        return None
    path = folder / f"{identity}.pem"
    if not identity or not path.exists():
        return None
    return identity, _load(path)


def _load(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, read once per process."""
    path = path.absolute()
    key = _KEYS.get(path)
    if key is None:
        key = _KEYS[path] = load_signing_key(path)
    return key


def _server_config(msg: Message) -> ExperimentConfig | None:
    """The experiment config the message carries, or None (the handler reports why)."""
    record = msg.content.config_records.get("config")
    if record is None or WIRE_CONFIG_KEY not in record:
        return None
    from fedsec.client.app import config_from_message  # the app imports this module

    try:
        return config_from_message(msg)
    except ValueError:
        return None


def _refuse(msg: Message, reason: str) -> Message:
    logger.warning("signing: refused to reply: %s", reason)
    return Message(Error(code=SIGNING_REFUSED, reason=reason), reply_to=msg)


def signing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer ``msg`` through ``call_next`` and sign the reply (see the module docstring).

    Never raises for a missing or bad key: the node answers with an error
    (code :data:`SIGNING_REFUSED`), which the server counts as a failure.
    """
    cfg = _server_config(msg)
    try:
        signer = resolve_signer(context, cfg)
    except SignatureError as err:
        return _refuse(msg, f"signing key: {err}")
    if signer is None:
        if cfg is not None and cfg.signatures.required:
            return _refuse(
                msg,
                "signatures.required is set but this node has no signing key "
                "(set the node config 'signing-key' to its Ed25519 PEM)",
            )
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    sign_message(reply, msg, *signer)
    return reply
