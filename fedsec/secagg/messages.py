"""Typed, validated messages of the SecAgg+ protocol.

One request (server to client) and one reply (client to server) per stage of
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017 (Figure 4), on the neighbour graph of Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020:

===================  ==========================  ===============================
stage                request carries             reply carries
===================  ==========================  ===============================
advertise-keys       session, round, parameters  two X25519 public keys
share-keys           the neighbours' public keys  encrypted Shamir shares
masked-input         the shares sent to me        the masked input vector
consistency-check    the survivor set (signed)    a signature on that set
unmask               the survivor set             self-mask or key shares
===================  ==========================  ===============================

Every message converts to and from a flat ``dict`` of ints, floats, bools,
bytes, strings and lists of them (what a Flower ``ConfigRecord`` holds), and
``from_record`` checks types, lengths and ranges, raising :class:`ProtocolError`
with one line that names the field. The masked vector travels separately (an
array, see :class:`MaskedInputReply`). Client ids are the protocol's ids
``1..n``, also the Shamir evaluation points.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fedsec.wire import (
    ADVERTISE_KEYS_STAGE,
    CONSISTENCY_CHECK_STAGE,
    MASKED_INPUT_STAGE,
    SHARE_KEYS_STAGE,
    UNMASK_STAGE,
)
from fedsec.wire import SECAGG_STAGES as STAGES
from fedsec.wire import STAGE_KEY as STAGE_KEY

__all__ = [
    "STAGES",
    "AdvertiseKeysReply",
    "AdvertiseKeysRequest",
    "ConsistencyCheckReply",
    "ConsistencyCheckRequest",
    "MaskedInputReply",
    "MaskedInputRequest",
    "PeerKeys",
    "ProtocolError",
    "ShareKeysReply",
    "ShareKeysRequest",
    "UnmaskReply",
    "UnmaskRequest",
    "request_from_record",
]

RecordValue = (
    int
    | float
    | str
    | bytes
    | bool
    | list[int]
    | list[float]
    | list[str]
    | list[bytes]
    | list[bool]
)
Record = dict[str, RecordValue]

# STAGES and STAGE_KEY (the record entry naming a message's stage) are defined in fedsec.wire.
SESSION_BYTES = (16, 64)
KEY_BYTES = 32
SIGNATURE_BYTES = 64
#: Serialized pair of Shamir shares (self-mask seed, mask key), 52 bytes each.
SHARE_BYTES = 52
#: AES-GCM ciphertext of one share pair: 12-byte nonce, 2 x 52 bytes, 16-byte tag.
CIPHERTEXT_BYTES = 12 + 2 * SHARE_BYTES + 16
#: Protocol ceilings on the round size ``n`` and the graph degree ``k``; a node
#: lowers them with its node config (``secagg-max-nodes``, ``secagg-max-degree``,
#: :class:`~fedsec.secagg.client.SecAggClient`). Every list a message carries is
#: refused above its ceiling before it is parsed further: ids of neighbours and
#: shares (at most ``k``) and of survivors and signers (at most ``n``).
MAX_CLIENTS = 100_000
MAX_DEGREE = 1_024
#: Longest identity name (signed mode), in characters.
MAX_IDENTITY_CHARS = 256
#: Largest ``weight_cap`` a masked-input request may carry (exact as a float64).
MAX_WEIGHT_CAP = 2**53


class ProtocolError(ValueError):
    """A protocol message or step was refused; the text says which and why."""


def _fail(message: str) -> ProtocolError:
    return ProtocolError(message)


def _expect(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise _fail(f"secagg message lacks '{key}'")
    value = record[key]
    if kind is int and isinstance(value, bool):
        raise _fail(f"secagg field '{key}' must be int, got bool")
    if not isinstance(value, kind):
        raise _fail(f"secagg field '{key}' has type {type(value).__name__}")
    return value


def _list(record: Mapping[str, Any], key: str, limit: int) -> list[Any]:
    """The list under ``key``, refused before any per-item work when longer than ``limit``."""
    values: list[Any] = _expect(record, key, list)
    if len(values) > limit:
        raise _fail(f"secagg field '{key}' holds {len(values)} items; at most {limit} allowed")
    return values


def _int_list(record: Mapping[str, Any], key: str, limit: int = MAX_CLIENTS) -> tuple[int, ...]:
    values = _list(record, key, limit)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _fail(f"secagg field '{key}' must be a list of ints")
    return tuple(values)


def _bytes_list(
    record: Mapping[str, Any], key: str, size: int | None = None, limit: int = MAX_CLIENTS
) -> tuple[bytes, ...]:
    values = _list(record, key, limit)
    if not all(isinstance(v, bytes) for v in values):
        raise _fail(f"secagg field '{key}' must be a list of bytes")
    if size is not None and any(len(v) != size for v in values):
        raise _fail(f"secagg field '{key}' must hold {size}-byte values")
    return tuple(values)


def _check_ids(ids: tuple[int, ...], name: str, upper: int = MAX_CLIENTS) -> None:
    if any(not 1 <= i <= upper for i in ids):
        raise _fail(f"secagg field '{name}' holds a client id outside [1, {upper}]")
    if len(set(ids)) != len(ids):
        raise _fail(f"secagg field '{name}' repeats a client id")


def _check_session(session: bytes, server_round: int) -> None:
    low, high = SESSION_BYTES
    if not low <= len(session) <= high:
        raise _fail(f"secagg session must be {low}..{high} bytes, got {len(session)}")
    if not 0 <= server_round < 2**63:
        raise _fail(f"secagg round must be in [0, 2**63), got {server_round}")


def _mapping(ids: tuple[int, ...], values: tuple[bytes, ...], what: str) -> dict[int, bytes]:
    if len(ids) != len(values):
        raise _fail(f"secagg {what}: {len(ids)} ids but {len(values)} values")
    return dict(zip(ids, values, strict=True))


@dataclass(frozen=True)
class _Request:
    """Fields shared by every request: the stage, session and round it belongs to."""

    stage: ClassVar[str] = ""
    session: bytes
    round: int

    def _header(self) -> Record:
        return {STAGE_KEY: self.stage, "session": self.session, "round": self.round}

    @staticmethod
    def _parse_header(record: Mapping[str, Any]) -> tuple[bytes, int]:
        session = _expect(record, "session", bytes)
        server_round = _expect(record, "round", int)
        _check_session(session, server_round)
        return session, server_round


@dataclass(frozen=True)
class AdvertiseKeysRequest(_Request):
    """Stage 0: the round's parameters; the client answers with fresh public keys.

    ``identities`` (signed mode only) names the long-term identity behind each
    protocol id ``1..n``, so clients can check peers' Ed25519 signatures against
    keys they trust.

    ``min_survivors`` (bucketed mode): the client unmasks only a survivor set
    of at least this many clients (and at least ``threshold``). ``norm_bound``
    > 0: the client scales its update to at most this L2 norm before encoding.
    ``noise_variance`` > 0 (distributed DP): the client adds Skellam noise of
    this variance (in code units) to each encoded coordinate of its update,
    clipped to ``headroom``.
    """

    stage: ClassVar[str] = ADVERTISE_KEYS_STAGE
    client_id: int
    num_clients: int
    degree: int
    threshold: int
    graph_seed: bytes
    clip: float
    bits: int
    modulus_bits: int
    dim: int
    signed: bool = False
    identities: tuple[str, ...] = ()
    min_survivors: int = 0
    norm_bound: float = 0.0
    noise_variance: float = 0.0
    headroom: int = 0

    def __post_init__(self) -> None:
        _check_session(self.session, self.round)
        n, k, t = self.num_clients, self.degree, self.threshold
        if not 2 <= n <= MAX_CLIENTS:
            raise _fail(f"secure aggregation needs 2 to {MAX_CLIENTS} clients, got n={n}")
        if not 1 <= self.client_id <= n:
            raise _fail(f"client_id {self.client_id} outside [1, {n}]")
        if not 1 <= t <= k < n or (k % 2 and n % 2):
            raise _fail(f"need 1 <= t <= k < n and k or n even, got t={t}, k={k}, n={n}")
        if k > MAX_DEGREE:
            raise _fail(f"degree k={k} exceeds the limit of {MAX_DEGREE}")
        if 2 * t <= k:
            # With t <= k / 2 a server telling half of a client's neighbours that it
            # survived and the other half that it dropped gets t shares of its seed
            # and t of its mask key: its input in the clear. Refused in every mode.
            raise _fail(f"secagg round needs t > k / 2 (got t={t}, k={k})")
        if len(self.graph_seed) != KEY_BYTES:
            raise _fail(f"graph_seed must be {KEY_BYTES} bytes, got {len(self.graph_seed)}")
        if not (np.isfinite(self.clip) and self.clip > 0):
            raise _fail(f"clip must be a finite number > 0, got {self.clip}")
        if self.dim < 1:
            raise _fail(f"dim must be >= 1, got {self.dim}")
        if self.signed and len(self.identities) != n:
            raise _fail(f"signed mode needs {n} identities, got {len(self.identities)}")
        if self.signed and len(set(self.identities)) != n:
            raise _fail("identities repeat: one identity cannot hold two protocol ids")
        if not 0 <= self.min_survivors <= n:
            raise _fail(f"min_survivors must be in [0, n={n}], got {self.min_survivors}")
        for name in ("norm_bound", "noise_variance"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise _fail(f"{name} must be a finite number >= 0, got {value}")
        if self.headroom < 0 or (self.noise_variance > 0) != (self.headroom > 0):
            raise _fail(
                f"noise needs headroom > 0 and headroom needs noise, got noise_variance="
                f"{self.noise_variance}, headroom={self.headroom}"
            )

    def parameters_digest(self) -> bytes:
        """SHA-256 of everything every client of the round must agree on (not its own id)."""
        record = self.to_record()
        del record["client_id"]
        canonical = json.dumps(
            {k: v.hex() if isinstance(v, bytes) else v for k, v in sorted(record.items())},
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).digest()

    def to_record(self) -> Record:
        """The request as a flat record."""
        return {
            **self._header(),
            "client_id": self.client_id,
            "num_clients": self.num_clients,
            "degree": self.degree,
            "threshold": self.threshold,
            "graph_seed": self.graph_seed,
            "clip": float(self.clip),
            "bits": self.bits,
            "modulus_bits": self.modulus_bits,
            "dim": self.dim,
            "signed": self.signed,
            "identities": list(self.identities),
            "min_survivors": self.min_survivors,
            "norm_bound": float(self.norm_bound),
            "noise_variance": float(self.noise_variance),
            "headroom": self.headroom,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AdvertiseKeysRequest:
        """Parse and validate; raises :class:`ProtocolError`."""
        session, server_round = cls._parse_header(record)
        identities = _list(record, "identities", MAX_CLIENTS)
        if not all(isinstance(i, str) and len(i) <= MAX_IDENTITY_CHARS for i in identities):
            raise _fail(
                f"secagg field 'identities' must be strings of at most {MAX_IDENTITY_CHARS} chars"
            )
        return cls(
            session=session,
            round=server_round,
            client_id=_expect(record, "client_id", int),
            num_clients=_expect(record, "num_clients", int),
            degree=_expect(record, "degree", int),
            threshold=_expect(record, "threshold", int),
            graph_seed=_expect(record, "graph_seed", bytes),
            clip=float(_expect(record, "clip", (int, float))),
            bits=_expect(record, "bits", int),
            modulus_bits=_expect(record, "modulus_bits", int),
            dim=_expect(record, "dim", int),
            signed=_expect(record, "signed", bool),
            identities=tuple(identities),
            min_survivors=_expect(record, "min_survivors", int),
            norm_bound=float(_expect(record, "norm_bound", (int, float))),
            noise_variance=float(_expect(record, "noise_variance", (int, float))),
            headroom=_expect(record, "headroom", int),
        )


@dataclass(frozen=True)
class AdvertiseKeysReply:
    """A client's round keys: ``c_pk`` encrypts shares, ``s_pk`` seeds pairwise masks."""

    c_public: bytes
    s_public: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        if len(self.c_public) != KEY_BYTES or len(self.s_public) != KEY_BYTES:
            raise _fail(f"public keys must be {KEY_BYTES} bytes")
        if self.signature and len(self.signature) != SIGNATURE_BYTES:
            raise _fail(f"signature must be {SIGNATURE_BYTES} bytes, got {len(self.signature)}")

    def to_record(self) -> Record:
        """The reply as a flat record."""
        return {"c_public": self.c_public, "s_public": self.s_public, "signature": self.signature}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AdvertiseKeysReply:
        """Parse and validate; raises :class:`ProtocolError`."""
        return cls(
            c_public=_expect(record, "c_public", bytes),
            s_public=_expect(record, "s_public", bytes),
            signature=_expect(record, "signature", bytes),
        )


