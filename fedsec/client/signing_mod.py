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

The mod reads only the ``signatures`` section of the config the server sent,
not the whole config: validating that imports torch and the training stack,
and a SuperNode runs every message (SecAgg's key and unmask stages included)
in a fresh process. The handler still validates the whole config where it
needs it (training, evaluation).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig, SignaturesSection
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
    return _resolve(context, None if cfg is None else cfg.signatures)


def _resolve(
    context: Context, signatures: SignaturesSection | None
) -> tuple[str, Ed25519PrivateKey] | None:
    """:func:`resolve_signer` given only the server config's ``signatures`` section."""
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
    elif signatures is not None and signatures.key_dir and _simulated():
        identity, folder = default, Path(signatures.key_dir).expanduser()
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


def _simulated() -> bool:
    # Imported here: fedsec.attacks.threat imports torch, which a deployed node's
    # SecAgg key and unmask stages never need.
    from fedsec.attacks.threat import simulated_adversary

    return simulated_adversary()


def _server_signatures(msg: Message) -> SignaturesSection | None:
    """The ``signatures`` section of the config ``msg`` carries, or None (no usable one).

    None when the message has no config, or the section is not a table of a
    boolean ``required`` and a string ``key_dir``: the handler, which validates
    the whole config, then answers with the reason.
    """
    record = msg.content.config_records.get("config")
    if record is None or WIRE_CONFIG_KEY not in record:
        return None
    return _signatures_of(str(record[WIRE_CONFIG_KEY]))


@functools.lru_cache(maxsize=8)
def _signatures_of(text: str) -> SignaturesSection | None:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    section = raw.get("signatures", {}) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        return None
    required, key_dir = section.get("required", False), section.get("key_dir", "")
    if not isinstance(required, bool) or not isinstance(key_dir, str):
        return None
    return SignaturesSection(required=required, key_dir=key_dir)


def _refuse(msg: Message, reason: str) -> Message:
    logger.warning("signing: refused to reply: %s", reason)
    return Message(Error(code=SIGNING_REFUSED, reason=reason), reply_to=msg)


def signing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer ``msg`` through ``call_next`` and sign the reply (see the module docstring).

    Never raises for a missing or bad key: the node answers with an error
    (code :data:`SIGNING_REFUSED`), which the server counts as a failure.
    """
    signatures = _server_signatures(msg)
    try:
        signer = _resolve(context, signatures)
    except SignatureError as err:
        return _refuse(msg, f"signing key: {err}")
    if signer is None:
        if signatures is not None and signatures.required:
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
