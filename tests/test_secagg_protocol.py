"""Whole SecAgg+ rounds: client and server state machines and their messages.

A small in-process driver (:class:`Round`) runs one round between a
:class:`SecAggServer` and clients ``1..n`` with seeded inputs, optional
dropouts at each stage, and hooks that inspect or rewrite messages in transit.
The protocol's own randomness (keys, seeds, shares, rounding coins) comes from
the OS CSPRNG and cannot be seeded, so every assertion holds with overwhelming
probability for any draw of it, except the two chi-square uniformity checks, which
a truly uniform mask fails with probability 1e-4 each (see ``CHI2_255_BOUND``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from fedsec.privacy.client_level import clip_update
from fedsec.privacy.distributed import plan_skellam
from fedsec.secagg.client import ClientStage, SecAggClient
from fedsec.secagg.graph import bucket_parameters
from fedsec.secagg.keys import generate_keypair
from fedsec.secagg.messages import (
    STAGES,
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ProtocolError,
    ShareKeysReply,
    UnmaskReply,
    UnmaskRequest,
    request_from_record,
)
from fedsec.secagg.server import SecAggAbortedError, SecAggParams, SecAggResult, SecAggServer
from fedsec.secagg.signing import generate_signing_key

CLIP = 1.0
SESSION = bytes(range(32))
OTHER_SESSION = bytes(range(1, 33))
Hook = Callable[[dict[int, Any]], dict[int, Any]]
RECORD_SCALARS = (int, float, bool, bytes, str)


class _StopRoundError(Exception):
    """Ends :meth:`Round.run` early at the point named by ``stop``."""


def _same(batch: dict[int, Any]) -> dict[int, Any]:
    return batch


def _is_record(record: Mapping[str, Any]) -> bool:
    """Whether every value is what a Flower ConfigRecord holds (scalars or flat lists)."""
    return all(
        isinstance(v, RECORD_SCALARS)
        or (isinstance(v, list) and all(isinstance(x, RECORD_SCALARS) for x in v))
        for v in record.values()
    )


class Round:
    """One in-process SecAgg+ round: a server, clients ``1..n`` and their seeded inputs.

    :meth:`run` drives every stage. ``drop[stage]`` names clients that get the
    stage's request but never reply; ``tamper["<stage>:request"]`` and
    ``tamper["<stage>:reply"]`` see (and may rewrite) each batch in transit;
    ``stop`` ends the run right after that point. Every delivered batch is kept
    in ``log`` under the same keys. With ``persist``, each client is serialised
    with ``to_state`` and rebuilt with ``from_state`` before every call.
    """

    def __init__(
        self,
        n: int,
        d: int,
        *,
        signed: bool = False,
        seed: int = 0,
        uniform: bool = False,
        scale: float = 1.5,
        persist: bool = False,
        server_round: int = 3,
        session: bytes | None = None,
        clients: dict[int, SecAggClient] | None = None,
        bucket: bool = False,
        **param_kw: Any,
    ) -> None:
        ids = range(1, n + 1)
        make = SecAggParams.for_bucket if bucket else SecAggParams.for_round
        self.params = make(n, d, clip=CLIP, signed=signed, **param_kw)
        self.creds: dict[int, dict[str, Any]] = {i: {} for i in ids}
        identities: list[str] = []
        if signed:
            keys = {i: generate_signing_key() for i in ids}
            trusted = {f"client-{i}": public for i, (_, public) in keys.items()}
            identities = list(trusted)
            self.creds = {
                i: {"identity": f"client-{i}", "signing_key": keys[i][0], "trusted_keys": trusted}
                for i in ids
            }
        self.server = SecAggServer(
            self.params, server_round=server_round, session=session, identities=identities
        )
        self.clients = (
            clients if clients is not None else {i: SecAggClient(**self.creds[i]) for i in ids}
        )
        gen = torch.Generator().manual_seed(seed)
        self.inputs = {i: torch.randn(d, generator=gen) * scale for i in ids}
        self.weights = {
            i: 1.0 if uniform else 0.1 + 0.9 * float(torch.rand((), generator=gen)) for i in ids
        }
        self.persist = persist
        self.rebuilt = 0
        self.log: dict[str, dict[int, Any]] = {}

    def client(self, i: int) -> SecAggClient:
        """Client ``i``; with ``persist``, first rebuilt from its serialised state."""
        if self.persist:
            state = self.clients[i].to_state()
            assert _is_record(state), state
            stored = {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
            rebuilt = SecAggClient.from_state(stored, **self.creds[i])
            assert rebuilt.to_state() == state  # nothing lost on the way
            self.clients[i] = rebuilt
            self.rebuilt += 1
        return self.clients[i]

    def _mask(self, i: int, request: MaskedInputRequest) -> MaskedInputReply:
        self.client(i).receive_shares(request)
        return self.client(i).mask(self.inputs[i], self.weights[i])

    def run(
        self,
        *,
        drop: Mapping[str, Iterable[int]] | None = None,
        tamper: Mapping[str, Hook] | None = None,
        stop: str | None = None,
    ) -> SecAggResult | None:
        """Run the round; the result, or ``None`` when stopped at ``stop``."""
        gone = {stage: set(ids) for stage, ids in (drop or {}).items()}
        hooks = dict(tamper or {})
        srv = self.server

        def exchange(
            stage: str, requests: Mapping[int, Any], answer: Callable[[int, Any], Any]
        ) -> dict[int, Any]:
            point = f"{stage}:request"
            batch = hooks.get(point, _same)(dict(requests))
            self.log[point] = batch
            if stop == point:
                raise _StopRoundError
            replies = {i: answer(i, r) for i, r in batch.items() if i not in gone.get(stage, ())}
            point = f"{stage}:reply"
            replies = hooks.get(point, _same)(replies)
            self.log[point] = replies
            if stop == point:
                raise _StopRoundError
            return replies

        try:
            rep = exchange(
                "advertise-keys",
                srv.advertise_keys(),
                lambda i, r: self.client(i).advertise_keys(r),
            )
            rep = exchange(
                "share-keys", srv.share_keys(rep), lambda i, r: self.client(i).share_keys(r)
            )
            rep = exchange("masked-input", srv.masked_input(rep), self._mask)
            if self.params.signed:
                rep = exchange(
                    "consistency-check",
                    srv.consistency_check(rep),
                    lambda i, r: self.client(i).consistency_check(r),
                )
            rep = exchange("unmask", srv.unmask(rep), lambda i, r: self.client(i).unmask(r))
        except _StopRoundError:
            return None
        return srv.finish(rep)

    def expected(self, contributors: Iterable[int]) -> torch.Tensor:
        """The plaintext weighted mean of the clipped inputs, in float64."""
        ids = list(contributors)
        total = sum(self.weights[i] * self.inputs[i].double().clamp(-CLIP, CLIP) for i in ids)
        return total / sum(self.weights[i] for i in ids)


def assert_correct(rnd: Round, res: SecAggResult | None) -> None:
    """The round's mean matches the plaintext one over its contributors, within the bound."""
    assert res is not None
    d = rnd.params.dim
    assert res.aggregate.dtype == torch.float32 and res.aggregate.shape == (d,)
    err = (res.aggregate.double() - rnd.expected(res.contributors)).abs().max().item()
    assert err <= res.error_bound, (err, res.error_bound)
    assert 0 < res.error_bound < 1e-5  # a bound this tight makes the comparison meaningful
    weight = sum(rnd.weights[i] for i in res.contributors)
    step = rnd.params.encoder.quantisation_bound(len(res.contributors)) / CLIP
    # Plus a few float64 ulps: with a 64-bit ring one step is itself near an ulp.
    assert abs(res.total_weight - weight) <= step + 8 * weight * 2.0**-52


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