@dataclass(frozen=True)
class PeerKeys:
    """A neighbour's advertised keys, as the server relays them."""

    client_id: int
    c_public: bytes
    s_public: bytes
    signature: bytes = b""


@dataclass(frozen=True)
class ShareKeysRequest(_Request):
    """Stage 1: the keys of the client's neighbours that advertised theirs."""

    stage: ClassVar[str] = SHARE_KEYS_STAGE
    peers: tuple[PeerKeys, ...] = ()

    def to_record(self) -> Record:
        """The request as a flat record."""
        return {
            **self._header(),
            "ids": [p.client_id for p in self.peers],
            "c_public": [p.c_public for p in self.peers],
            "s_public": [p.s_public for p in self.peers],
            "signatures": [p.signature for p in self.peers],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ShareKeysRequest:
        """Parse and validate; raises :class:`ProtocolError`."""
        session, server_round = cls._parse_header(record)
        ids = _int_list(record, "ids", MAX_DEGREE)
        _check_ids(ids, "ids")
        c_pub = _bytes_list(record, "c_public", KEY_BYTES, MAX_DEGREE)
        s_pub = _bytes_list(record, "s_public", KEY_BYTES, MAX_DEGREE)
        sigs = _bytes_list(record, "signatures", None, MAX_DEGREE)
        if any(len(sig) not in (0, SIGNATURE_BYTES) for sig in sigs):
            raise _fail(
                f"secagg field 'signatures' must hold empty or {SIGNATURE_BYTES}-byte values"
            )
        if not len(ids) == len(c_pub) == len(s_pub) == len(sigs):
            raise _fail("secagg share-keys request: lists of different lengths")
        peers = tuple(PeerKeys(*row) for row in zip(ids, c_pub, s_pub, sigs, strict=True))
        return cls(session=session, round=server_round, peers=peers)


@dataclass(frozen=True)
class ShareKeysReply:
    """Encrypted share pairs, keyed by the neighbour each is addressed to."""

    ciphertexts: dict[int, bytes] = field(default_factory=dict)

    def to_record(self) -> Record:
        """The reply as a flat record."""
        return {"ids": list(self.ciphertexts), "ciphertexts": list(self.ciphertexts.values())}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ShareKeysReply:
        """Parse and validate; raises :class:`ProtocolError`."""
        ids = _int_list(record, "ids", MAX_DEGREE)
        _check_ids(ids, "ids")
        cts = _bytes_list(record, "ciphertexts", CIPHERTEXT_BYTES, MAX_DEGREE)
        return cls(_mapping(ids, cts, "share-keys reply"))


@dataclass(frozen=True)
class MaskedInputRequest(_Request):
    """Stage 2: the encrypted shares the client's neighbours addressed to it.

    ``weight_cap`` (in ``[0, MAX_WEIGHT_CAP]``) is how the client weighs its
    update: ``min(num_examples, weight_cap) / weight_cap``, or equal weights
    at 0. It travels here, in the protocol's own message, so a client mod
    needs no application config to take part.
    """

    stage: ClassVar[str] = MASKED_INPUT_STAGE
    ciphertexts: dict[int, bytes] = field(default_factory=dict)
    weight_cap: int = 0

    def to_record(self) -> Record:
        """The request as a flat record."""
        return {
            **self._header(),
            "ids": list(self.ciphertexts),
            "ciphertexts": list(self.ciphertexts.values()),
            "weight_cap": self.weight_cap,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MaskedInputRequest:
        """Parse and validate; raises :class:`ProtocolError`."""
        session, server_round = cls._parse_header(record)
        ids = _int_list(record, "ids", MAX_DEGREE)
        _check_ids(ids, "ids")
        values = _bytes_list(record, "ciphertexts", CIPHERTEXT_BYTES, MAX_DEGREE)
        cts = _mapping(ids, values, "masked-input request")
        weight_cap = _expect(record, "weight_cap", int)
        if not 0 <= weight_cap <= MAX_WEIGHT_CAP:
            raise _fail(
                f"secagg field 'weight_cap' must be in [0, {MAX_WEIGHT_CAP}], got {weight_cap}"
            )
        return cls(session=session, round=server_round, ciphertexts=cts, weight_cap=weight_cap)


@dataclass(frozen=True)
class MaskedInputReply:
    """The masked, encoded input ``y_u`` (``dim + 1`` unsigned ints: update and weight)."""

    masked: npt.NDArray[np.unsignedinteger[Any]]

    def check(self, length: int, dtype: npt.DTypeLike) -> None:
        """Raise :class:`ProtocolError` unless ``masked`` is 1-D of ``length`` ``dtype``."""
        arr = self.masked
        if (
            not isinstance(arr, np.ndarray)
            or arr.dtype != np.dtype(dtype)
            or arr.shape != (length,)
        ):
            got = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise _fail(f"masked input must be ({length},) {np.dtype(dtype)}, got {got}")


@dataclass(frozen=True)
class ConsistencyCheckRequest(_Request):
    """Stage 3 (signed mode): the clients whose masked inputs the server holds."""

    stage: ClassVar[str] = CONSISTENCY_CHECK_STAGE
    survivors: tuple[int, ...] = ()

    def to_record(self) -> Record:
        """The request as a flat record."""
        return {**self._header(), "survivors": list(self.survivors)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ConsistencyCheckRequest:
        """Parse and validate; raises :class:`ProtocolError`."""
        session, server_round = cls._parse_header(record)
        survivors = _int_list(record, "survivors")
        _check_ids(survivors, "survivors")
        return cls(session=session, round=server_round, survivors=survivors)


@dataclass(frozen=True)
class ConsistencyCheckReply:
    """The client's Ed25519 signature on the survivor set."""

    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise _fail(f"signature must be {SIGNATURE_BYTES} bytes, got {len(self.signature)}")

    def to_record(self) -> Record:
        """The reply as a flat record."""
        return {"signature": self.signature}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ConsistencyCheckReply:
        """Parse and validate; raises :class:`ProtocolError`."""
        return cls(_expect(record, "signature", bytes))


@dataclass(frozen=True)
class UnmaskRequest(_Request):
    """Stage 4: the survivor set (plus, signed mode, the survivors' signatures on it)."""

    stage: ClassVar[str] = UNMASK_STAGE
    survivors: tuple[int, ...] = ()
    signatures: dict[int, bytes] = field(default_factory=dict)

    def to_record(self) -> Record:
        """The request as a flat record."""
        return {
            **self._header(),
            "survivors": list(self.survivors),
            "signer_ids": list(self.signatures),
            "signatures": list(self.signatures.values()),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> UnmaskRequest:
        """Parse and validate; raises :class:`ProtocolError`."""
        session, server_round = cls._parse_header(record)
        survivors = _int_list(record, "survivors")
        _check_ids(survivors, "survivors")
        signer_ids = _int_list(record, "signer_ids")
        _check_ids(signer_ids, "signer_ids")
        sigs = _mapping(signer_ids, _bytes_list(record, "signatures", SIGNATURE_BYTES), "unmask")
        return cls(session=session, round=server_round, survivors=survivors, signatures=sigs)


@dataclass(frozen=True)
class UnmaskReply:
    """Shares that let the server unmask: self-mask seed shares of survivors,
    mask-key shares of dropped clients (never both for one client)."""

    seed_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = set(self.seed_shares) & set(self.key_shares)
        if both:
            raise _fail(f"unmask reply holds both kinds of share for clients {sorted(both)}")

    def to_record(self) -> Record:
        """The reply as a flat record."""
        return {
            "seed_ids": list(self.seed_shares),
            "seed_shares": list(self.seed_shares.values()),
            "key_ids": list(self.key_shares),
            "key_shares": list(self.key_shares.values()),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> UnmaskReply:
        """Parse and validate; raises :class:`ProtocolError`."""
        seed_ids = _int_list(record, "seed_ids", MAX_DEGREE)
        key_ids = _int_list(record, "key_ids", MAX_DEGREE)
        _check_ids(seed_ids, "seed_ids")
        _check_ids(key_ids, "key_ids")
        seeds = _bytes_list(record, "seed_shares", SHARE_BYTES, MAX_DEGREE)
        keys = _bytes_list(record, "key_shares", SHARE_BYTES, MAX_DEGREE)
        return cls(
            seed_shares=_mapping(seed_ids, seeds, "unmask"),
            key_shares=_mapping(key_ids, keys, "unmask"),
        )


_REQUESTS: dict[str, type[Any]] = {
    cls.stage: cls
    for cls in (
        AdvertiseKeysRequest,
        ShareKeysRequest,
        MaskedInputRequest,
        ConsistencyCheckRequest,
        UnmaskRequest,
    )
}


def request_from_record(record: Mapping[str, Any]) -> Any:
    """Parse any request by its ``stage`` field; raises :class:`ProtocolError`."""
    stage = record.get(STAGE_KEY)
    if not isinstance(stage, str) or stage not in _REQUESTS:
        raise _fail(f"unknown secagg stage {stage!r}; expected one of {', '.join(STAGES)}")
    return _REQUESTS[stage].from_record(record)
