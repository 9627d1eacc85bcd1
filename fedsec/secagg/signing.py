"""Ed25519 signatures for SecAgg against a malicious server.

Against an active server, Bonawitz et al. ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Section 4, malicious setting)
have every client sign its advertised keys with a long-term key that the other
clients trust from a PKI, so the server cannot substitute its own keys, and
add a consistency-check round in which every survivor signs the survivor set,
so the server cannot show different honest clients different sets and collect
both the self-mask share and the mask-key share of one client.

Signed payloads are domain-separated and fixed-width before the
variable-length fields, so no two different messages sign the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsec.secagg.messages import ProtocolError

__all__ = [
    "frame",
    "generate_signing_key",
    "public_bytes",
    "sign_keys",
    "sign_survivors",
    "verify_keys",
    "verify_survivors",
    "write_key_dir",
]

_KEYS_DOMAIN = b"fedsec-secagg/v1/advertise"
_SURVIVORS_DOMAIN = b"fedsec-secagg/v1/survivors"


def generate_signing_key() -> tuple[Ed25519PrivateKey, bytes]:
    """A fresh long-term Ed25519 key and its raw 32-byte public key."""
    key = Ed25519PrivateKey.generate()
    return key, public_bytes(key)


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def frame(*parts: bytes) -> bytes:
    """Each part prefixed with its 4-byte length, so no two part lists give the same bytes."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _keys_payload(
    session: bytes,
    server_round: int,
    client_id: int,
    identity: str,
    c_public: bytes,
    s_public: bytes,
    parameters: bytes,
) -> bytes:
    head = _KEYS_DOMAIN + struct.pack(">QQ", server_round, client_id)
    return head + frame(session, identity.encode(), c_public, s_public, parameters)


def _survivors_payload(session: bytes, server_round: int, survivors: Iterable[int]) -> bytes:
    ids = sorted(survivors)
    body = struct.pack(f">{len(ids)}Q", *ids)
    return _SURVIVORS_DOMAIN + struct.pack(">Q", server_round) + frame(session, body)


def sign_keys(
    key: Ed25519PrivateKey,
    *,
    session: bytes,
    server_round: int,
    client_id: int,
    identity: str,
    c_public: bytes,
    s_public: bytes,
    parameters: bytes = b"",
) -> bytes:
    """Sign a client's advertised round keys, bound to session, round, id and identity.

    ``parameters`` is a digest of the round's parameters as this client received
    them, so peers given a different view (another threshold, graph or
    identity list) reject the signature.
    """
    payload = _keys_payload(
        session, server_round, client_id, identity, c_public, s_public, parameters
    )
    return key.sign(payload)


def verify_keys(
    public: bytes,
    signature: bytes,
    *,
    session: bytes,
    server_round: int,
    client_id: int,
    identity: str,
    c_public: bytes,
    s_public: bytes,
    parameters: bytes = b"",
) -> None:
    """Raise :class:`ProtocolError` unless ``signature`` is ``identity``'s on these keys."""
    payload = _keys_payload(
        session, server_round, client_id, identity, c_public, s_public, parameters
    )
    _verify(public, signature, payload, f"keys of client {client_id} ({identity})")


def sign_survivors(
    key: Ed25519PrivateKey, *, session: bytes, server_round: int, survivors: Iterable[int]
) -> bytes:
    """Sign the survivor set of the consistency check."""
    return key.sign(_survivors_payload(session, server_round, survivors))


def verify_survivors(
    public: bytes,
    signature: bytes,
    *,
    session: bytes,
    server_round: int,
    survivors: Iterable[int],
    signer: str,
) -> None:
    """Raise :class:`ProtocolError` unless ``signature`` is ``signer``'s on this set."""
    _verify(public, signature, _survivors_payload(session, server_round, survivors), signer)


def _verify(public: bytes, signature: bytes, payload: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        raise ProtocolError(f"bad signature on the {what}") from None


def write_key_dir(folder: str | Path, identities: Iterable[str]) -> None:
    """Create ``<identity>.pem`` (private, PKCS#8) and ``<identity>.pub`` (raw) per identity.

    For tests and simulations; in a deployment each node keeps only its own
    ``.pem`` and receives the others' ``.pub`` files out of band.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for identity in identities:
        key, public = generate_signing_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (path / f"{identity}.pem").write_bytes(pem)
        (path / f"{identity}.pem").chmod(0o600)
        (path / f"{identity}.pub").write_bytes(public)