# -- 1. correctness ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "d", "seed"),
    [
        (3, 50, 0),
        (3, 300, 1),
        (5, 200, 2),
        (5, 1000, 3),
        (10, 64, 4),
        (10, 500, 5),
        (24, 100, 6),
        (24, 1000, 7),
    ],
)
def test_round_gives_weighted_mean_of_clipped_inputs(n: int, d: int, seed: int) -> None:
    # n=3 cannot meet the default 10% dropout + 5% corruption rule, so fix k=2.
    rnd = Round(n, d, seed=seed, **({"degree": 2} if n == 3 else {}))
    res = rnd.run()
    assert res is not None
    assert res.contributors == tuple(range(1, n + 1)) and res.dropped == {}
    assert_correct(rnd, res)
    # The weights matter: the plain mean is far outside the bound.
    plain = torch.stack([x.double().clamp(-CLIP, CLIP) for x in rnd.inputs.values()]).mean(0)
    assert (rnd.expected(res.contributors) - plain).abs().max() > 100 * res.error_bound


def test_round_in_64_bit_ring() -> None:
    rnd = Round(10, 300, seed=8, modulus_bits=64)
    assert rnd.params.bits == 53
    res = rnd.run()
    assert all(r.masked.dtype == np.uint64 for r in rnd.log["masked-input:reply"].values())
    assert_correct(rnd, res)


def test_uniform_weights_give_the_plain_mean() -> None:
    rnd = Round(5, 200, seed=9, uniform=True)
    res = rnd.run()
    assert res is not None
    plain = torch.stack([x.double().clamp(-CLIP, CLIP) for x in rnd.inputs.values()]).mean(0)
    assert (res.aggregate.double() - plain).abs().max() <= res.error_bound
    assert res.total_weight == pytest.approx(5.0, abs=1e-6)
    assert_correct(rnd, res)


def test_inputs_beyond_clip_are_clipped() -> None:
    rnd = Round(5, 6, uniform=True)
    inf = float("inf")
    for i in rnd.inputs:
        rnd.inputs[i] = torch.tensor([inf, -inf, 5.0 * i, -5.0 * i, 0.25, 3.0 if i % 2 else -0.5])
    res = rnd.run()
    assert res is not None
    # Clients 1, 3, 5 clip 3.0 to 1.0; clients 2, 4 send -0.5: (3 - 1) / 5 = 0.4.
    want = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.25, 0.4], dtype=torch.float64)
    assert (res.aggregate.double() - want).abs().max() <= res.error_bound


# -- 2. dropouts within tolerance --------------------------------------------------------


@pytest.mark.parametrize("stage", ["advertise-keys", "share-keys", "masked-input", "unmask"])
def test_dropouts_up_to_tolerance_at_one_stage(stage: str) -> None:
    # Complete graph on 10: k=9, t=5, so losing 4 clients leaves every client t live peers.
    rnd = Round(10, 120, seed=10)
    assert (rnd.params.degree, rnd.params.threshold) == (9, 5)
    gone = {2, 5, 7, 10}
    res = rnd.run(drop={stage: gone})
    assert res is not None
    sent_masked = set(range(1, 11)) - (set() if stage == "unmask" else gone)
    assert set(res.contributors) == sent_masked == set(rnd.log["masked-input:reply"])
    assert set(res.dropped) == gone
    assert all("no reply" in reason for reason in res.dropped.values())
    assert_correct(rnd, res)


def test_dropouts_at_every_stage_together() -> None:
    rnd = Round(10, 90, seed=11)
    plan = {"advertise-keys": {1}, "share-keys": {4}, "masked-input": {6}, "unmask": {9}}
    res = rnd.run(drop=plan)
    assert res is not None
    assert res.contributors == (2, 3, 5, 7, 8, 9, 10)
    assert set(res.dropped) == {1, 4, 6, 9}
    assert_correct(rnd, res)


def test_dropouts_on_a_sparse_graph() -> None:
    # k=8, t=5: any 3 dropouts leave every client >= t live neighbours.
    rnd = Round(24, 60, seed=12, degree=8)
    assert (rnd.params.degree, rnd.params.threshold) == (8, 5)
    res = rnd.run(drop={"advertise-keys": {3}, "masked-input": {11}, "unmask": {20}})
    assert res is not None
    assert all(len(r.peers) <= 8 for r in rnd.log["share-keys:request"].values())
    assert set(res.contributors) == set(range(1, 25)) - {3, 11}
    assert set(res.dropped) == {3, 11, 20}
    assert_correct(rnd, res)


@pytest.mark.parametrize("signed", [False, True])
def test_dropped_reason_names_the_stage_the_client_missed(signed: bool) -> None:
    rnd = Round(10, 40, signed=signed, seed=13)
    # Four clients gone (k=9, t=5). Signed mode needs t=6 against a server splitting
    # the survivor set, so it tolerates three: it trades two for a check dropout.
    plan = {"advertise-keys": {1}, "share-keys": {4}, "masked-input": {6}, "unmask": {9}}
    if signed:
        del plan["advertise-keys"], plan["share-keys"]
        plan["consistency-check"] = {7}
    res = rnd.run(drop=plan)
    assert res is not None
    assert set(res.dropped) == set().union(*plan.values())
    for stage, ids in plan.items():
        for i in ids:
            assert res.dropped[i] == f"{stage}: no reply", (i, res.dropped[i])
    assert_correct(rnd, res)


