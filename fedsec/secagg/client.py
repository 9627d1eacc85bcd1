"""The client side of SecAgg+, one method per protocol stage.

A :class:`SecAggClient` walks through the stages of Bonawitz et al.,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
2017 (Figure 4) on the Harary neighbour graph of Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020:

1. :meth:`~SecAggClient.advertise_keys`: fresh X25519 pairs ``(c, s)`` for the
   round (``c`` encrypts shares, ``s`` seeds pairwise masks), Ed25519-signed in
   the malicious-server mode.
2. :meth:`~SecAggClient.share_keys`: a fresh 32-byte self-mask seed ``b``; ``b``
   and ``s``'s private key are Shamir-shared ``t``-of-``k`` among the neighbours
   that advertised keys, each pair of shares AES-GCM-encrypted to its holder.
3. :meth:`~SecAggClient.receive_shares` then :meth:`~SecAggClient.mask`: store
   the shares addressed to this client, encode the (weighted) update in fixed
   point and add the self mask and one pairwise mask per neighbour that shared.
   A share pair that fails to decrypt or is malformed is ignored, never fatal:
   the pairwise mask with its sender still comes from key agreement, and this
   client simply holds (and at unmask returns) no share of that sender.
4. :meth:`~SecAggClient.consistency_check` (signed mode): sign the survivor set.
5. :meth:`~SecAggClient.unmask`: release, for each neighbour, the share of its
   self-mask seed if it survived, or of its mask key if it dropped; never both,
   and only once per round.

Every method checks the stage order and the request's session and round, and
raises :class:`~fedsec.secagg.messages.ProtocolError` without changing state
when a request is refused. :meth:`~SecAggClient.to_state` and
:meth:`~SecAggClient.from_state` carry the state between messages (a Flower
client keeps it in ``context.state``).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedsec.privacy.distributed import sample_skellam
from fedsec.secagg import shamir
from fedsec.secagg.encoding import FixedPointEncoder
from fedsec.secagg.graph import harary_neighbours
from fedsec.secagg.keys import decrypt_share, derive_key, encrypt_share, generate_keypair
from fedsec.secagg.masking import apply_masks
from fedsec.secagg.messages import (
    MAX_CLIENTS,
    MAX_DEGREE,
    SHARE_BYTES,
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    ConsistencyCheckRequest,
    MaskedInputReply,
    MaskedInputRequest,
    PeerKeys,
    ProtocolError,
    Record,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from fedsec.secagg.signing import sign_keys, sign_survivors, verify_keys, verify_survivors

if TYPE_CHECKING:
    # torch only where an update is masked: the key and unmask stages, each a fresh
    # process on a SuperNode, never import it.
    import torch

__all__ = [
    "DEFAULT_MAX_DEGREE",
    "DEFAULT_MAX_NODES",
    "ClientStage",
    "SecAggClient",
    "encoder_for",
    "neighbours_of",
]

#: Default node limits (node config ``secagg-max-nodes`` / ``secagg-max-degree``):
#: the protocol ceilings. A client's work per round is O(n) for the graph's
#: permutation (one C sort: about 10 ms and 2.4 MB at n = 100,000) plus O(k t)
#: for the Shamir shares and O(k d) for the masks, so the degree is the limit
#: that matters; a node with little CPU lowers it.
DEFAULT_MAX_NODES = MAX_CLIENTS
DEFAULT_MAX_DEGREE = MAX_DEGREE

logger = logging.getLogger("fedsec")


class ClientStage(enum.Enum):
    """Where a client stands in the current round."""

    IDLE = "idle"
    KEYS_ADVERTISED = "keys-advertised"
    SHARES_SENT = "shares-sent"
    SHARES_RECEIVED = "shares-received"
    MASKED_SENT = "masked-sent"
    CHECKED = "checked"
    DONE = "done"


def encoder_for(setup: AdvertiseKeysRequest) -> FixedPointEncoder:
    """The round's fixed-point encoder; refuses parameters whose sum could wrap."""
    try:
        return FixedPointEncoder(
            clip=setup.clip,
            bits=setup.bits,
            num_clients=setup.num_clients,
            modulus_bits=setup.modulus_bits,
            headroom=setup.headroom,
        )
    except ValueError as err:
        raise ProtocolError(f"secagg encoding refused: {err}") from None


