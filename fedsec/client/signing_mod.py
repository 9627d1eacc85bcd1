"""fedsec's signing mod: the public signing mod configured with fedsec's key source.

:data:`signing_mod` is :func:`fedsec.client.reply_signing.signing` (the
:class:`~fedsec.client.reply_signing.Signing` mod a Flower user adopts as
:func:`fedsec.client.mods.signing`) given :func:`node_key`, fedsec's key
source, and :func:`node_identity`. fedsec's ClientApp lists it outermost on
``train`` and ``evaluate``, so SecAgg stage replies are signed too. Each reply
gets the ConfigRecord ``fedsec-signature`` (``identity``: str, ``signature``:
bytes) holding an Ed25519 signature over the run id, the id of the
instruction it answers, the message type, the group id, the node's identity
and :func:`content_digest` of every other record of the reply. Error replies
carry no content and stay unsigned.

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
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message

from fedsec.client.reply_signing import Signing, content_digest, sign_message, signing
from fedsec.config import ExperimentConfig, SignaturesSection
from fedsec.deploy.signatures import SignatureError
from fedsec.wire import (
    CONFIG_KEY,
    PARTITION_ID_KEY,
    SECAGG_IDENTITY_KEY,
    SECAGG_KEY_DIR_KEY,
    SIGNATURE_KEY,
    SIGNING_IDENTITY_KEY,
    SIGNING_KEY_PATH_KEY,
    SIGNING_REFUSED,
    WIRE_CONFIG_KEY,
)

__all__ = [
    "SIGNATURE_KEY",
    "SIGNING_REFUSED",
    "content_digest",
    "node_identity",
    "node_key",
    "resolve_signer",
    "sign_message",
    "signing_mod",
]

# SIGNATURE_KEY (the reply's signature record) and SIGNING_REFUSED are defined in
# fedsec.wire, content_digest and sign_message in fedsec.client.reply_signing (all
# re-exported here).


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
    path = _key_path(context, None if cfg is None else cfg.signatures)
    if path is None:
        return None
    return Signing(path, node_identity).signer(context)


def node_identity(context: Context) -> str | None:
    """The identity this node signs as (None: the key file's stem; see the module docstring)."""
    node = context.node_config
    if node.get(SIGNING_KEY_PATH_KEY, ""):
        return str(node.get(SIGNING_IDENTITY_KEY, "")) or None
    partition = node.get(PARTITION_ID_KEY)
    default = "" if partition is None else f"client-{partition}"
    if node.get(SECAGG_KEY_DIR_KEY):
        return str(node.get(SECAGG_IDENTITY_KEY, "")) or default
    return default


def node_key(msg: Message, context: Context) -> Path | None:
    """fedsec's key source: this node's PEM for answering ``msg``, or None (reply unsigned).

    Raises
    ------
    SignatureError
        If the node has no key while the server's config sent with ``msg``
        says ``signatures.required``: the node refuses before training.
    """
    signatures = _server_signatures(msg)
    path = _key_path(context, signatures)
    if path is None and signatures is not None and signatures.required:
        raise SignatureError(
            "none, and the server's signatures.required is set (set the node config "
            "'signing-key' to this node's Ed25519 PEM)"
        )
    return path


def _key_path(context: Context, signatures: SignaturesSection | None) -> Path | None:
    """The PEM of this node's key, first match wins (see the module docstring); None: no key.

    A named key (``signing-key``) is returned whether or not it exists: the
    mod then refuses with the reason, where a folder without this node's file
    means the node has no key.
    """
    node = context.node_config
    named = str(node.get(SIGNING_KEY_PATH_KEY, ""))
    if named:
        return Path(named).expanduser()
    identity = node_identity(context)
    if node.get(SECAGG_KEY_DIR_KEY):
        folder = Path(str(node[SECAGG_KEY_DIR_KEY])).expanduser()
    elif signatures is not None and signatures.key_dir and _simulated():
        folder = Path(signatures.key_dir).expanduser()
    else:
        return None
    path = folder / f"{identity}.pem"
    if not identity or not path.exists():
        return None
    return path


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
    record = msg.content.config_records.get(CONFIG_KEY)
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


#: fedsec's signing mod: the public one, with fedsec's key source (see the module docstring).
#: Never raises for a missing or bad key: the node answers with an error (code
#: :data:`SIGNING_REFUSED`), which the server counts as a failure.
signing_mod: Signing = signing(key=node_key, identity=node_identity, allow_unsigned=True)