# -- 3. beyond tolerance the round aborts ------------------------------------------------


@pytest.mark.parametrize(
    ("signed", "stage", "gone", "what"),
    [
        (False, "advertise-keys", {1, 2, 3}, "only 2 clients advertised keys"),
        # 3 clients share, but each holder gets 2 < t share pairs.
        (False, "share-keys", {1, 2}, "only 0 clients received enough shares to mask"),
        (False, "masked-input", {3, 4, 5}, "only 2 clients sent masked inputs"),
        (True, "consistency-check", {1, 4, 5}, "only 2 clients signed the survivor set"),
    ],
)
def test_round_aborts_beyond_tolerance(signed: bool, stage: str, gone: set[int], what: str) -> None:
    rnd = Round(5, 30, signed=signed)  # k=4, t=3
    assert rnd.params.threshold == 3
    with pytest.raises(SecAggAbortedError) as info:
        rnd.run(drop={stage: gone})
    msg = str(info.value)
    assert "\n" not in msg and what in msg and msg.endswith("the threshold is t=3"), msg
    # The server is finished with this round: no later stage runs.
    with pytest.raises(RuntimeError, match="at stage aborted"):
        rnd.server.finish({})


@pytest.mark.parametrize(
    "plan",
    [
        {"unmask": {1, 2, 3, 4, 5, 6}},  # 4 holders answer; every seed needs t=5
        {"masked-input": {1, 2, 3}, "unmask": {4, 5, 6}},
    ],
)
def test_round_aborts_when_too_few_unmask_replies(plan: dict[str, set[int]]) -> None:
    rnd = Round(10, 30, seed=14)
    with pytest.raises(SecAggAbortedError) as info:
        rnd.run(drop=plan)
    msg = str(info.value)
    assert "\n" not in msg and "self-mask seed; need t=5" in msg, msg
    with pytest.raises(RuntimeError, match="at stage done"):
        rnd.server.finish({})


# -- 4. never both shares of one client -------------------------------------------------


def test_unmask_reply_holds_exactly_one_share_per_peer() -> None:
    rnd = Round(10, 40, seed=15)
    res = rnd.run(drop={"share-keys": {2}, "masked-input": {3, 8}})
    assert res is not None
    survivors = set(res.contributors)
    assert survivors == set(range(1, 11)) - {2, 3, 8}
    for holder, reply in rnd.log["unmask:reply"].items():
        senders = set(rnd.log["masked-input:request"][holder].ciphertexts)
        assert not set(reply.seed_shares) & set(reply.key_shares)
        assert set(reply.seed_shares) == senders & survivors
        assert set(reply.key_shares) == senders - survivors == {3, 8}
    assert_correct(rnd, res)


def test_client_answers_unmask_once_and_only_as_a_survivor() -> None:
    rnd = Round(5, 30, seed=16)

    def probe(requests: dict[int, Any]) -> dict[int, Any]:
        req = requests[1]
        others = tuple(v for v in req.survivors if v != 1)
        with pytest.raises(ProtocolError, match="omits this client"):
            rnd.clients[1].unmask(dataclasses.replace(req, survivors=others))
        assert rnd.clients[1].stage is ClientStage.MASKED_SENT  # refused, nothing released
        return requests

    res = rnd.run(tamper={"unmask:request": probe})
    assert_correct(rnd, res)
    for i, req in rnd.log["unmask:request"].items():
        # Neither a replay nor a second request that calls client 1 dropped (to collect
        # its mask-key share after its seed share) gets an answer.
        claim = dataclasses.replace(req, survivors=tuple(v for v in req.survivors if v != 1))
        for again in (req, claim) if i != 1 else (req,):
            with pytest.raises(ProtocolError, match="client is at stage done"):
                rnd.clients[i].unmask(again)


def test_unmask_reply_with_both_shares_for_a_peer_is_invalid() -> None:
    share = bytes(52)
    with pytest.raises(ProtocolError, match=r"both kinds of share for clients \[2\]"):
        UnmaskReply(seed_shares={2: share, 3: share}, key_shares={2: share})
    record = {"seed_ids": [2], "seed_shares": [share], "key_ids": [2], "key_shares": [share]}
    with pytest.raises(ProtocolError, match="both kinds of share"):
        UnmaskReply.from_record(record)


# -- 5. what the server sees before unmasking ----------------------------------------------


def chi2_quantile(dof: int, z: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard normal quantile z."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


# 1 - 1e-9 quantile of chi2(255): z = 5.997807 gives about 415 (scipy's chi2.ppf: 414.9).
# The mask is a crypto PRG keyed from os.urandom, so the statistic is random: a uniform
# vector fails this bound with probability 1e-9 per check (no flaky CI), while a
# missing or broken mask exceeds it by orders of magnitude (checked below).
CHI2_255_BOUND = chi2_quantile(255, 5.997807)


def top_byte_chi2(values: np.ndarray) -> float:
    """Chi-square statistic of the top 8 bits of uint32 values against 256 equal bins."""
    counts = np.bincount((values >> np.uint32(24)).astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2).sum() / expected)


def test_masked_vectors_look_uniform_whatever_the_input() -> None:
    d = 200_000
    rnd = Round(3, d, uniform=True, degree=2)
    rnd.inputs[1] = torch.zeros(d)  # A: every coordinate encodes to about 2**29
    rnd.inputs[2] = torch.full((d,), CLIP)  # B: every coordinate encodes to 2**30 - 1
    res = rnd.run()
    assert 413.0 < CHI2_255_BOUND < 417.0
    masked = rnd.log["masked-input:reply"]
    y_a, y_b = masked[1].masked[:-1], masked[2].masked[:-1]
    for y in (y_a, y_b):
        assert y.dtype == np.uint32 and y.shape == (d,)
        assert top_byte_chi2(y) < CHI2_255_BOUND
    # The check has power: the unmasked encoding of A fails it by orders of magnitude.
    assert top_byte_chi2(rnd.params.encoder.encode(torch.zeros(d))) > 1000 * CHI2_255_BOUND
    a, b = y_a.astype(np.float64), y_b.astype(np.float64)
    se = math.sqrt(a.var() / d + b.var() / d)
    assert abs(a.mean() - b.mean()) < 5 * se
    # Unmasked, A and B differ in mean by about 2**29, over a hundred standard errors.
    plain_a = rnd.params.encoder.encode(torch.zeros(d)).astype(np.float64)
    plain_b = rnd.params.encoder.encode(torch.full((d,), CLIP)).astype(np.float64)
    assert abs(plain_a.mean() - plain_b.mean()) > 100 * se
    assert_correct(rnd, res)