def neighbours_of(setup: AdvertiseKeysRequest) -> frozenset[int]:
    """Protocol ids (``1..n``) of the client's neighbours in the round's Harary graph.

    Only the client's own row is built (:func:`~fedsec.secagg.graph.harary_neighbours`):
    ``O(n)`` for the permutation and ``O(k)`` for the row, never ``n * k``.
    """
    row = harary_neighbours(setup.num_clients, setup.degree, setup.graph_seed, setup.client_id - 1)
    return frozenset(v + 1 for v in row)


def _few(ids: Any, most: int = 8) -> str:
    """At most ``most`` ids for an error message (a request may list many)."""
    shown = sorted(ids)
    more = f" and {len(shown) - most} more" if len(shown) > most else ""
    return f"{shown[:most]}{more}"


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


class SecAggClient:
    """One client's SecAgg+ state machine for one round at a time.

    Parameters
    ----------
    identity : str, optional
        Long-term identity (signed mode): the name the server must list for
        this client and under which peers find its verification key.
    signing_key : Ed25519PrivateKey, optional
        Long-term signing key (signed mode).
    trusted_keys : mapping of str to bytes, optional
        Raw Ed25519 public keys of the identities this client trusts, obtained
        out of band (a PKI), never from the server (signed mode).
    require_signed : bool, default False
        Refuse unsigned rounds: a client provisioned for the malicious-server
        mode must not let the server downgrade it.
    min_sum : int, default 2
        Never unmask a survivor set smaller than this.
    max_nodes, max_degree : int
        Refuse a round of more than ``max_nodes`` clients or a graph degree
        above ``max_degree`` at advertise-keys, before any work: they bound
        what a (curious) server can make this client spend on one round.
        At most :data:`~fedsec.secagg.messages.MAX_CLIENTS` and
        :data:`~fedsec.secagg.messages.MAX_DEGREE`.
    """

    def __init__(
        self,
        *,
        identity: str = "",
        signing_key: Ed25519PrivateKey | None = None,
        trusted_keys: Mapping[str, bytes] | None = None,
        require_signed: bool = False,
        min_sum: int = 2,
        max_nodes: int = DEFAULT_MAX_NODES,
        max_degree: int = DEFAULT_MAX_DEGREE,
    ) -> None:
        if min_sum < 2:
            raise ValueError(f"min_sum must be >= 2 (a sum of one is the input), got {min_sum}")
        if not 2 <= max_nodes <= MAX_CLIENTS:
            raise ValueError(f"max_nodes must be in [2, {MAX_CLIENTS}], got {max_nodes}")
        if not 1 <= max_degree <= MAX_DEGREE:
            raise ValueError(f"max_degree must be in [1, {MAX_DEGREE}], got {max_degree}")
        self.require_signed = require_signed
        self.min_sum = min_sum
        self.max_nodes = max_nodes
        self.max_degree = max_degree
        self.identity = identity
        self.signing_key = signing_key
        self.trusted_keys = dict(trusted_keys or {})
        self._reset()

    def _reset(self) -> None:
        self.stage = ClientStage.IDLE
        self.setup: AdvertiseKeysRequest | None = None
        self._c_private = b""
        self._s_private = b""
        self._own_public: tuple[bytes, ...] = ()
        self._seed = b""
        self._peers: dict[int, PeerKeys] = {}
        self._mask_seeds: dict[int, bytes] = {}  # peer -> pairwise mask seed s_uv
        self._shares: dict[int, bytes] = {}  # sender -> its decrypted share pair
        # Neighbours that shared (the server forwarded their ciphertexts): the
        # pairwise masks, whether or not their share pair could be used.
        self._masked_with: tuple[int, ...] = ()
        self._unheld: tuple[int, ...] = ()  # of those, senders whose share pair was unusable
        self._survivors: tuple[int, ...] = ()
        self._neighbours: frozenset[int] | None = None

    # -- helpers ------------------------------------------------------------------

    @property
    def client_round(self) -> int:
        """The round in progress (or last finished)."""
        return self._setup().round

    @property
    def client_id(self) -> int:
        """This round's protocol id."""
        return self._setup().client_id

    def _setup(self) -> AdvertiseKeysRequest:
        if self.setup is None:
            raise ProtocolError("secagg client has no round in progress")
        return self.setup

    def _expect(self, request: Any, *stages: ClientStage) -> AdvertiseKeysRequest:
        setup = self._setup()
        if self.stage not in stages:
            raise ProtocolError(
                f"secagg {request.stage} request refused: client is at stage {self.stage.value}"
            )
        if request.session != setup.session or request.round != setup.round:
            raise ProtocolError(
                f"secagg {request.stage} request refused: it belongs to another session or round"
            )
        return setup

    @property
    def neighbours(self) -> frozenset[int]:
        """The client's neighbours in this round's graph."""
        if self._neighbours is None:
            self._neighbours = neighbours_of(self._setup())
        return self._neighbours

    def _trusted(self, client_id: int) -> tuple[str, bytes]:
        identity = self._setup().identities[client_id - 1]
        if identity not in self.trusted_keys:
            raise ProtocolError(f"no trusted signing key for identity {identity!r}")
        return identity, self.trusted_keys[identity]

    # -- stages -------------------------------------------------------------------

    def advertise_keys(self, request: AdvertiseKeysRequest) -> AdvertiseKeysReply:
        """Start a round: check its parameters and answer with fresh public keys.

        Any round in progress is abandoned (its server moved on), so its
        shares can never be released. A round larger than this node's limits
        is refused first, before any work.
        """
        if request.num_clients > self.max_nodes:
            raise ProtocolError(
                f"round of n={request.num_clients} clients exceeds this node's limit of "
                f"{self.max_nodes} (node config secagg-max-nodes)"
            )
        if request.degree > self.max_degree:
            raise ProtocolError(
                f"graph degree k={request.degree} exceeds this node's limit of "
                f"{self.max_degree} (node config secagg-max-degree)"
            )
        encoder_for(request)  # refuse an overflow-prone configuration up front
        if self.require_signed and not request.signed:
            raise ProtocolError("this client only takes part in signed rounds")
        if request.signed:
            if self.signing_key is None or not self.identity:
                raise ProtocolError("signed secagg needs this client's identity and signing key")
            listed = request.identities[request.client_id - 1]
            if listed != self.identity:
                raise ProtocolError(
                    f"server lists identity {listed!r} for this client, which is {self.identity!r}"
                )
        c_private, c_public = generate_keypair()
        s_private, s_public = generate_keypair()
        signature = b""
        if request.signed:
            assert self.signing_key is not None
            signature = sign_keys(
                self.signing_key,
                session=request.session,
                server_round=request.round,
                client_id=request.client_id,
                identity=self.identity,
                c_public=c_public,
                s_public=s_public,
                parameters=request.parameters_digest(),
            )
        self._reset()
        self.setup = request
        self._c_private, self._s_private = _raw_private(c_private), _raw_private(s_private)
        self._own_public = (c_public, s_public)
        self.stage = ClientStage.KEYS_ADVERTISED
        return AdvertiseKeysReply(c_public=c_public, s_public=s_public, signature=signature)

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Share ``b`` and the mask key ``t``-of-``k`` among the neighbours that advertised."""
        setup = self._expect(request, ClientStage.KEYS_ADVERTISED)
        me, t = setup.client_id, setup.threshold
        if len(request.peers) > setup.degree:  # before any per-peer work
            raise ProtocolError(
                f"share-keys request lists {len(request.peers)} peers; "
                f"the degree is k={setup.degree}"
            )
        peers = {p.client_id: p for p in request.peers}
        strangers = set(peers) - self.neighbours
        if strangers:
            raise ProtocolError(f"share-keys request lists non-neighbours {_few(strangers)}")
        if len(peers) < t:
            raise ProtocolError(
                f"only {len(peers)} neighbours advertised keys; the threshold is t={t}"
            )
        keys = [k for p in peers.values() for k in (p.c_public, p.s_public)]
        keys += list(self._own_public)
        if len(set(keys)) != len(keys):
            raise ProtocolError("share-keys request repeats a public key")
        if setup.signed:
            for peer in peers.values():
                identity, trusted = self._trusted(peer.client_id)
                verify_keys(
                    trusted,
                    peer.signature,
                    session=setup.session,
                    server_round=setup.round,
                    client_id=peer.client_id,
                    identity=identity,
                    c_public=peer.c_public,
                    s_public=peer.s_public,
                    parameters=setup.parameters_digest(),
                )
        c_private = X25519PrivateKey.from_private_bytes(self._c_private)
        s_private = X25519PrivateKey.from_private_bytes(self._s_private)
        share_keys: dict[int, bytes] = {}
        mask_seeds: dict[int, bytes] = {}
        for peer in peers.values():
            try:  # a low-order point is refused now, not when masking
                mask_seeds[peer.client_id] = derive_key(
                    s_private,
                    peer.s_public,
                    session=setup.session,
                    round=setup.round,
                    purpose="mask",
                )
                share_keys[peer.client_id] = derive_key(
                    c_private,
                    peer.c_public,
                    session=setup.session,
                    round=setup.round,
                    purpose="shares",
                )
            except ValueError as err:
                raise ProtocolError(f"keys of client {peer.client_id}: {err}") from None
        seed = os.urandom(32)
        holders = sorted(peers)
        seed_shares = shamir.split(seed, t, points=holders)
        key_shares = shamir.split(self._s_private, t, points=holders)
        ciphertexts: dict[int, bytes] = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            ciphertexts[holder] = encrypt_share(
                share_keys[holder],
                seed_share.to_bytes() + key_share.to_bytes(),
                sender=me,
                receiver=holder,
                session=setup.session,
                round=setup.round,
            )
        self._seed, self._peers, self._mask_seeds = seed, peers, mask_seeds
        self.stage = ClientStage.SHARES_SENT
        return ShareKeysReply(ciphertexts)

    def receive_shares(self, request: MaskedInputRequest) -> None:
        """Decrypt and keep the share pairs the neighbours addressed to this client.

        A ciphertext that fails authentication (garbage, tampered, replayed from
        another round or session, or addressed between other clients) or whose
        plaintext is not a share pair at this client's point is *ignored*: this
        client keeps no share of its sender, and at :meth:`unmask` returns none
        (:attr:`unheld` names them). Refusing the whole request instead would
        let one client that sends garbage shares (which the server cannot see
        through the encryption) make all its neighbours drop out and stop the
        round. The sender is still masked with (:meth:`mask`): pairwise masks
        come from key agreement on the advertised keys (Bonawitz et al. 2017,
        Fig. 4; Bell et al. 2020, Sect. 3), shares only serve reconstruction,
        so the mask graph stays what the server relayed and only the sender's
        own unmasking needs ``t`` other holders.

        Raises
        ------
        ProtocolError
            A sender is not a neighbour that advertised keys, or fewer than
            ``t`` neighbours shared (structural faults of the server's request).
        """
        setup = self._expect(request, ClientStage.SHARES_SENT)
        me, t = setup.client_id, setup.threshold
        unknown = set(request.ciphertexts) - set(self._peers)
        if unknown:
            raise ProtocolError(f"masked-input request holds shares from non-peers {_few(unknown)}")
        if len(request.ciphertexts) < t:
            raise ProtocolError(
                f"only {len(request.ciphertexts)} neighbours shared keys; the threshold is t={t}"
            )
        c_private = X25519PrivateKey.from_private_bytes(self._c_private)
        shares: dict[int, bytes] = {}
        unheld: dict[int, str] = {}
        for sender, ciphertext in request.ciphertexts.items():
            key = derive_key(
                c_private,
                self._peers[sender].c_public,
                session=setup.session,
                round=setup.round,
                purpose="shares",
            )
            try:
                plain = decrypt_share(
                    key,
                    ciphertext,
                    sender=sender,
                    receiver=me,
                    session=setup.session,
                    round=setup.round,
                )
            except ValueError as err:
                unheld[sender] = str(err)
                continue
            try:
                points = [
                    shamir.Share.from_bytes(h).x for h in (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
                ]
            except ValueError:
                points = []
            if len(plain) != 2 * SHARE_BYTES or points != [me, me]:
                unheld[sender] = "share pair is malformed"
                continue
            shares[sender] = plain
        if unheld:  # one line per request, whatever the number of bad senders
            first = min(unheld)
            logger.warning(
                "secagg round %d: ignoring the shares of clients %s (client %d: %s); "
                "still masking with them",
                setup.round,
                _few(unheld),
                first,
                unheld[first],
            )
        self._shares = shares
        self._masked_with = tuple(sorted(request.ciphertexts))
        self._unheld = tuple(sorted(unheld))
        self.stage = ClientStage.SHARES_RECEIVED

    @property
    def unheld(self) -> frozenset[int]:
        """Neighbours masked with this round whose share pair this client could not use.

        :meth:`unmask` returns no share of them; only their own reconstruction
        depends on the other ``t`` holders.
        """
        return frozenset(self._unheld)

    def mask(
        self, update: torch.Tensor, weight: float = 1.0, *, malicious: bool = False
    ) -> MaskedInputReply:
        """Encode ``[weight * clip(update), weight * clip]`` and add the masks.

        With the round's ``norm_bound`` the update is first scaled to at most
        that L2 norm; with its ``noise_variance`` Skellam noise (distributed DP,
        :mod:`fedsec.privacy.distributed`) is added to the encoded update (not
        to the weight coordinate, which the server must read exactly).

        Parameters
        ----------
        update : torch.Tensor
            Float ``[dim]``; clipped coordinate-wise to ``[-clip, clip]``.
        weight : float, default 1.0
            In ``(0, 1]``; the server divides the weighted sum by the summed
            weights (e.g. example counts over a public cap).
        malicious : bool, default False
            Play a simulated attacker: skip the norm bound and the noise (the
            encoding's coordinate range still applies, as it does to any
            input that must not wrap the sum).
        """
        import torch

        from fedsec.privacy.client_level import clip_update

        setup = self._setup()
        if self.stage is not ClientStage.SHARES_RECEIVED:
            raise ProtocolError(f"cannot mask at stage {self.stage.value}")
        if tuple(update.shape) != (setup.dim,) or not update.is_floating_point():
            raise ProtocolError(
                f"update must be a float vector of {setup.dim}, got {tuple(update.shape)}"
            )
        if not 0.0 < weight <= 1.0:
            raise ProtocolError(f"weight must be in (0, 1], got {weight}")
        encoder = encoder_for(setup)
        encoded = np.empty(setup.dim + 1, dtype=encoder.dtype)
        noise = None
        if setup.noise_variance > 0 and not malicious:
            noise = sample_skellam(setup.noise_variance, setup.dim, headroom=setup.headroom)
        try:
            if setup.norm_bound > 0 and not malicious:
                update = clip_update(update, setup.norm_bound)
            encoder.encode(update, weight=weight, out=encoded[:-1], noise=noise)
        except ValueError as err:
            raise ProtocolError(f"cannot encode the update: {err}") from None
        # The weight rides along as one more coordinate, w * clip in [0, clip].
        encoder.encode(
            torch.tensor([setup.clip], dtype=torch.float64), weight=weight, out=encoded[-1:]
        )
        # Every neighbour that shared, including those whose shares were unusable:
        # the sender masks with this client too, so the masks must match pairwise.
        pairwise = [(peer, self._mask_seeds[peer]) for peer in self._masked_with]
        masked = apply_masks(encoded, self._seed, pairwise, setup.client_id, in_place=True)
        self.stage = ClientStage.MASKED_SENT
        return MaskedInputReply(masked)

    def consistency_check(self, request: ConsistencyCheckRequest) -> ConsistencyCheckReply:
        """Signed mode: sign the survivor set the server claims."""
        setup = self._expect(request, ClientStage.MASKED_SENT)
        if not setup.signed or self.signing_key is None:
            raise ProtocolError("consistency check requested in an unsigned round")
        self._check_survivors(setup, request.survivors)
        self._survivors = tuple(sorted(request.survivors))
        self.stage = ClientStage.CHECKED
        signature = sign_survivors(
            self.signing_key,
            session=setup.session,
            server_round=setup.round,
            survivors=self._survivors,
        )
        return ConsistencyCheckReply(signature)

    def _check_survivors(self, setup: AdvertiseKeysRequest, survivors: tuple[int, ...]) -> None:
        if setup.client_id not in survivors:
            raise ProtocolError("survivor set omits this client, which sent its masked input")
        if any(not 1 <= v <= setup.num_clients for v in survivors):
            raise ProtocolError("survivor set holds ids outside the round")
        if len(survivors) < setup.threshold:
            raise ProtocolError(
                f"only {len(survivors)} survivors; the threshold is t={setup.threshold}"
            )
        least = max(setup.min_survivors, self.min_sum)
        if len(survivors) < least:
            raise ProtocolError(
                f"only {len(survivors)} survivors; this client unmasks no sum of fewer than {least}"
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Release one share per neighbour: its seed share if it survived, else its key share.

        Answered once per round; in signed mode only for the survivor set this
        client signed, backed by at least ``t`` valid signatures on it. A
        neighbour in :attr:`unheld` gets no share at all: the omission is the
        report, and never one kind of share more.
        """
        setup = self._expect(
            request,
            ClientStage.CHECKED if self._setup().signed else ClientStage.MASKED_SENT,
        )
        survivors = tuple(sorted(request.survivors))
        self._check_survivors(setup, survivors)
        if setup.signed:
            if survivors != self._survivors:
                raise ProtocolError("unmask survivor set differs from the one this client signed")
            if not set(request.signatures) <= set(survivors):
                raise ProtocolError("unmask request holds signatures from non-survivors")
            # Only neighbours' signatures count (not this client's own): a server that
            # splits the survivor set then needs t > (k + c) / 2 of them in both halves.
            counted = set(request.signatures) & self.neighbours
            if len(counted) < setup.threshold:
                raise ProtocolError(
                    f"only {len(counted)} surviving neighbours signed; need t={setup.threshold}"
                )
            # Verify only the signatures that count: the work stays O(k), whatever
            # else the request carries.
            for signer in sorted(counted):
                signature = request.signatures[signer]
                identity, trusted = self._trusted(signer)
                verify_survivors(
                    trusted,
                    signature,
                    session=setup.session,
                    server_round=setup.round,
                    survivors=survivors,
                    signer=f"survivor set of client {signer} ({identity})",
                )
        alive = set(survivors)
        seed_shares = {v: p[:SHARE_BYTES] for v, p in self._shares.items() if v in alive}
        key_shares = {v: p[SHARE_BYTES:] for v, p in self._shares.items() if v not in alive}
        self.stage = ClientStage.DONE
        self._shares = {}
        return UnmaskReply(seed_shares=seed_shares, key_shares=key_shares)

    # -- persistence between messages -------------------------------------------------

    def to_state(self) -> Record:
        """The round state as a flat record (secrets included: keep it on the client)."""
        if self.setup is None:
            return {"stage": self.stage.value}
        setup = {f"setup.{k}": v for k, v in self.setup.to_record().items()}
        peers = sorted(self._peers.values(), key=lambda p: p.client_id)
        return {
            "stage": self.stage.value,
            **setup,
            "c_private": self._c_private,
            "s_private": self._s_private,
            "own_public": list(self._own_public),
            "seed": self._seed,
            "peer_ids": [p.client_id for p in peers],
            "peer_c_public": [p.c_public for p in peers],
            "peer_s_public": [p.s_public for p in peers],
            "mask_seeds": [
                self._mask_seeds[p.client_id] for p in peers if p.client_id in self._mask_seeds
            ],
            "share_ids": list(self._shares),
            "masked_with": list(self._masked_with),
            "unheld": list(self._unheld),
            "shares": list(self._shares.values()),
            "survivors": list(self._survivors),
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        *,
        identity: str = "",
        signing_key: Ed25519PrivateKey | None = None,
        trusted_keys: Mapping[str, bytes] | None = None,
        require_signed: bool = False,
        min_sum: int = 2,
        max_nodes: int = DEFAULT_MAX_NODES,
        max_degree: int = DEFAULT_MAX_DEGREE,
    ) -> SecAggClient:
        """Rebuild a client from :meth:`to_state` output."""
        client = cls(
            identity=identity,
            signing_key=signing_key,
            trusted_keys=trusted_keys,
            require_signed=require_signed,
            min_sum=min_sum,
            max_nodes=max_nodes,
            max_degree=max_degree,
        )
        client.stage = ClientStage(state.get("stage", ClientStage.IDLE.value))
        if "setup.session" not in state:
            return client
        setup = {k[len("setup.") :]: v for k, v in state.items() if k.startswith("setup.")}
        client.setup = AdvertiseKeysRequest.from_record(setup)
        client._c_private = bytes(state["c_private"])
        client._s_private = bytes(state["s_private"])
        client._own_public = tuple(state["own_public"])
        client._seed = bytes(state["seed"])
        client._peers = {
            i: PeerKeys(i, c, s)
            for i, c, s in zip(
                state["peer_ids"], state["peer_c_public"], state["peer_s_public"], strict=True
            )
        }
        seeds = list(state["mask_seeds"])
        if seeds:
            client._mask_seeds = dict(zip(sorted(client._peers), seeds, strict=True))
        client._shares = dict(zip(state["share_ids"], state["shares"], strict=True))
        # A state saved before these keys existed held a share of every sender.
        client._masked_with = tuple(state.get("masked_with", sorted(client._shares)))
        client._unheld = tuple(state.get("unheld", ()))
        client._survivors = tuple(state["survivors"])
        return client
