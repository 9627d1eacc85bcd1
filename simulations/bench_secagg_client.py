"""Benchmark: a SecAgg+ client's masking cost against the AES-CTR keystream floor.

Two parts, one run, same process:

1. **Client overhead vs floor.** A real round of ``n`` in-process clients
   (:class:`~fedsec.secagg.client.SecAggClient`, unsigned mode, 32-bit ring,
   ``k`` and ``t`` from ``SecAggParams.for_round``) is run up to the masked-input
   stage; one client's state is saved there. Each repeat rebuilds that client
   (not timed) and times, with :func:`time.process_time`, exactly what it does
   next, ``SecAggClient.mask``: fixed-point encoding of the update and the
   weight, then its ``1 + k`` masks (self mask and one pairwise mask per
   neighbour). Interleaved with it, in the same repeat:

   * **floor**: the bare AES-256-CTR keystream of the same ``(1 + k) x (d + 1)
     x 4`` bytes from ``cryptography``, one ``update_into`` per seed into one
     preallocated buffer (nothing added, nothing encoded);
   * **before**: the same ``mask`` call with the masking of fedsec before
     issue 20 (each mask expanded at full length into a scratch vector, then
     added), reimplemented here as :func:`unfused_apply_masks`;
   * the client's two parts on their own: encoding, and masking.

   The ratio divides the client's figure by the floor's (medians over repeats;
   the machine's other load hits both alike). The masked vectors of the two
   implementations are compared bit for bit.

2. **Per-stage CPU breakdown of one secure round.** The same round again
   (``n`` clients, ``p`` of them dropping after key sharing), with the real
   functions the protocol calls wrapped by timers (:func:`time.process_time`,
   exclusive of nested timed calls): X25519 key generation, key agreement
   (X25519 + HKDF-SHA256, clients and server), Shamir split and combine,
   AES-GCM of share pairs, encoding, masking (keystream and adds, fused),
   server sum of the masked inputs, mask removal at unmasking, decoding; every
   other CPU second spent inside the protocol methods (checks, messages,
   graph rows, Python) is "other". Figures are per round, summed over clients,
   and per client (divided by the clients that ran the stage).

    python simulations/bench_secagg_client.py                  # n=50, k=34, d=1,060,170
    python simulations/bench_secagg_client.py --dim 100000 --repeats 3 --dropout 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cryptography
import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import fedsec.secagg.client as client_module
import fedsec.secagg.server as server_module
from fedsec.secagg import shamir
from fedsec.secagg.client import SecAggClient
from fedsec.secagg.encoding import FixedPointEncoder
from fedsec.secagg.masking import apply_masks, expand_mask
from fedsec.secagg.messages import MaskedInputReply
from fedsec.secagg.server import SecAggParams, SecAggServer

CORRUPT_FRACTION = 0.05
MASKING = "masking (keystream + adds, fused)"
UIntArray = Any


def unfused_apply_masks(
    vector: UIntArray,
    self_seed: bytes,
    pairwise: Sequence[tuple[int, bytes]],
    my_id: int,
    *,
    in_place: bool = False,
) -> UIntArray:
    """The masking of fedsec before issue 20: expand each mask whole, then add it."""
    y = vector if in_place else vector.copy()
    scratch = np.empty_like(y)
    np.add(y, expand_mask(self_seed, y.size, y.dtype, out=scratch), out=y)
    for peer, seed in pairwise:
        expand_mask(seed, y.size, y.dtype, out=scratch)
        if my_id < peer:
            np.add(y, scratch, out=y)
        else:
            np.subtract(y, scratch, out=y)
    return y


def keystream_floor(seeds: Sequence[bytes], zeros: bytes, out: np.ndarray) -> None:
    """AES-256-CTR keystream of ``len(zeros)`` bytes per seed into one preallocated buffer."""
    raw = out.data.cast("B")
    for seed in seeds:
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update_into(zeros, raw)


def make_update(client_id: int, dim: int, clip: float, seed: int) -> torch.Tensor:
    """The client's float32 update, reproducible from ``seed`` and its id."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + client_id)
    return torch.randn(dim, generator=gen).mul_(0.5 * clip)