def test_server_view_without_unmasking_reveals_nothing() -> None:
    n, d = 5, 20_000
    rnd = Round(n, d, seed=17, uniform=True, scale=0.5)
    res = rnd.run()
    assert res is not None
    encoder = rnd.params.encoder
    step = 2 * CLIP / encoder.levels

    def naive(vector: np.ndarray, count: int) -> np.ndarray:
        """Decode as if unmasked: what the server gets from masked data alone."""
        return vector[:-1].astype(np.float64) * step - count * CLIP

    truths = {i: x.double().clamp(-CLIP, CLIP).numpy() for i, x in rnd.inputs.items()}
    total = np.zeros(d + 1, dtype=np.uint32)
    # Under independence the sample correlation has sd 1/sqrt(d) = 0.007: 0.05 is 7 sd.
    for i, reply in rnd.log["masked-input:reply"].items():
        guess = naive(reply.masked, 1)
        assert abs(np.corrcoef(guess, truths[i])[0, 1]) < 0.05
        assert np.abs(guess - truths[i]).mean() > 1e3 * encoder.quantisation_bound(1)
        np.add(total, reply.masked, out=total)
    true_sum = sum(truths.values())
    guess = naive(total, n)
    assert abs(np.corrcoef(guess, true_sum)[0, 1]) < 0.05
    assert np.abs(guess - true_sum).mean() > 1e3 * encoder.quantisation_bound(n)
    # The same view plus the unmask replies does give the sum.
    assert np.corrcoef(res.aggregate.double().numpy(), true_sum)[0, 1] > 0.999
    assert_correct(rnd, res)


# -- 6. tampering and replay ----------------------------------------------------------------


def _copy(rnd: Round, holder: int) -> SecAggClient:
    """An independent copy of ``rnd``'s client ``holder`` (probing leaves it untouched)."""
    return SecAggClient.from_state(rnd.clients[holder].to_state(), **rnd.creds[holder])


def test_tampered_share_ciphertext_is_ignored_not_refused() -> None:
    # Issue 16 case 3: a bad ciphertext costs only its sender's share, never the request.
    rnd = Round(5, 30, seed=18)

    def probe(requests: dict[int, Any]) -> dict[int, Any]:
        for holder, req in requests.items():
            sender = min(req.ciphertexts)
            for at in (0, 60, -1):  # nonce, body, tag
                bad = {**req.ciphertexts, sender: _flip(req.ciphertexts[sender], at)}
                client = _copy(rnd, holder)
                client.receive_shares(dataclasses.replace(req, ciphertexts=bad))
                assert client.stage is ClientStage.SHARES_RECEIVED
                assert client.unheld == {sender}
        return requests

    # The genuine request is still taken by each (untouched) client.
    assert_correct(rnd, rnd.run(tamper={"masked-input:request": probe}))


def _replay_probe(rnd: Round, old: Mapping[int, MaskedInputRequest]) -> Hook:
    def probe(requests: dict[int, Any]) -> dict[int, Any]:
        for holder, req in requests.items():
            client = rnd.clients[holder]
            with pytest.raises(ProtocolError, match="another session or round"):
                client.receive_shares(old[holder])  # the whole stale request
            assert client.stage is ClientStage.SHARES_SENT
            sender = min(req.ciphertexts)
            stale = {**req.ciphertexts, sender: old[holder].ciphertexts[sender]}
            copy = _copy(rnd, holder)
            copy.receive_shares(dataclasses.replace(req, ciphertexts=stale))
            assert copy.unheld == {sender}  # a replayed share is never kept
        return requests

    return probe


def test_share_ciphertext_from_another_round_or_session_is_rejected() -> None:
    first = Round(5, 30, seed=19, server_round=1, session=SESSION)
    assert_correct(first, first.run())
    old = first.log["masked-input:request"]
    for server_round, session in ((2, SESSION), (1, OTHER_SESSION)):
        again = Round(
            5, 30, seed=20, server_round=server_round, session=session, clients=first.clients
        )
        assert_correct(again, again.run(tamper={"masked-input:request": _replay_probe(again, old)}))


def test_rejected_share_ciphertext_is_not_kept_or_released() -> None:
    rnd = Round(5, 30, seed=21)
    rnd.run(stop="masked-input:request")
    req = rnd.log["masked-input:request"][1]
    sender = min(req.ciphertexts)
    bad = {**req.ciphertexts, sender: _flip(req.ciphertexts[sender], 60)}
    client = rnd.clients[1]
    client.receive_shares(dataclasses.replace(req, ciphertexts=bad))
    assert client.unheld == {sender}
    client.mask(rnd.inputs[1], rnd.weights[1])
    for survivors in ((1, 2, 3, 4, 5), tuple(v for v in range(1, 6) if v != sender)):
        reply = _copy(rnd, 1).unmask(
            UnmaskRequest(session=req.session, round=req.round, survivors=survivors)
        )
        assert sender not in reply.seed_shares and sender not in reply.key_shares
        assert set(reply.seed_shares) | set(reply.key_shares) == set(req.ciphertexts) - {sender}


def test_low_order_relayed_key_raises_protocol_error() -> None:
    rnd = Round(5, 30, seed=22)
    rnd.run(stop="share-keys:request")
    req = rnd.log["share-keys:request"][1]
    peers = (dataclasses.replace(req.peers[0], c_public=bytes(32)), *req.peers[1:])
    with pytest.raises(ValueError) as info:
        rnd.clients[1].share_keys(dataclasses.replace(req, peers=peers))
    assert rnd.clients[1].stage is ClientStage.KEYS_ADVERTISED
    assert isinstance(info.value, ProtocolError), f"{type(info.value).__name__}: {info.value}"


