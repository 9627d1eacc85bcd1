"""Key agreement and authenticated share encryption for SecAgg / SecAgg+.

Each client holds X25519 key pairs (one for mask seeds, one for share
encryption, as in Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Section 4). Pairwise secrets are
the X25519 shared secret run through HKDF-SHA256 and bound to the session, the
round and the purpose, so a key is never reused across rounds or roles (the
per-round key refresh of Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020). Shares travel under AES-256-GCM with the
sender, receiver, session and round in the associated data.
"""

from __future__ import annotations

import os
import struct
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["decrypt_share", "derive_key", "encrypt_share", "generate_keypair"]

_KDF_PREFIX = b"fedsec-secagg/v1/"
_AD_PREFIX = b"fedsec-secagg/v1/share"
_NONCE_LEN = 12
_U64_MAX = 2**64 - 1


def _u64(value: int, name: str) -> bytes:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return struct.pack(">Q", value)


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """Generate a fresh X25519 key pair from the OS CSPRNG.

    Returns
    -------
    tuple[X25519PrivateKey, bytes]
        The private key and the raw 32-byte public key to advertise.
    """
    private_key = X25519PrivateKey.generate()
    public = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private_key, public


def derive_key(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    *,
    session: bytes,
    round: int,
    purpose: Literal["mask", "shares"],
) -> bytes:
    """Derive a 32-byte pairwise key bound to session, round and purpose.

    X25519 exchange followed by HKDF-SHA256 (no salt, length 32) with
    ``info = b"fedsec-secagg/v1/" + purpose + session + round`` (round as 8
    bytes big-endian). The result is symmetric: ``u`` deriving with ``v``'s
    public key equals ``v`` deriving with ``u``'s.

    Parameters
    ----------
    private_key : X25519PrivateKey
        This client's private key.
    peer_public : bytes
        The peer's raw 32-byte X25519 public key.
    session : bytes
        Session (federation run) identifier.
    round : int
        Round number, ``0 <= round < 2**64``.
    purpose : {"mask", "shares"}
        ``"mask"`` for the pairwise mask seed ``s_uv`` (Bonawitz et al. 2017),
        ``"shares"`` for the share-encryption key ``c_uv``.

    Returns
    -------
    bytes
        The 32-byte derived key.

    Raises
    ------
    ValueError
        Malformed public key, unknown purpose, or an all-zero shared secret
        (small-order peer point).
    """
    if purpose not in ("mask", "shares"):
        raise ValueError(f"purpose must be 'mask' or 'shares', got {purpose!r}")
    if len(peer_public) != 32:
        raise ValueError(f"peer public key must be 32 bytes, got {len(peer_public)}")
    round_bytes = _u64(round, "round")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # OpenSSL refuses small-order points itself
        raise ValueError(f"key agreement rejected: {exc}") from None
    if shared == bytes(len(shared)):
        raise ValueError("key agreement rejected: all-zero shared secret (small-order point)")
    info = _KDF_PREFIX + purpose.encode() + session + round_bytes
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _associated_data(sender: int, receiver: int, session: bytes, round: int) -> bytes:
    # Fixed-width fields first, the variable-length session last: unambiguous.
    return (
        _AD_PREFIX
        + _u64(sender, "sender")
        + _u64(receiver, "receiver")
        + _u64(round, "round")
        + session
    )


def encrypt_share(
    key: bytes, plaintext: bytes, *, sender: int, receiver: int, session: bytes, round: int
) -> bytes:
    """Encrypt a share for ``receiver`` with AES-256-GCM.

    Parameters
    ----------
    key : bytes
        32-byte key from :func:`derive_key` with ``purpose="shares"``.
    plaintext : bytes
        The serialized shares.
    sender, receiver : int
        Client ids, bound into the associated data.
    session : bytes
        Session identifier, bound into the associated data.
    round : int
        Round number, bound into the associated data.

    Returns
    -------
    bytes
        ``nonce (12 random bytes) || ciphertext || tag``.
    """
    nonce = os.urandom(_NONCE_LEN)
    ad = _associated_data(sender, receiver, session, round)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(
    key: bytes, ciphertext: bytes, *, sender: int, receiver: int, session: bytes, round: int
) -> bytes:
    """Decrypt and authenticate a share produced by :func:`encrypt_share`.

    Parameters
    ----------
    key : bytes
        The same 32-byte key the sender used.
    ciphertext : bytes
        ``nonce || ciphertext || tag``.
    sender, receiver : int
        Expected client ids.
    session : bytes
        Expected session identifier.
    round : int
        Expected round number.

    Returns
    -------
    bytes
        The plaintext.

    Raises
    ------
    ValueError
        The ciphertext was tampered with, truncated, replayed from another
        round or session, or addressed between other clients.
    """
    if len(ciphertext) < _NONCE_LEN + 16:
        raise ValueError("share ciphertext rejected: too short")
    ad = _associated_data(sender, receiver, session, round)
    nonce, body = ciphertext[:_NONCE_LEN], ciphertext[_NONCE_LEN:]
    try:
        return AESGCM(key).decrypt(nonce, body, ad)
    except InvalidTag:
        raise ValueError(
            "share ciphertext rejected: authentication failed (tampered, replayed or misaddressed)"
        ) from None
