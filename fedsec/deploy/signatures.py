"""Ed25519 signatures on client replies: payloads, canonical content hashing, keys.

Each client signs what it sends with a long-term Ed25519 key registered with
the server; the server checks the signature before anything else reads the
reply. The signed payload binds the run, the instruction the reply answers
(its message id), the message type, the group (round) id, the signer's
identity and a digest of every record of the reply's content. It is
domain-separated and fixed-width before the length-framed fields, so no two
different replies sign the same bytes, and no payload of
:mod:`fedsec.secagg.signing` (other domains) can be passed off as one.

:class:`ContentHasher` feeds typed values to SHA-256 with a type tag and a
length (or a fixed width) per value, so every sequence of values is uniquely
decodable from what was hashed: ``1``, ``1.0``, ``True``, ``"1"`` and
``b"1"`` hash differently, and so do ``["ab", "c"]`` and ``["a", "bc"]``.

Nothing here knows Flower's types; :mod:`fedsec.client.signing_mod` maps a
reply's records onto the hasher and :mod:`fedsec.strategies.signatures`
checks replies on the server.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedsec.secagg.signing import frame

__all__ = [
    "DOMAIN",
    "PUBLIC_KEY_SIZE",
    "ContentHasher",
    "ReplyFields",
    "SignatureError",
    "Value",
    "check_public_key",
    "hash_values",
    "load_registry",
    "load_signing_key",
    "reply_payload",
    "sign_reply",
    "verify_reply",
]

#: Domain of every reply signature (distinct from SecAgg's ``fedsec-secagg/v1/...``).
DOMAIN = b"fedsec/v1/reply"
#: Size of a raw Ed25519 public key (``<identity>.pub``).
PUBLIC_KEY_SIZE = 32

#: What :class:`ContentHasher` accepts: scalars and (nested) lists or tuples of them.
Value = bool | int | float | str | bytes | Sequence["Value"]

_BOOL, _INT, _FLOAT, _STR, _BYTES, _LIST = b"b", b"i", b"f", b"s", b"y", b"l"


class SignatureError(ValueError):
    """A reply signature that does not verify, or an unusable key; ``str(err)`` is one line."""


class ContentHasher:
    """SHA-256 over a sequence of typed values, each with its type tag and length.

    ``bool`` is tagged apart from ``int`` (Python's ``True == 1``), integers
    of any size are encoded in two's complement with their length, floats as
    IEEE 754 doubles (so ``-0.0`` differs from ``0.0``), strings as UTF-8
    with their length, and lists with their element count.

    Examples
    --------
    >>> ContentHasher().update(1).digest() != ContentHasher().update(True).digest()
    True
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, value: Value) -> ContentHasher:
        """Add one value; returns ``self`` so calls chain.

        Raises
        ------
        TypeError
            If ``value`` (or an element of it) is none of the accepted types.
        """
        sha = self._sha
        if isinstance(value, bool):  # before int: bool is an int subclass
            sha.update(_BOOL + (b"\x01" if value else b"\x00"))
        elif isinstance(value, int):
            raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
            sha.update(_INT + struct.pack(">I", len(raw)) + raw)
        elif isinstance(value, float):
            sha.update(_FLOAT + struct.pack(">d", value))
        elif isinstance(value, str):
            raw = value.encode("utf-8")
            sha.update(_STR + struct.pack(">Q", len(raw)) + raw)
        elif isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            sha.update(_BYTES + struct.pack(">Q", len(raw)) + raw)
        elif isinstance(value, list | tuple):
            sha.update(_LIST + struct.pack(">Q", len(value)))
            for item in value:
                self.update(item)
        else:
            raise TypeError(f"cannot hash a value of type {type(value).__name__}")
        return self

    def update_all(self, values: Iterable[Value]) -> ContentHasher:
        """Add several values in order (not as a list: no count is hashed)."""
        for value in values:
            self.update(value)
        return self

    def digest(self) -> bytes:
        """The 32-byte SHA-256 digest of everything added so far."""
        return self._sha.digest()


def hash_values(*values: Value) -> bytes:
    """The :class:`ContentHasher` digest of ``values`` in order."""
    return ContentHasher().update_all(values).digest()


def reply_payload(
    *,
    run_id: int,
    message_id: str,
    message_type: str,
    group_id: str,
    identity: str,
    content_digest: bytes,
) -> bytes:
    """The bytes a reply signature covers.

    Parameters
    ----------
    run_id : int
        Flower's run id (unsigned 64-bit).
    message_id : str
        Id of the instruction the reply answers (the reply's
        ``reply_to_message_id``); Flower derives it from a hash of the
        instruction, its metadata included.
    message_type : str
        ``train``, ``evaluate``, ...
    group_id : str
        The message group (the round, where the sender sets it).
    identity : str
        The signer's registered identity.
    content_digest : bytes
        Digest of the reply's content (``fedsec.client.signing_mod.content_digest``).

    Raises
    ------
    SignatureError
        If ``run_id`` does not fit in 64 unsigned bits.
    """
    if not 0 <= run_id < 2**64:
        raise SignatureError(f"run id {run_id} is not an unsigned 64-bit integer")
    head = DOMAIN + struct.pack(">Q", run_id)
    return head + frame(
        message_id.encode(),
        message_type.encode(),
        group_id.encode(),
        identity.encode(),
        content_digest,
    )