def test_out_of_order_and_foreign_requests_are_refused() -> None:
    rnd = Round(5, 30, seed=23)
    rnd.run(stop="masked-input:request")
    share_req = rnd.log["share-keys:request"][1]
    masked_req = rnd.log["masked-input:request"][1]
    unmask_req = UnmaskRequest(
        session=masked_req.session, round=masked_req.round, survivors=(1, 2, 3, 4, 5)
    )
    with pytest.raises(ProtocolError, match="no round in progress"):
        SecAggClient().share_keys(share_req)
    client = rnd.clients[1]
    with pytest.raises(ProtocolError, match="client is at stage shares-sent"):
        client.share_keys(share_req)  # a stage twice
    with pytest.raises(ProtocolError, match="cannot mask at stage shares-sent"):
        client.mask(rnd.inputs[1])
    for foreign in (
        dataclasses.replace(masked_req, session=OTHER_SESSION),
        dataclasses.replace(masked_req, round=masked_req.round + 1),
    ):
        with pytest.raises(ProtocolError, match="another session or round"):
            client.receive_shares(foreign)
    assert client.stage is ClientStage.SHARES_SENT
    client.receive_shares(masked_req)
    with pytest.raises(ProtocolError, match="client is at stage shares-received"):
        client.unmask(unmask_req)  # unmask before mask
    for update, weight in ((torch.zeros(29), 1.0), (torch.zeros(30, dtype=torch.int64), 1.0)):
        with pytest.raises(ProtocolError, match="float vector of 30"):
            client.mask(update, weight)
    for weight in (0.0, 1.5, float("nan")):
        with pytest.raises(ProtocolError, match="weight must be in"):
            client.mask(rnd.inputs[1], weight)
    assert client.stage is ClientStage.SHARES_RECEIVED
    client.mask(rnd.inputs[1], 1.0)
    with pytest.raises(ProtocolError, match="unsigned round"):
        client.consistency_check(
            ConsistencyCheckRequest(
                session=masked_req.session, round=masked_req.round, survivors=(1, 2, 3)
            )
        )
    with pytest.raises(ProtocolError, match="cannot mask at stage masked-sent"):
        client.mask(rnd.inputs[1])


# -- 7. overflow and parameter checks --------------------------------------------------------


def test_overflowing_bit_depth_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError) as info:
        SecAggParams.for_round(10, 100, clip=1.0, bits=31)
    msg = str(info.value)
    for part in ("n=10", str(2**31 - 1), str(10 * (2**31 - 1)), "2^32", "bits <= 28"):
        assert part in msg, msg
    assert SecAggParams.for_round(10, 100, clip=1.0).bits == 28  # the largest that fits


def test_a_sum_of_one_is_refused_and_two_only_as_a_bucket() -> None:
    with pytest.raises(ValueError, match="at least 2 clients per sum, got 1"):
        SecAggParams(1, 1, 1, 1.0, 16, 32, 10)
    with pytest.raises(ValueError, match="n >= 3"):  # a plain round of 2 derives no graph
        SecAggParams.for_round(2, 10, clip=1.0)
    bucket = SecAggParams.for_bucket(2, 10, clip=1.0, min_survivors=2)
    assert (bucket.degree, bucket.threshold, bucket.unmask_minimum) == (1, 1, 2)
    req = SecAggServer(SecAggParams.for_round(4, 10, clip=1.0)).advertise_keys()[1]
    with pytest.raises(ProtocolError, match="needs 2 to 100000 clients, got n=1"):
        dataclasses.replace(req, num_clients=1, degree=1, threshold=1)


def test_client_refuses_overflowing_round_parameters() -> None:
    req = SecAggServer(SecAggParams.for_round(10, 20, clip=1.0)).advertise_keys()[1]
    client = SecAggClient()
    for bad in (
        dataclasses.replace(req, bits=31),
        AdvertiseKeysRequest.from_record({**req.to_record(), "bits": 29}),  # as from the wire
        dataclasses.replace(req, modulus_bits=48),
    ):
        with pytest.raises(ProtocolError, match="secagg encoding refused"):
            client.advertise_keys(bad)
        assert client.stage is ClientStage.IDLE and client.setup is None
    with pytest.raises(ProtocolError, match=r"n=10 clients x max 2147483647"):
        client.advertise_keys(dataclasses.replace(req, bits=31))
    assert isinstance(client.advertise_keys(req), AdvertiseKeysReply)


# -- 8. signed (malicious-server) mode --------------------------------------------------------


def test_signed_round_with_dropouts_gives_the_weighted_mean() -> None:
    rnd = Round(10, 80, signed=True, seed=24)  # k=9, t=6: three dropouts tolerated
    plan = {"share-keys": {2}, "masked-input": {5}, "consistency-check": {7}}
    res = rnd.run(drop=plan)
    assert res is not None
    assert all(len(r.signature) == 64 for r in rnd.log["advertise-keys:reply"].values())
    assert set(res.contributors) == set(range(1, 11)) - {2, 5}  # 7's input is in the sum
    signers = set(range(1, 11)) - {2, 5, 7}
    assert all(set(r.signatures) == signers for r in rnd.log["unmask:request"].values())
    assert set(res.dropped) == {2, 5, 7}
    assert_correct(rnd, res)


@pytest.mark.parametrize("field", ["c_public", "s_public"])
def test_signed_mode_detects_a_substituted_public_key(field: str) -> None:
    rnd = Round(5, 20, signed=True, seed=25)

    def substitute(replies: dict[int, Any]) -> dict[int, Any]:
        # The server's own key in place of client 2's, under client 2's old signature.
        replies[2] = dataclasses.replace(replies[2], **{field: generate_keypair()[1]})
        return replies

    rnd.run(tamper={"advertise-keys:reply": substitute}, stop="share-keys:request")
    requests = rnd.log["share-keys:request"]
    assert set(requests) == {1, 2, 3, 4, 5}
    for i in (1, 3, 4, 5):
        with pytest.raises(
            ProtocolError, match=r"bad signature on the keys of client 2 \(client-2\)"
        ):
            rnd.clients[i].share_keys(requests[i])
        assert rnd.clients[i].stage is ClientStage.KEYS_ADVERTISED


def test_signed_mode_refuses_an_equivocating_survivor_set() -> None:
    rnd = Round(5, 20, signed=True, seed=26)

    def equivocate(requests: dict[int, Any]) -> dict[int, Any]:
        # Client 1 is told client 5 dropped, the others that it survived.
        requests[1] = dataclasses.replace(requests[1], survivors=(1, 2, 3, 4))
        return requests

    rnd.run(tamper={"consistency-check:request": equivocate}, stop="unmask:request")
    requests = rnd.log["unmask:request"]
    with pytest.raises(ProtocolError, match="differs from the one this client signed"):
        rnd.clients[1].unmask(requests[1])
    for i in (2, 3, 4, 5):
        with pytest.raises(ProtocolError, match="bad signature on the survivor set of client 1"):
            rnd.clients[i].unmask(requests[i])
    assert all(c.stage is ClientStage.CHECKED for c in rnd.clients.values())