@dataclass
class _Frame:
    side: str  # booked to: the outermost timed call's side
    start: float
    nested: float = 0.0  # CPU of timed calls inside this one


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Replace ``owner.name`` by ``value`` for the block."""
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class StageTimer:
    """CPU time per stage, exclusive of nested timed calls.

    :meth:`wrap` replaces an attribute (a module function or a method) by a
    timing wrapper for the duration of a ``with`` block. The outermost timed
    call decides the side (client or server) a stage is booked to.
    """

    def __init__(self) -> None:
        self.cpu: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self._stack: list[_Frame] = []

    def _timed(self, side: str, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer = self._stack[0].side if self._stack else side
            frame = _Frame(outer, time.process_time())
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.process_time() - frame.start
                key = (outer, stage)
                self.cpu[key] = self.cpu.get(key, 0.0) + spent - frame.nested
                self.calls[key] = self.calls.get(key, 0) + 1
                if self._stack:
                    self._stack[-1].nested += spent

        return wrapper

    @contextmanager
    def wrap(self, targets: Sequence[tuple[Any, str, str, str]]) -> Iterator[None]:
        """Time ``(owner, attribute, side, stage)`` for the block, then restore them."""
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _, _ in targets]
        try:
            for owner, name, side, stage in targets:
                original = owner.__dict__[name]
                setattr(owner, name, self._timed(side, stage, original))
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def timed_targets() -> list[tuple[Any, str, str, str]]:
    """What the breakdown times: the real calls of fedsec.secagg, by stage."""
    targets: list[tuple[Any, str, str, str]] = [
        (client_module, "generate_keypair", "client", "X25519 key generation"),
        (client_module, "derive_key", "client", "key agreement (X25519 + HKDF)"),
        (server_module, "derive_key", "server", "key agreement (X25519 + HKDF)"),
        (shamir, "split", "client", "Shamir split"),
        (shamir, "combine", "server", "Shamir combine"),
        (client_module, "encrypt_share", "client", "AES-GCM of shares"),
        (client_module, "decrypt_share", "client", "AES-GCM of shares"),
        (FixedPointEncoder, "encode", "client", "encoding"),
        (client_module, "apply_masks", "client", MASKING),
        (SecAggServer, "_collect_masked", "server", "server sum"),
        (server_module, "remove_self_mask", "server", "unmask: mask removal"),
        (server_module, "remove_pairwise_mask", "server", "unmask: mask removal"),
        (FixedPointEncoder, "decode_sum", "server", "decoding"),
    ]
    for name in (
        "advertise_keys",
        "share_keys",
        "receive_shares",
        "mask",
        "consistency_check",
        "unmask",
    ):
        targets.append((SecAggClient, name, "client", "other"))
    for name in ("advertise_keys", "share_keys", "masked_input", "unmask", "finish"):
        targets.append((SecAggServer, name, "server", "other"))
    return targets


def run_round(
    params: SecAggParams, dropout: float, seed: int, *, stop_before_mask: int = 0
) -> dict[str, Any]:
    """One round of direct calls; with ``stop_before_mask`` return that client's state there.

    Returns the survivors' masked replies, the result and the saved state (if
    asked for).
    """
    n, d, clip = params.num_clients, params.dim, params.clip
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    dropped = {int(i) for i in rng.choice(ids, size=round(dropout * n), replace=False)}
    weights = {i: float(rng.uniform(0.1, 1.0)) for i in ids}
    clients = {i: SecAggClient() for i in ids}
    srv = SecAggServer(params, server_round=1)
    req: dict[int, Any] = srv.advertise_keys()
    rep: dict[int, Any] = {i: clients[i].advertise_keys(r) for i, r in req.items()}
    req = srv.share_keys(rep)
    rep = {i: clients[i].share_keys(r) for i, r in req.items()}
    req = srv.masked_input(rep)
    for i, r in req.items():
        if i not in dropped:
            clients[i].receive_shares(r)
    if stop_before_mask:
        return {"state": clients[stop_before_mask].to_state(), "weight": weights[stop_before_mask]}
    rep = {}
    ref_sum, ref_weight = torch.zeros(d, dtype=torch.float64), 0.0
    for i in sorted(set(req) - dropped):
        x = make_update(i, d, clip, seed)
        rep[i] = clients[i].mask(x, weights[i])
        ref_sum.add_(x.to(torch.float64).clamp_(-clip, clip), alpha=weights[i])
        ref_weight += weights[i]
    req = srv.unmask(rep)
    replies = {i: clients[i].unmask(r) for i, r in req.items()}
    result = srv.finish(replies)
    error = float((result.aggregate.to(torch.float64) - ref_sum / ref_weight).abs().max())
    ok = error <= result.error_bound and sorted(result.contributors) == sorted(rep)
    return {"ok": ok, "survivors": len(rep), "dropped": len(dropped)}


def overhead_vs_floor(params: SecAggParams, repeats: int, seed: int) -> dict[str, Any]:
    """Part 1: one client's encoding + masking against the keystream floor."""
    d, clip = params.dim, params.clip
    saved = run_round(params, 0.0, seed, stop_before_mask=1)
    state, weight = saved["state"], saved["weight"]
    update = make_update(1, d, clip, seed)
    probe = SecAggClient.from_state(state)
    seeds = [probe._seed] + [probe._mask_seeds[v] for v in probe._masked_with]
    pairwise = [(v, probe._mask_seeds[v]) for v in probe._masked_with]
    encoder = client_module.encoder_for(probe._setup())
    floor_buf = np.empty(d + 1, dtype=np.uint32)
    encoded = np.empty(d + 1, dtype=encoder.dtype)

    def client_mask() -> MaskedInputReply:
        client = SecAggClient.from_state(state)
        t0 = time.process_time()
        reply = client.mask(update, weight)
        times["after"].append(time.process_time() - t0)
        return reply

    def client_mask_before() -> MaskedInputReply:
        client = SecAggClient.from_state(state)
        with patched(client_module, "apply_masks", unfused_apply_masks):
            t0 = time.process_time()
            reply = client.mask(update, weight)
            times["before"].append(time.process_time() - t0)
        return reply

    def timed(key: str, fn: Callable[[], Any]) -> None:
        t0 = time.process_time()
        fn()
        times[key].append(time.process_time() - t0)

    fused = apply_masks
    times: dict[str, list[float]] = {k: [] for k in ("floor", "after", "before", "encode", "mask")}
    client_mask()
    client_mask_before()
    # The coins of stochastic rounding are fresh per call: compare the masking of one encoding.
    encoder.encode(update, weight=weight, out=encoded[:-1])
    encoded[-1] = 1
    fused_out = fused(encoded, probe._seed, pairwise, 1)
    identical = bool(
        np.array_equal(fused_out, unfused_apply_masks(encoded, probe._seed, pairwise, 1))
    )
    zeros = bytes(4 * (d + 1))
    for value in times.values():
        value.clear()
    for _ in range(repeats):
        timed("floor", lambda: keystream_floor(seeds, zeros, floor_buf))
        client_mask()
        client_mask_before()
        timed("encode", lambda: encoder.encode(update, weight=weight, out=encoded[:-1]))
        timed("mask", lambda: fused(encoded, probe._seed, pairwise, 1, in_place=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {
        "k": len(pairwise),
        "masks": len(seeds),
        "keystream_bytes": len(seeds) * 4 * (d + 1),
        "median_s": med,
        "min_s": low,
        "floor_GBps": len(seeds) * 4 * (d + 1) / med["floor"] / 1e9,
        "ratio_after": med["after"] / med["floor"],
        "ratio_before": med["before"] / med["floor"],
        "ratio_after_min": low["after"] / low["floor"],
        "ratio_before_min": low["before"] / low["floor"],
        "identical": identical,
    }


def breakdown(
    params: SecAggParams, dropout: float, seed: int, floor_s_per_byte: float
) -> dict[str, Any]:
    """Part 2: CPU seconds per stage of one secure round.

    The fused masking is split, as an estimate, into its keystream (the bytes
    it expands at part 1's floor rate) and the rest (adds, loop).
    """
    timer = StageTimer()
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    with timer.wrap(timed_targets()):
        out = run_round(params, dropout, seed)
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    rows = []
    for (side, stage), spent in sorted(timer.cpu.items(), key=lambda kv: -kv[1]):
        rows.append(
            {
                "side": side,
                "stage": stage,
                "cpu_s": spent,
                "calls": timer.calls[(side, stage)],
                "per_client_ms": 1e3 * spent / params.num_clients if side == "client" else None,
            }
        )
    timed_total = sum(timer.cpu.values())
    masking = ("client", MASKING)
    keystream = (
        timer.calls.get(masking, 0) * (params.degree + 1) * 4 * (params.dim + 1) * floor_s_per_byte
    )
    return {
        "masking_keystream_s_est": keystream,
        "masking_rest_s_est": timer.cpu.get(masking, 0.0) - keystream,
        "rows": rows,
        "protocol_cpu_s": timed_total,
        "round_cpu_s": cpu,
        "round_wall_s": wall,
        "survivors": out["survivors"],
        "dropped": out["dropped"],
        "ok": out["ok"],
    }


def main() -> None:
    """Parse arguments, run both parts, print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--dim", type=int, default=1_060_170, help="update length d")
    parser.add_argument("--degree", type=int, default=0, help="graph degree k (0: for_round's)")
    parser.add_argument("--dropout", type=float, default=0.0, help="in the breakdown round")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.clients < 3 or args.dim < 1 or args.repeats < 1 or not 0 <= args.dropout < 1:
        parser.error("need --clients >= 3, --dim >= 1, --repeats >= 1, 0 <= --dropout < 1")
    try:
        params = SecAggParams.for_round(
            args.clients,
            args.dim,
            clip=args.clip,
            dropout_rate=max(args.dropout, 0.1),
            corrupt_fraction=CORRUPT_FRACTION,
            degree=args.degree,
        )
    except ValueError as err:
        parser.error(str(err))
    run_round(  # warm-up: imports, first calls
        SecAggParams.for_round(4, 16, clip=1.0, dropout_rate=0.1), 0.0, 12345
    )
    n, d, k = params.num_clients, params.dim, params.degree
    print(
        f"SecAgg+ client cost, n={n}, k={k}, t={params.threshold}, d={d:,}, bits={params.bits}, "
        f"32-bit ring, unsigned mode; python {platform.python_version()}, numpy "
        f"{np.__version__}, cryptography {cryptography.__version__}, {os.cpu_count()} CPUs; "
        f"CPU time (process_time), median of {args.repeats}\n"
    )
    part1 = overhead_vs_floor(params, args.repeats, args.seed)
    med, low = part1["median_s"], part1["min_s"]
    print(
        f"## Client overhead vs the keystream floor ({part1['masks']} masks x (d + 1) x 4 B = "
        f"{part1['keystream_bytes'] / 1e6:.1f} MB)\n"
    )
    print("| what | ms (median) | ms (min) | / floor (median) | / floor (min) |")
    print("|---|---|---|---|---|")

    def line(label: str, key: str) -> None:
        print(
            f"| {label} | {1e3 * med[key]:.1f} | {1e3 * low[key]:.1f} | "
            f"{med[key] / med['floor']:.2f}x | {low[key] / low['floor']:.2f}x |"
        )

    line(f"floor: AES-256-CTR keystream ({part1['floor_GBps']:.1f} GB/s)", "floor")
    line("client `mask()` now (encoding + fused masking)", "after")
    line("client `mask()` before (encoding + expand-then-add)", "before")
    line("  of which encoding (`encode`)", "encode")
    line("  of which masking (`apply_masks`, fused)", "mask")
    print(
        f"\nmasked vectors of both implementations bit-identical: "
        f"{'yes' if part1['identical'] else 'NO'}\n"
    )

    floor_rate = med["floor"] / part1["keystream_bytes"]
    part2 = breakdown(params, args.dropout, args.seed, floor_rate)
    print(
        f"## Per-stage CPU of one secure round (n={n}, {part2['dropped']} dropped after key "
        f"sharing, {part2['survivors']} survivors)\n"
    )
    print("| side | stage | CPU s per round | ms per client | calls | share |")
    print("|---|---|---|---|---|---|")
    total = part2["protocol_cpu_s"]
    for row in part2["rows"]:
        per_client = f"{row['per_client_ms']:.1f}" if row["per_client_ms"] is not None else ""
        print(
            f"| {row['side']} | {row['stage']} | {row['cpu_s']:.3f} | {per_client} | "
            f"{row['calls']} | {row['cpu_s'] / total:.0%} |"
        )
        if row["stage"] == MASKING:
            for label, key in (("keystream", "keystream"), ("adds and loop", "rest")):
                spent = part2[f"masking_{key}_s_est"]
                print(
                    f"| client | &nbsp;&nbsp;of which {label} (est.) | {spent:.3f} | "
                    f"{1e3 * spent / n:.1f} | | {spent / total:.0%} |"
                )
    print(
        f"| all | protocol total | {total:.3f} | | | 100% |\n\n"
        f"Round CPU {part2['round_cpu_s']:.2f} s (also the updates' generation, not "
        f"protocol), wall {part2['round_wall_s']:.2f} s. ms per client: per round over n={n}. "
        f"Aggregate equals the plaintext weighted mean within its bound: "
        f"{'yes' if part2['ok'] else 'NO'}.\nThe masking's keystream is estimated at the "
        "floor's rate above; the rest is the adds and the loop around them."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {"params": vars(args), "k": k, "overhead": part1, "breakdown": part2},
                handle,
                indent=2,
            )
    if not (part1["identical"] and part2["ok"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
