"""The server side of SecAgg+: parameters, relaying, and unmasking the sum.

:class:`SecAggServer` drives one round of Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (Figure 4), on
the Harary neighbour graph of Bell et al., "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020. Each method takes the replies to
the previous stage (a client missing from them has dropped out) and returns
the requests of the next, addressed by protocol id ``1..n``:

========================  ==============================  ============================
method                    takes replies of                returns requests for
========================  ==============================  ============================
``advertise_keys()``      (nothing)                        advertise-keys
``share_keys``            advertise-keys                   share-keys
``masked_input``          share-keys                       masked-input
``consistency_check``     masked-input (signed mode)       consistency-check
``unmask``                masked-input / consistency       unmask
``finish``                unmask                           -> :class:`SecAggResult`
========================  ==============================  ============================

The server only ever holds public keys, ciphertexts, masked vectors, their
running sum, and for each client either its self-mask seed (if it survived) or
its mask key (if it dropped), reconstructed from ``t`` shares. A round that
cannot finish (fewer than ``t`` clients at a stage, too few shares to unmask a
client) raises :class:`SecAggAbortedError`; nothing is returned and nothing private
was revealed, since every honest client releases at most one kind of share per
peer.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedsec.secagg import shamir
from fedsec.secagg.encoding import FixedPointEncoder, max_bits_for
from fedsec.secagg.graph import (
    bucket_parameters,
    harary_graph,
    malicious_threshold,
    secagg_parameters,
)
from fedsec.secagg.keys import derive_key
from fedsec.secagg.masking import remove_pairwise_mask, remove_self_mask
from fedsec.secagg.messages import (
    CIPHERTEXT_BYTES,
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    ConsistencyCheckRequest,
    MaskedInputReply,
    MaskedInputRequest,
    PeerKeys,
    ProtocolError,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from fedsec.secagg.signing import verify_keys, verify_survivors

__all__ = ["SecAggAbortedError", "SecAggParams", "SecAggResult", "SecAggServer"]

logger = logging.getLogger("fedsec")


class SecAggAbortedError(RuntimeError):
    """The round cannot complete; the server learnt no sum and no individual input."""


def _check_round_size(n: int) -> None:
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients per sum, got {n}")


@dataclass(frozen=True)
class SecAggParams:
    """One round's public parameters.

    Build it with :meth:`for_round`, which derives the graph degree ``k`` and
    threshold ``t`` from ``n`` and the tolerated dropout and corruption rates
    (:func:`fedsec.secagg.graph.secagg_parameters`) and the fixed-point depth
    from ``n`` and the ring, and refuses a configuration whose sum could wrap.

    ``min_survivors`` > 0 (bucketed mode) makes the server abort, and every
    honest client refuse to unmask, a sum of fewer clients. ``norm_bound``,
    ``noise_variance`` and ``headroom`` are passed to the clients (see
    :class:`~fedsec.secagg.messages.AdvertiseKeysRequest`).
    """

    num_clients: int
    degree: int
    threshold: int
    clip: float
    bits: int
    modulus_bits: int
    dim: int
    signed: bool = False
    min_survivors: int = 0
    norm_bound: float = 0.0
    noise_variance: float = 0.0
    headroom: int = 0

    def __post_init__(self) -> None:
        n, k, t = self.num_clients, self.degree, self.threshold
        _check_round_size(n)
        if not 1 <= t <= k < n:
            raise ValueError(f"need 1 <= threshold <= degree < n, got t={t}, k={k}, n={n}")
        if k % 2 and n % 2:
            raise ValueError(f"odd degree k={k} needs an even number of clients, got n={n}")
        if 2 * t <= k:
            raise ValueError(
                f"a secure sum needs threshold > k / 2 (got t={t}, k={k}): with fewer, a server "
                "could collect both kinds of share by splitting the survivor set, and "
                "every client refuses such a round"
            )
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if not 0 <= self.min_survivors <= n:
            raise ValueError(f"min_survivors must be in [0, n={n}], got {self.min_survivors}")
        if (self.noise_variance > 0) != (self.headroom > 0) or self.norm_bound < 0:
            raise ValueError(
                f"noise_variance > 0 goes with headroom > 0 and norm_bound >= 0, got "
                f"{self.noise_variance}, {self.headroom}, {self.norm_bound}"
            )
        self.encoder  # noqa: B018  (refuses an overflow-prone encoding)

    @property
    def encoder(self) -> FixedPointEncoder:
        """The fixed-point encoder every client uses (``n`` summands)."""
        return FixedPointEncoder(
            clip=self.clip,
            bits=self.bits,
            num_clients=self.num_clients,
            modulus_bits=self.modulus_bits,
            headroom=self.headroom,
        )

    @property
    def unmask_minimum(self) -> int:
        """Fewest survivors whose sum may be unmasked: ``max(t, min_survivors)``."""
        return max(self.threshold, self.min_survivors)

    @classmethod
    def for_round(
        cls,
        num_clients: int,
        dim: int,
        *,
        clip: float,
        dropout_rate: float = 0.1,
        corrupt_fraction: float = 0.05,
        degree: int = 0,
        threshold: int = 0,
        bits: int = 0,
        modulus_bits: int = 32,
        signed: bool = False,
        min_survivors: int = 0,
        norm_bound: float = 0.0,
        noise_variance: float = 0.0,
        headroom: int = 0,
    ) -> SecAggParams:
        """Derive ``k``, ``t`` and ``bits`` for ``num_clients`` unless overridden.

        Parameters
        ----------
        num_clients, dim : int
            Clients in the round (``>= 3``) and length of each update.
        clip : float
            Coordinates are clipped to ``[-clip, clip]`` before encoding.
        dropout_rate, corrupt_fraction : float
            Tolerated fractions for :func:`~fedsec.secagg.graph.secagg_parameters`.
        degree : int, default 0
            Graph degree ``k``; 0 derives it. Capped at ``n - 1`` (lowered by
            one more when both ``k`` and ``n`` are odd).
        threshold : int, default 0
            Shamir threshold ``t``; 0 derives it (``k // 2 + 1`` for a given
            ``k``). Capped at ``k``. Refused at or below ``k / 2`` in every
            mode (clients refuse such a round), and in signed mode below
            ``(k + c) / 2`` (:func:`~fedsec.secagg.graph.malicious_threshold`).
        bits : int, default 0
            Fixed-point depth; 0 takes the most that ``n`` summands fit in the
            ring (:func:`~fedsec.secagg.encoding.max_bits_for`).
        modulus_bits : int, default 32
            32 or 64.
        signed : bool, default False
            Malicious-server mode: signed keys and the consistency check.
        min_survivors : int, default 0
            No sum of fewer survivors is unmasked (see :meth:`for_bucket`).
        norm_bound, noise_variance, headroom
            As in :class:`SecAggParams`; with ``headroom`` the derived ``bits``
            leaves room for it.
        """
        n = num_clients
        _check_round_size(n)
        if degree:
            k = min(degree, n - 1)
            k -= 1 if (k % 2 and n % 2) else 0
            least = k // 2 + 1
            if signed:  # expected corrupt neighbours, rounded up
                least = max(least, malicious_threshold(k, math.ceil(corrupt_fraction * k)))
            t = min(threshold or least, k)
            if t < least:
                raise ValueError(
                    f"{'signed mode needs ' if signed else ''}threshold >= {least} for degree "
                    f"{k}{f' at {corrupt_fraction:g} corrupt' if signed else ''} (else a server "
                    f"could split the survivor set), got {t}"
                )
        else:
            k, t = secagg_parameters(
                n, dropout_rate=dropout_rate, corrupt_fraction=corrupt_fraction, malicious=signed
            )
            least = t if signed else malicious_threshold(k, 0)
            if threshold and threshold < least:
                raise ValueError(
                    f"{'signed mode needs ' if signed else ''}threshold >= {least} for degree "
                    f"{k} (else a server could split the survivor set), got {threshold}"
                )
            t = min(threshold, k) if threshold else t
        bits = bits or _max_bits_with_headroom(n, modulus_bits, headroom)
        return cls(
            n,
            k,
            t,
            float(clip),
            bits,
            modulus_bits,
            dim,
            signed,
            min_survivors,
            float(norm_bound),
            float(noise_variance),
            headroom,
        )

    @classmethod
    def for_bucket(
        cls,
        size: int,
        dim: int,
        *,
        min_survivors: int,
        corrupt_fraction: float = 0.05,
        signed: bool = False,
        **encoding: Any,
    ) -> SecAggParams:
        """One bucket's parameters: complete graph, ``k`` and ``t`` from
        :func:`~fedsec.secagg.graph.bucket_parameters`, unmasked only with at
        least ``min_survivors`` (the bucket size ``s``).

        ``encoding``: ``clip``, ``bits``, ``modulus_bits``, ``norm_bound``,
        ``noise_variance``, ``headroom`` as in :meth:`for_round`.
        """
        k, t = bucket_parameters(
            size, min_survivors, corrupt_fraction=corrupt_fraction, signed=signed
        )
        return cls.for_round(
            size,
            dim,
            degree=k,
            threshold=t,
            corrupt_fraction=corrupt_fraction,
            signed=signed,
            min_survivors=min_survivors,
            **encoding,
        )


def _max_bits_with_headroom(n: int, modulus_bits: int, headroom: int) -> int:
    """Largest ``bits`` with ``n * (2**bits - 1 + 2 headroom) < 2**modulus_bits``."""
    bits = max_bits_for(n, modulus_bits)
    while bits > 1 and n * ((1 << bits) - 1 + 2 * headroom) >= 1 << modulus_bits:
        bits -= 1
    return bits


@dataclass
class SecAggResult:
    """What a completed round gives the server.

    Attributes
    ----------
    aggregate : torch.Tensor
        float32 ``[dim]``: the weighted mean ``sum_u w_u x_u / sum_u w_u`` of the
        survivors' clipped updates.
    total_weight : float
        ``sum_u w_u`` over the survivors.
    contributors : tuple of int
        Protocol ids whose inputs are in the sum.
    dropped : dict of int to str
        Clients that left the round, with the stage and reason.
    error_bound : float
        Per-coordinate bound on the quantisation error of ``aggregate``.
    """

    aggregate: torch.Tensor
    total_weight: float
    contributors: tuple[int, ...]
    dropped: dict[int, str] = field(default_factory=dict)
    error_bound: float = 0.0


class SecAggServer:
    """Drive one SecAgg+ round for clients ``1..n``.

    Parameters
    ----------
    params : SecAggParams
        The round's parameters.
    server_round : int, default 0
        Round number, bound into every key and ciphertext.
    session : bytes, optional
        Session id (16-64 bytes); default 32 fresh random bytes.
    identities : sequence of str, optional
        Signed mode: the long-term identity of each client ``1..n``.
    trusted_keys : mapping of str to bytes, optional
        Signed mode: raw Ed25519 public keys by identity (the ``.pub`` files).
        With them the server checks every signature a client sends before
        relaying it; each honest client refuses a request holding one bad
        signature, so without this check one client could make all its
        neighbours refuse the round. A client whose identity has no key here
        is dropped (its neighbours could not verify it either).
    """

    def __init__(
        self,
        params: SecAggParams,
        *,
        server_round: int = 0,
        session: bytes | None = None,
        identities: Sequence[str] = (),
        trusted_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        n = params.num_clients
        if params.signed and len(identities) != n:
            raise ValueError(f"signed mode needs {n} identities, got {len(identities)}")
        self.params = params
        self.round = server_round
        self.session = session if session is not None else secrets.token_bytes(32)
        self.graph_seed = secrets.token_bytes(32)
        self.identities = tuple(identities)
        self.trusted_keys = dict(trusted_keys or {})
        self._parameters = b""  # digest of the round's parameters, which keys are signed with
        graph = harary_graph(n, params.degree, self.graph_seed)
        self.neighbours = {u + 1: frozenset(v + 1 for v in vs) for u, vs in graph.items()}
        self.dropped: dict[int, str] = {}
        self._stage = "advertise-keys"
        self._outstanding = "advertise-keys"  # stage of the requests last sent
        self._asked: set[int] = set()
        self._keys: dict[int, AdvertiseKeysReply] = {}
        self._peers_sent: dict[int, frozenset[int]] = {}
        self._forwarded: dict[int, frozenset[int]] = {}  # holder -> senders of its shares
        self._masked_senders: set[int] = set()  # U2
        self._survivors: tuple[int, ...] = ()  # U3
        self._total: np.ndarray[Any, Any] | None = None

    # -- bookkeeping ----------------------------------------------------------------

    def drop(self, client_id: int, reason: str) -> None:
        """Record that ``client_id`` left the round (a dropout or a refused reply).

        The reason is prefixed with the stage whose requests were last sent.
        """
        if client_id not in self.dropped:
            self.dropped[client_id] = f"{self._outstanding}: {reason}"
            logger.info("secagg round %d: client %d out: %s", self.round, client_id, reason)

    def _advance(self, expected: str, new: str) -> None:
        if self._stage != expected:
            raise RuntimeError(f"secagg server is at stage {self._stage}, not {expected}")
        self._stage = new

    def _answered(self, replies: Mapping[int, Any], kind: type) -> dict[int, Any]:
        """Replies from clients asked at this stage, of the right type; others dropped."""
        alive: dict[int, Any] = {}
        for cid in sorted(self._asked):
            reply = replies.get(cid)
            if reply is None:
                self.drop(cid, "no reply")
            elif not isinstance(reply, kind):
                self.drop(cid, f"expected {kind.__name__}, got {type(reply).__name__}")
            else:
                alive[cid] = reply
        return alive

    def _require(self, alive: Sequence[int] | Mapping[int, Any], what: str) -> None:
        t = self.params.threshold
        if len(alive) < t:
            self._stage = "aborted"
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: only {len(alive)} clients {what}; "
                f"the threshold is t={t}"
            )

    def _header(self) -> dict[str, Any]:
        return {"session": self.session, "round": self.round}

    # -- stages ---------------------------------------------------------------------

    def advertise_keys(self) -> dict[int, AdvertiseKeysRequest]:
        """Requests opening the round, one per client ``1..n``."""
        self._advance("advertise-keys", "share-keys")
        p = self.params
        self._asked = set(range(1, p.num_clients + 1))
        self._outstanding = "advertise-keys"
        requests = {
            cid: AdvertiseKeysRequest(
                **self._header(),
                client_id=cid,
                num_clients=p.num_clients,
                degree=p.degree,
                threshold=p.threshold,
                graph_seed=self.graph_seed,
                clip=p.clip,
                bits=p.bits,
                modulus_bits=p.modulus_bits,
                dim=p.dim,
                signed=p.signed,
                identities=self.identities if p.signed else (),
                min_survivors=p.min_survivors,
                norm_bound=p.norm_bound,
                noise_variance=p.noise_variance,
                headroom=p.headroom,
            )
            for cid in sorted(self._asked)
        }
        self._parameters = requests[1].parameters_digest()  # the same for every client
        return requests

    def share_keys(self, replies: Mapping[int, AdvertiseKeysReply]) -> dict[int, ShareKeysRequest]:
        """Relay to each client the keys of its neighbours that advertised (U1)."""
        self._advance("share-keys", "masked-input")
        self._keys = self._usable_keys(self._answered(replies, AdvertiseKeysReply))
        self._require(self._keys, "advertised keys")
        requests: dict[int, ShareKeysRequest] = {}
        for cid in self._keys:
            peers = sorted(self.neighbours[cid] & set(self._keys))
            if len(peers) < self.params.threshold:
                self.drop(cid, f"only {len(peers)} neighbours advertised keys")
                continue
            self._peers_sent[cid] = frozenset(peers)
            requests[cid] = ShareKeysRequest(
                **self._header(),
                peers=tuple(
                    PeerKeys(
                        v, self._keys[v].c_public, self._keys[v].s_public, self._keys[v].signature
                    )
                    for v in peers
                ),
            )
        self._asked = set(requests)
        self._require(requests, "have enough neighbours to share keys")
        self._outstanding = "share-keys"
        return requests

    def _usable_keys(self, keys: dict[int, AdvertiseKeysReply]) -> dict[int, AdvertiseKeysReply]:
        """Advertised keys every neighbour can use; their owners are dropped otherwise.

        An honest client refuses a whole share-keys request if one peer's key is
        a low-order point (the X25519 exchange gives zero) or repeats another
        key (:meth:`~fedsec.secagg.client.SecAggClient.share_keys`), so relaying
        one such key would make all ``k`` neighbours of its owner drop out: one
        client could stop the round. Checked here instead, before relaying:
        ``c_pk != s_pk``, no key shared by two clients (every claimant is
        dropped: the server cannot tell who copied), and each key gives a
        non-zero shared secret with a fresh scalar (zero for every clamped
        scalar exactly when the point has small order; RFC 7748, section 6.1).
        """
        owners: dict[bytes, list[int]] = {}
        for cid, reply in keys.items():
            for key in {reply.c_public, reply.s_public}:
                owners.setdefault(key, []).append(cid)
        probe = X25519PrivateKey.generate()
        usable: dict[int, AdvertiseKeysReply] = {}
        for cid, reply in keys.items():
            if reply.c_public == reply.s_public:
                self.drop(cid, "advertised the same key twice")
            elif any(len(owners[k]) > 1 for k in (reply.c_public, reply.s_public)):
                self.drop(cid, "advertised a key another client advertised too")
            elif not all(_exchange_ok(probe, k) for k in (reply.c_public, reply.s_public)):
                self.drop(cid, "advertised a low-order (unusable) X25519 key")
            elif (why := self._bad_key_signature(cid, reply)) is not None:
                self.drop(cid, why)
            else:
                usable[cid] = reply
        return usable

    def _trusted(self, cid: int) -> tuple[str, bytes] | None:
        """``cid``'s identity and public key, when the server checks signatures."""
        if not (self.params.signed and self.trusted_keys):
            return None
        identity = self.identities[cid - 1]
        return identity, self.trusted_keys.get(identity, b"")

    def _bad_key_signature(self, cid: int, reply: AdvertiseKeysReply) -> str | None:
        """Why ``cid``'s signature on its keys would fail at its neighbours, or None."""
        trusted = self._trusted(cid)
        if trusted is None:
            return None
        identity, public = trusted
        if not public:
            return f"no trusted signing key for identity {identity!r}"
        try:
            verify_keys(
                public,
                reply.signature,
                session=self.session,
                server_round=self.round,
                client_id=cid,
                identity=identity,
                c_public=reply.c_public,
                s_public=reply.s_public,
                parameters=self._parameters,
            )
        except ProtocolError as err:
            return str(err)
        return None

    def masked_input(self, replies: Mapping[int, ShareKeysReply]) -> dict[int, MaskedInputRequest]:
        """Route each encrypted share pair to its holder (senders form U2)."""
        self._advance("masked-input", "masked-input-sent")
        shared: dict[int, ShareKeysReply] = {}
        for cid, reply in self._answered(replies, ShareKeysReply).items():
            if set(reply.ciphertexts) != self._peers_sent[cid]:
                self.drop(cid, "share-keys reply does not address exactly its neighbours")
            elif any(len(ct) != CIPHERTEXT_BYTES for ct in reply.ciphertexts.values()):
                self.drop(cid, f"share ciphertexts must be {CIPHERTEXT_BYTES} bytes")
            else:
                shared[cid] = reply
        self._require(shared, "shared keys")
        self._masked_senders = set(shared)
        requests: dict[int, MaskedInputRequest] = {}
        for holder in shared:
            incoming = {
                sender: shared[sender].ciphertexts[holder]
                for sender in sorted(self._peers_sent[holder] & set(shared))
            }
            if len(incoming) < self.params.threshold:
                self.drop(holder, f"only {len(incoming)} neighbours shared keys")
                continue
            self._forwarded[holder] = frozenset(incoming)
            requests[holder] = MaskedInputRequest(**self._header(), ciphertexts=incoming)
        self._asked = set(requests)
        self._require(requests, "received enough shares to mask")
        self._outstanding = "masked-input"
        return requests

    def _collect_masked(self, replies: Mapping[int, MaskedInputReply]) -> None:
        p = self.params
        dtype = p.encoder.dtype
        total = np.zeros(p.dim + 1, dtype=dtype)
        survivors: list[int] = []
        for cid, reply in self._answered(replies, MaskedInputReply).items():
            try:
                reply.check(p.dim + 1, dtype)
            except ProtocolError as err:
                self.drop(cid, str(err))
                continue
            np.add(total, reply.masked, out=total)  # wraps modulo 2**modulus_bits
            survivors.append(cid)
        self._require(survivors, "sent masked inputs")
        if len(survivors) < p.min_survivors:
            self._stage = "aborted"
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: only {len(survivors)} clients sent masked "
                f"inputs; a sum of fewer than {p.min_survivors} is never unmasked"
            )
        self._survivors = tuple(survivors)
        self._total = total

    def consistency_check(
        self, replies: Mapping[int, MaskedInputReply]
    ) -> dict[int, ConsistencyCheckRequest]:
        """Signed mode: ask every survivor (U3) to sign the survivor set."""
        if not self.params.signed:
            raise RuntimeError("the consistency check belongs to the signed mode")
        self._advance("masked-input-sent", "consistency-check")
        self._collect_masked(replies)
        self._asked = set(self._survivors)
        self._outstanding = "consistency-check"
        return {
            cid: ConsistencyCheckRequest(**self._header(), survivors=self._survivors)
            for cid in self._survivors
        }

    def unmask(
        self, replies: Mapping[int, MaskedInputReply] | Mapping[int, ConsistencyCheckReply]
    ) -> dict[int, UnmaskRequest]:
        """Ask for the shares that remove the masks (survivors U3 named in each request)."""
        signatures: dict[int, bytes] = {}
        if self.params.signed:
            self._advance("consistency-check", "unmask")
            checked = self._answered(replies, ConsistencyCheckReply)
            for cid in list(checked):
                why = self._bad_survivor_signature(cid, checked[cid].signature)
                if why is not None:  # relayed, it would make every neighbour refuse to unmask
                    self.drop(cid, why)
                    del checked[cid]
            self._require(checked, "signed the survivor set")
            signatures = {cid: r.signature for cid, r in checked.items()}
            asked = sorted(checked)
        else:
            self._advance("masked-input-sent", "unmask")
            self._collect_masked(replies)  # type: ignore[arg-type]
            asked = list(self._survivors)
        self._asked = set(asked)
        self._outstanding = "unmask"
        return {
            cid: UnmaskRequest(**self._header(), survivors=self._survivors, signatures=signatures)
            for cid in asked
        }

    def _bad_survivor_signature(self, cid: int, signature: bytes) -> str | None:
        """Why ``cid``'s signature on the survivor set would fail at its neighbours, or None."""
        trusted = self._trusted(cid)
        if trusted is None:
            return None
        identity, public = trusted
        try:
            verify_survivors(
                public,
                signature,
                session=self.session,
                server_round=self.round,
                survivors=self._survivors,
                signer=f"survivor set of client {cid} ({identity})",
            )
        except ProtocolError as err:
            return str(err)
        return None

    def finish(self, replies: Mapping[int, UnmaskReply]) -> SecAggResult:
        """Reconstruct seeds and dropped keys, strip every mask, decode the weighted mean."""
        self._advance("unmask", "done")
        p = self.params
        survivors = set(self._survivors)
        seed_shares: dict[int, list[shamir.Share]] = {u: [] for u in survivors}
        key_shares: dict[int, list[shamir.Share]] = {}
        for holder, reply in self._answered(replies, UnmaskReply).items():
            held = self._forwarded[holder]
            wrong = (set(reply.seed_shares) - (held & survivors)) | (
                set(reply.key_shares) - (held - survivors)
            )
            if wrong:
                self.drop(holder, f"unmask reply holds shares it should not: {sorted(wrong)}")
                continue
            try:
                parsed = [
                    (owner, shamir.Share.from_bytes(data), is_seed)
                    for is_seed, shares in ((True, reply.seed_shares), (False, reply.key_shares))
                    for owner, data in shares.items()
                ]
            except ValueError as err:
                self.drop(holder, f"malformed share: {err}")
                continue
            if any(share.x != holder for _, share, _ in parsed):
                self.drop(holder, "share evaluated at another client's point")
                continue
            for owner, share, is_seed in parsed:
                target = seed_shares[owner] if is_seed else key_shares.setdefault(owner, [])
                target.append(share)

        assert self._total is not None
        total, scratch = self._total, np.empty_like(self._total)
        for owner in sorted(survivors):
            seed = self._reconstruct(seed_shares[owner], owner, "self-mask seed")
            remove_self_mask(total, seed, scratch=scratch)
        dropped_after_sharing = sorted(
            u
            for u in self._masked_senders - survivors
            if any(u in self._forwarded[v] for v in survivors)
        )
        for owner in dropped_after_sharing:
            secret = self._reconstruct(key_shares.get(owner, []), owner, "mask key")
            private = X25519PrivateKey.from_private_bytes(secret)
            public = private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            if public != self._keys[owner].s_public:
                raise SecAggAbortedError(
                    f"secagg round {self.round} aborted: the mask key rebuilt for client {owner} "
                    "does not match its advertised key (a corrupt share)"
                )
            for survivor in sorted(v for v in survivors if owner in self._forwarded[v]):
                pairwise = derive_key(
                    private,
                    self._keys[survivor].s_public,
                    session=self.session,
                    round=self.round,
                    purpose="mask",
                )
                remove_pairwise_mask(total, pairwise, owner, survivor, scratch=scratch)
        count = len(survivors)
        encoder = p.encoder
        try:
            decoded = encoder.decode_sum(total, count, dtype=torch.float64)
        except ValueError as err:
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: unmasked sum is invalid ({err})"
            ) from None
        total_weight = float(decoded[-1]) / p.clip
        if not total_weight > 0:
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: summed weight is {total_weight}"
            )
        aggregate = (decoded[:-1] / total_weight).to(torch.float32)
        return SecAggResult(
            aggregate=aggregate,
            total_weight=total_weight,
            contributors=self._survivors,
            dropped=dict(self.dropped),
            error_bound=_error_bound(
                aggregate, encoder.quantisation_bound(count), p.clip, total_weight
            ),
        )

    def _reconstruct(self, shares: list[shamir.Share], owner: int, what: str) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: only {len(shares)} neighbours returned "
                f"shares of client {owner}'s {what}; need t={t}"
            )
        try:
            secret = shamir.combine(sorted(shares, key=lambda s: s.x)[:t])
        except ValueError as err:
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: shares of client {owner}'s {what}: {err}"
            ) from None
        if len(secret) != 32:
            raise SecAggAbortedError(
                f"secagg round {self.round} aborted: client {owner}'s {what} rebuilt to "
                f"{len(secret)} bytes, not 32"
            )
        return secret


def _exchange_ok(private: X25519PrivateKey, public: bytes) -> bool:
    """Whether an X25519 exchange with ``public`` gives a usable (non-zero) secret."""
    try:
        private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # all-zero output: a small-order point
        return False
    return True


def _error_bound(aggregate: torch.Tensor, step_bound: float, clip: float, weight: float) -> float:
    """Bound on ``|aggregate - exact weighted mean|`` per coordinate.

    The decoded sum ``S'`` and weight ``W'`` are each off by less than the
    summed quantisation error ``q`` (``q / clip`` for the weight), so
    ``|S'/W' - S/W| <= (q + |S'/W'| q / clip) / W'`` to first order, plus half an
    ulp for the float32 result.
    """
    largest = float(aggregate.abs().max()) if aggregate.numel() else 0.0
    return (step_bound + largest * step_bound / clip) / weight + largest * 2.0**-24