def test_signed_unmask_needs_the_signed_set_and_t_valid_signatures() -> None:
    rnd = Round(5, 20, signed=True, seed=27)
    t = rnd.params.threshold

    def probe(requests: dict[int, Any]) -> dict[int, Any]:
        req, client = requests[1], rnd.clients[1]
        sigs = req.signatures
        assert set(req.survivors) == set(sigs) == {1, 2, 3, 4}
        few = dict(list(sigs.items())[: t - 1])
        cases = [
            (
                dataclasses.replace(req, survivors=(1, 2, 3)),
                "differs from the one this client signed",
            ),
            (
                dataclasses.replace(req, signatures=few),
                f"only {t - 2} surviving neighbours signed; need t={t}",  # own one not counted
            ),
            (
                dataclasses.replace(req, signatures={**sigs, 5: sigs[2]}),
                "signatures from non-survivors",
            ),
            (
                dataclasses.replace(req, signatures={**sigs, 2: _flip(sigs[2], 0)}),
                "bad signature on the survivor set of client 2",
            ),
            (
                dataclasses.replace(req, signatures={**sigs, 2: sigs[3]}),
                "bad signature on the survivor set of client 2",
            ),
        ]
        for bad, message in cases:
            with pytest.raises(ProtocolError, match=message):
                client.unmask(bad)
            assert client.stage is ClientStage.CHECKED
        return requests

    res = rnd.run(drop={"masked-input": {5}}, tamper={"unmask:request": probe})
    assert_correct(rnd, res)


def test_signed_client_refuses_a_wrong_identity_for_its_id() -> None:
    rnd = Round(5, 20, signed=True, seed=28)

    def probe(requests: dict[int, Any]) -> dict[int, Any]:
        req = requests[1]
        names = list(req.identities)
        names[0], names[1] = names[1], names[0]
        with pytest.raises(
            ProtocolError, match="lists identity 'client-2' for this client, which is 'client-1'"
        ):
            rnd.clients[1].advertise_keys(dataclasses.replace(req, identities=tuple(names)))
        assert rnd.clients[1].stage is ClientStage.IDLE
        return requests

    assert_correct(rnd, rnd.run(tamper={"advertise-keys:request": probe}))


# -- 9. messages as records ---------------------------------------------------------------------

MESSAGE_KINDS = [
    "advertise-keys request (unsigned)",
    "advertise-keys request (signed)",
    "advertise-keys reply",
    "share-keys request",
    "share-keys reply",
    "masked-input request",
    "consistency-check request",
    "consistency-check reply",
    "unmask request",
    "unmask reply",
]


@pytest.fixture(scope="module")
def messages() -> dict[str, Any]:
    """One real message of every kind, from a signed round with a dropout."""
    rnd = Round(5, 16, signed=True, seed=29)
    assert_correct(rnd, rnd.run(drop={"masked-input": {4}}))
    log = rnd.log
    unsigned = SecAggServer(SecAggParams.for_round(4, 16, clip=CLIP)).advertise_keys()[2]
    return {
        "advertise-keys request (unsigned)": unsigned,
        "advertise-keys request (signed)": log["advertise-keys:request"][1],
        "advertise-keys reply": log["advertise-keys:reply"][1],
        "share-keys request": log["share-keys:request"][1],
        "share-keys reply": log["share-keys:reply"][1],
        "masked-input request": log["masked-input:request"][1],
        "consistency-check request": log["consistency-check:request"][1],
        "consistency-check reply": log["consistency-check:reply"][1],
        "unmask request": log["unmask:request"][1],
        "unmask reply": log["unmask:reply"][1],
    }


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
def test_message_round_trips_through_a_record(messages: dict[str, Any], kind: str) -> None:
    message = messages[kind]
    record = message.to_record()
    assert _is_record(record), record
    assert type(message).from_record(record) == message
    if hasattr(message, "stage"):
        assert record["stage"] == message.stage
        assert request_from_record(record) == message
    if kind == "unmask reply":  # both kinds of share travel
        assert message.seed_shares and message.key_shares
    if kind == "unmask request":
        assert len(message.signatures) == 4


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
def test_message_record_missing_or_mistyped_field_names_it(
    messages: dict[str, Any], kind: str
) -> None:
    message = messages[kind]
    record = message.to_record()
    fields = [k for k in record if k != "stage"]  # the stage picks the class, see below
    assert fields
    for key in fields:
        missing = {k: v for k, v in record.items() if k != key}
        with pytest.raises(ProtocolError, match=f"'{key}'"):
            type(message).from_record(missing)
        for wrong in ("oops", [1.5]):
            with pytest.raises(ProtocolError, match=f"'{key}'"):
                type(message).from_record({**record, key: wrong})


def test_unknown_stage_lists_the_valid_ones() -> None:
    for record in ({"stage": "bogus"}, {}, {"stage": 3}, {"stage": "masked-input-sent"}):
        with pytest.raises(ProtocolError) as info:
            request_from_record(record)
        assert str(info.value).endswith("expected one of " + ", ".join(STAGES))


def test_list_valued_stage_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="stage"):
        request_from_record({"stage": ["unmask"]})


# -- 10. client state between messages -----------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_clients_rebuilt_from_state_between_every_stage(signed: bool) -> None:
    rnd = Round(10, 60, signed=signed, persist=True, seed=30)
    plan = {"share-keys": {3}, "masked-input": {6}, "unmask": {8}}
    if signed:  # t=6 of k=9 against a malicious server: three dropouts at most
        del plan["share-keys"]
        plan["consistency-check"] = {9}
    res = rnd.run(drop=plan)
    assert rnd.rebuilt >= 10 + 9 + 2 * 8  # every call of every live client
    assert_correct(rnd, res)
    requests = rnd.log["unmask:request"]
    for i in rnd.log["unmask:reply"]:  # 8 never answered and may still do so
        with pytest.raises(ProtocolError, match="client is at stage done"):
            rnd.client(i).unmask(requests[i])  # the rebuilt client remembers it answered