class ReplyFields(TypedDict):
    """What a reply signature binds besides the content: :func:`reply_payload`'s arguments."""

    run_id: int
    message_id: str
    message_type: str
    group_id: str
    identity: str
    content_digest: bytes


def sign_reply(key: Ed25519PrivateKey, **fields: Unpack[ReplyFields]) -> bytes:
    """Sign a reply's :func:`reply_payload` with ``key``; the 64-byte signature."""
    return key.sign(reply_payload(**fields))


def verify_reply(public: bytes, signature: bytes, **fields: Unpack[ReplyFields]) -> None:
    """Return if ``signature`` is ``public``'s on this reply; raise otherwise.

    Raises
    ------
    SignatureError
        If the signature does not verify (or the key is malformed).
    """
    payload = reply_payload(**fields)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, payload)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"signature of {fields['identity']!r} does not verify") from None


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an unencrypted PEM (PKCS#8) Ed25519 private key.

    Raises
    ------
    SignatureError
        If the file is missing or unreadable, or holds no unencrypted Ed25519 key.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"signing key {path} not found") from None
    except OSError as err:
        raise SignatureError(f"cannot read signing key {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


# Edwards25519 (RFC 8032, Section 5.1): field prime, curve constant, group order.
_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_L = 2**252 + 27742317777372353535851937790883648493
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int]


def _decode_point(public: bytes) -> _Point | None:
    """RFC 8032 point decoding (Section 5.1.3); None for a non-canonical or off-curve encoding."""
    n = int.from_bytes(public, "little")
    sign, y = n >> 255, n & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x2 = u * pow(v, -1, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P or (x == 0 and sign):
        return None
    return (_P - x if x & 1 != sign else x), y


def _add(a: _Point, b: _Point) -> _Point:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x = (x1 * y2 + x2 * y1) * pow(1 + t, -1, _P) % _P
    return x, (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P


def _times(k: int, point: _Point) -> _Point:
    result = (0, 1)
    while k:
        if k & 1:
            result = _add(result, point)
        point, k = _add(point, point), k >> 1
    return result


def check_public_key(public: bytes) -> None:
    """Raise :class:`SignatureError` unless ``public`` encodes a point of prime order.

    ``Ed25519PublicKey.from_public_bytes`` accepts any 32 bytes, but a key of
    small order (the identity, points of order 2, 4 or 8) lets anyone forge
    signatures without a private key (the identity accepts ``R = identity,
    s = 0`` on every message), and an off-curve or non-canonical encoding is no
    key at all. So a registered key must decode (RFC 8032, Section 5.1.3) to a
    point ``A`` with ``L * A`` the identity and ``A`` not the identity, i.e. of
    the prime order ``L`` of the base point: no small-order component either.
    About 10 ms per key in Python, once when the registry is loaded.
    """
    if len(public) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"{len(public)} bytes, not {PUBLIC_KEY_SIZE}")
    point = _decode_point(public)
    if point is None:
        raise SignatureError("not a canonical encoding of a curve point")
    if point == (0, 1) or _times(_L, point) != (0, 1):
        raise SignatureError("a point of small or mixed order, for which signatures can be forged")


def load_registry(key_dir: str | Path) -> dict[str, bytes]:
    """The registered identities: ``<identity>.pub`` files (raw 32-byte Ed25519 keys).

    Other files in the folder (``<identity>.pem`` in a simulation) are ignored.

    Raises
    ------
    SignatureError
        If the folder is missing, holds no ``.pub`` file, one is not a valid
        raw Ed25519 public key of prime order (:func:`check_public_key`), or
        two identities share a key (one key must not count twice); the
        message names the files.
    """
    folder = Path(key_dir).expanduser()
    if not folder.is_dir():
        raise SignatureError(f"key dir {folder} does not exist")
    registry: dict[str, bytes] = {}
    for path in sorted(folder.glob("*.pub")):
        try:
            public = path.read_bytes()
        except OSError as err:
            raise SignatureError(f"cannot read {path}: {err.strerror}") from None
        if len(public) != PUBLIC_KEY_SIZE:
            raise SignatureError(
                f"{path} is not a raw {PUBLIC_KEY_SIZE}-byte Ed25519 public key "
                f"({len(public)} bytes)"
            )
        try:
            check_public_key(public)
        except SignatureError as err:
            raise SignatureError(f"{path} is not a usable Ed25519 public key: {err}") from None
        twin = next((name for name, key in registry.items() if key == public), None)
        if twin is not None:
            raise SignatureError(f"{path} holds the same key as {twin}.pub; one key per identity")
        registry[path.stem] = public
    if not registry:
        raise SignatureError(f"key dir {folder} holds no <identity>.pub public keys")
    return registry