def test_idle_client_state_round_trips() -> None:
    state = SecAggClient().to_state()
    assert state == {"stage": "idle"}
    client = SecAggClient.from_state(state)
    assert client.stage is ClientStage.IDLE and client.setup is None


# -- 11. server-side validation of replies --------------------------------------------------------


def test_server_drops_malformed_masked_inputs_and_finishes() -> None:
    rnd = Round(10, 50, seed=31)

    def corrupt(replies: dict[int, Any]) -> dict[int, Any]:
        replies[2] = MaskedInputReply(replies[2].masked[:-1])
        replies[3] = MaskedInputReply(replies[3].masked.astype(np.uint64))
        replies[4] = MaskedInputReply(replies[4].masked.tolist())
        replies[5] = rnd.log["share-keys:reply"][5]
        return replies

    res = rnd.run(tamper={"masked-input:reply": corrupt})
    assert res is not None
    assert res.contributors == (1, 6, 7, 8, 9, 10)
    assert set(res.dropped) == {2, 3, 4, 5}
    assert all(reason.startswith("masked-input: ") for reason in res.dropped.values())
    assert "masked input must be (51,) uint32, got (50,) uint32" in res.dropped[2]
    assert "got (51,) uint64" in res.dropped[3]
    assert "got list" in res.dropped[4]
    assert "expected MaskedInputReply, got ShareKeysReply" in res.dropped[5]
    assert_correct(rnd, res)


def test_server_drops_share_keys_replies_that_misaddress_or_truncate() -> None:
    rnd = Round(10, 50, seed=32)

    def corrupt(replies: dict[int, Any]) -> dict[int, Any]:
        skipped = dict(replies[2].ciphertexts)
        del skipped[min(skipped)]
        short = dict(replies[3].ciphertexts)
        short[min(short)] = short[min(short)][:-1]
        replies[2], replies[3] = ShareKeysReply(skipped), ShareKeysReply(short)
        return replies

    res = rnd.run(tamper={"share-keys:reply": corrupt})
    assert res is not None
    assert res.dropped[2].startswith("share-keys: ") and res.dropped[3].startswith("share-keys: ")
    assert "does not address exactly its neighbours" in res.dropped[2]
    assert "share ciphertexts must be 132 bytes" in res.dropped[3]
    assert not {2, 3} & set(rnd.log["masked-input:request"])
    assert set(res.contributors) == set(range(1, 11)) - {2, 3}
    assert_correct(rnd, res)


def test_server_drops_an_unmask_reply_with_a_share_it_should_not_hold() -> None:
    rnd = Round(10, 50, seed=33)

    def corrupt(replies: dict[int, Any]) -> dict[int, Any]:
        # A survivor's seed share relabelled as its mask-key share.
        seeds = dict(replies[4].seed_shares)
        owner = min(seeds)
        moved = {owner: seeds.pop(owner)}
        replies[4] = UnmaskReply(seed_shares=seeds, key_shares=moved)
        return replies

    res = rnd.run(tamper={"unmask:reply": corrupt})
    assert res is not None
    assert res.dropped[4].startswith("unmask: unmask reply holds shares it should not")
    assert res.contributors == tuple(range(1, 11))  # 4's masked input still counts
    assert_correct(rnd, res)


# -- 12. malicious-server hardening found in review ----------------------------------------


def test_signed_threshold_defeats_a_survivor_set_split() -> None:
    """Signed mode needs t > (k + c) / 2: two disjoint groups of t honest signers cannot
    both exist among k neighbours, so no client's seed and key shares both leak."""
    for n in (6, 10, 50, 100):
        params = SecAggParams.for_round(n, 10, clip=1.0, signed=True)
        expected_corrupt = math.ceil(0.05 * params.degree)
        assert 2 * params.threshold > params.degree + expected_corrupt, params
    with pytest.raises(ValueError, match="threshold > k / 2"):
        SecAggParams(6, 4, 2, 1.0, 16, 32, 10, signed=True)
    with pytest.raises(ValueError, match="signed mode needs threshold >= 3 for degree 4"):
        SecAggParams.for_round(6, 10, clip=1.0, degree=4, threshold=2, signed=True)
    req = SecAggServer(SecAggParams.for_round(6, 10, clip=1.0)).advertise_keys()[1]
    with pytest.raises(ProtocolError, match="t > k / 2"):
        dataclasses.replace(req, signed=True, identities=tuple("abcdef"), degree=4, threshold=2)


def test_signed_keys_bind_the_round_parameters() -> None:
    """A server giving one client another view of the round (here another threshold)
    cannot make its signed keys acceptable to the others."""

    def other_threshold(batch: dict[int, Any]) -> dict[int, Any]:
        batch[1] = dataclasses.replace(batch[1], threshold=batch[1].threshold + 1)
        return batch

    rnd = Round(10, 20, signed=True, seed=40)
    with pytest.raises(ProtocolError, match="bad signature on the keys of client"):
        rnd.run(tamper={"advertise-keys:request": other_threshold})


def test_a_provisioned_client_refuses_an_unsigned_round() -> None:
    """Downgrade: a client that holds signing keys never takes part in an unsigned round."""
    key, public = generate_signing_key()
    client = SecAggClient(
        identity="a", signing_key=key, trusted_keys={"a": public}, require_signed=True
    )
    req = SecAggServer(SecAggParams.for_round(6, 10, clip=1.0)).advertise_keys()[1]
    with pytest.raises(ProtocolError, match="only takes part in signed rounds"):
        client.advertise_keys(req)
    assert client.stage is ClientStage.IDLE


def test_round_size_and_degree_are_capped() -> None:
    """A request cannot make a client build a graph of billions of nodes."""
    req = SecAggServer(SecAggParams.for_round(6, 10, clip=1.0)).advertise_keys()[1]
    with pytest.raises(ProtocolError, match="2 to 100000 clients"):
        dataclasses.replace(req, num_clients=2**31 - 1)
    with pytest.raises(ProtocolError, match="exceeds the limit of 1024"):
        dataclasses.replace(req, num_clients=4000, degree=2000, threshold=1001)


# -- buckets, norm bounding, distributed DP (issue: robust aggregation under SecAgg) --------


def test_a_sum_below_min_survivors_is_never_unmasked() -> None:
    """A bucket of 3 that loses a member at masked-input aborts before any unmask request."""
    rnd = Round(3, 8, min_survivors=3, bucket=True)
    with pytest.raises(SecAggAbortedError, match="fewer than 3 is never unmasked"):
        rnd.run(drop={"masked-input": {2}})
    assert "unmask:request" not in rnd.log


def test_honest_client_refuses_to_unmask_fewer_than_min_survivors() -> None:
    """Even a server that names a smaller survivor set gets no share from an honest client."""
    rnd = Round(4, 8, min_survivors=3)

    def shrink(batch: dict[int, Any]) -> dict[int, Any]:
        return {i: dataclasses.replace(r, survivors=(1, 2)) for i, r in batch.items()}

    with pytest.raises(ProtocolError, match="no sum of fewer than 3"):
        rnd.run(tamper={"unmask:request": shrink})


def test_no_client_unmasks_a_sum_of_one_whatever_the_round_says() -> None:
    """A server that drops the floor (min_survivors 0, t = 1) still gets no lone input."""
    rnd = Round(2, 8, min_survivors=2, bucket=True)

    def alone(batch: dict[int, Any]) -> dict[int, Any]:
        return {i: dataclasses.replace(r, survivors=(i,)) for i, r in batch.items()}

    with pytest.raises(ProtocolError, match="no sum of fewer than 2"):
        rnd.run(tamper={"unmask:request": alone})
    strict = SecAggClient(min_sum=3)
    assert strict.min_sum == 3
    with pytest.raises(ValueError, match="min_sum"):
        SecAggClient(min_sum=1)


def test_bucket_thresholds_resist_the_tolerated_colluders() -> None:
    # Unsigned: t >= c + 1 (c = 1 at 5 % corrupt), else s - 1 so s survivors finish,
    # and never t <= k / 2 (a split survivor set): the largest bucket (2s - 1) gets t = s.
    assert bucket_parameters(3, 2) == (2, 2)
    assert bucket_parameters(4, 3) == (3, 2)
    assert bucket_parameters(5, 3) == (4, 3)
    assert bucket_parameters(8, 5) == (7, 4)
    assert bucket_parameters(9, 5) == (8, 5)
    assert bucket_parameters(2, 2) == (1, 1)  # the sum of two already tells each the other's
    assert bucket_parameters(4, 2, corrupt_fraction=0.0) == (3, 2)
    # Signed: t > (k + c) / 2 against a split survivor set; a bucket of 2 cannot have it.
    assert bucket_parameters(3, 3, signed=True) == (2, 2)
    assert bucket_parameters(5, 3, signed=True) == (4, 3)
    with pytest.raises(ValueError, match="buckets of 3 or more"):
        bucket_parameters(2, 2, signed=True)


def test_signed_unmask_counts_only_neighbours_signatures() -> None:
    """The client's own signature does not count toward t (else a split needs one fewer)."""
    rnd = Round(3, 8, signed=True, min_survivors=3, bucket=True)  # k = 2, t = 2

    def own_and_one(batch: dict[int, Any]) -> dict[int, Any]:
        return {
            i: dataclasses.replace(
                r, signatures={v: sig for v, sig in r.signatures.items() if v in (i, i % 3 + 1)}
            )
            for i, r in batch.items()
        }

    with pytest.raises(ProtocolError, match="only 1 surviving neighbours signed; need t=2"):
        rnd.run(tamper={"unmask:request": own_and_one})
    res = Round(3, 8, signed=True, min_survivors=3, bucket=True).run()
    assert res is not None and res.contributors == (1, 2, 3)


def test_bucket_of_two_gives_its_weighted_mean() -> None:
    rnd = Round(2, 16, min_survivors=2, bucket=True)
    res = rnd.run()
    assert res is not None and res.contributors == (1, 2)
    assert torch.allclose(res.aggregate.double(), rnd.expected([1, 2]), atol=res.error_bound)


def test_norm_bound_scales_each_update_before_masking() -> None:
    bound = 0.5
    rnd = Round(5, 40, norm_bound=bound, scale=1.5)  # inputs of norm ~9.5
    res = rnd.run()
    assert res is not None
    clipped = {i: clip_update(x.double(), bound).clamp(-CLIP, CLIP) for i, x in rnd.inputs.items()}
    expected = sum(rnd.weights[i] * clipped[i] for i in clipped) / sum(rnd.weights.values())
    assert torch.allclose(res.aggregate.double(), expected, atol=res.error_bound)
    total = res.aggregate.double() * res.total_weight
    assert float(total.norm()) <= res.total_weight * bound + 1e-4


def test_distributed_noise_of_a_sum_has_the_planned_variance() -> None:
    """Five clients with zero updates: the unmasked sum is their Skellam noise alone.

    Its per-coordinate variance must be 5 x the planned client variance (in code
    units; divided by scale^2 in float units). Over d = 20,000 coordinates the
    sample variance of Gaussian-like noise has relative std sqrt(2 / d) = 1 %, so
    the 5 % margin is 5 sigma; the mean must be within 5 sigma / sqrt(d) of 0.
    """
    n, d = 5, 20_000
    plan = plan_skellam(
        noise_multiplier=0.8, norm_bound=1.0, clip=CLIP, dim=d, num_clients=n, min_clients=n
    )
    rnd = Round(
        n,
        d,
        uniform=True,
        scale=0.0,
        min_survivors=n,
        norm_bound=1.0,
        bits=plan.bits,
        noise_variance=plan.client_variance,
        headroom=plan.headroom,
    )
    res = rnd.run()
    assert res is not None
    noise = res.aggregate.double() * res.total_weight  # the decoded sum, in float units
    expected_var = n * plan.client_variance / plan.scale**2
    assert res.total_weight == pytest.approx(n)
    assert float(noise.var()) == pytest.approx(expected_var, rel=0.05)
    assert abs(float(noise.mean())) < 5 * math.sqrt(expected_var / d)
    # The min-bucket noise is what the plan promises: noise_multiplier x sensitivity.
    assert math.sqrt(expected_var) == pytest.approx(plan.sum_std_float, rel=1e-9)


def test_a_noise_parameter_without_headroom_is_refused() -> None:
    with pytest.raises(ValueError, match="headroom"):
        SecAggParams.for_round(4, 8, clip=1.0, noise_variance=4.0)
    req = SecAggServer(SecAggParams.for_round(4, 8, clip=1.0)).advertise_keys()[1]
    with pytest.raises(ProtocolError, match="headroom"):
        dataclasses.replace(req, noise_variance=4.0)
    with pytest.raises(ProtocolError, match="min_survivors"):
        dataclasses.replace(req, min_survivors=5)
