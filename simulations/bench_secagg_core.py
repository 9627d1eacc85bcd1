"""Benchmark: the SecAgg+ protocol core (fedsec.secagg) without Flower transport.

One full round of :class:`~fedsec.secagg.server.SecAggServer` with ``n``
in-process :class:`~fedsec.secagg.client.SecAggClient` objects (unsigned,
semi-honest-server mode, 32-bit ring), run by direct method calls: no
serialization, no network. Every client really runs every stage it takes
part in, so the server sums and unmasks real masked vectors. Updates are
float32 ``N(0, (clip/2)**2)`` vectors of ``d`` coordinates (some get clipped)
with weights drawn from ``U(0.1, 1)``.

Dropout ``p``: ``round(p * n)`` clients chosen at random drop after key
sharing (they advertised keys and sent their encrypted shares, then send no
masked input). That is the expensive case of Bonawitz et al. (CCS 2017): the
server rebuilds each dropped client's mask key from ``t`` shares and strips
one pairwise mask per surviving neighbour, so its cost grows with dropped x
neighbours. ``k`` and ``t`` come from ``SecAggParams.for_round(n, d, clip=...,
dropout_rate=max(p, 0.1), corrupt_fraction=0.05)`` (``--design-dropout``
fixes the design rate for every row instead).

Measured per round (wall clock, ``time.perf_counter``, the machine's other load
included):

* client s: each surviving client's compute summed over its stages --
  keys+shares (``advertise_keys`` + ``share_keys``), mask (``receive_shares`` +
  ``mask``), unmask -- median and max over survivors; per-stage medians;
* server s: all server methods, split into relay (``advertise_keys``,
  ``share_keys``, ``masked_input``: routing keys and ciphertexts), sum
  (``unmask``: checking and adding the masked vectors) and finish (rebuilding
  seeds and dropped keys, expanding and removing masks, decoding);
* bytes per surviving client (median): upload = its replies, download = the
  server's requests to it. Convention for a record (``to_record()``): the
  values only, field names not counted -- ``bytes`` by length, ``str`` by UTF-8
  length, ``int`` and ``float`` 8 bytes, ``bool`` 1 byte, lists summed over
  their items; plus ``masked.nbytes`` for the masked vector (``4 * (d + 1)``
  in the 32-bit ring). The final aggregate is not sent to clients, so it is
  not counted. upload / plaintext divides the upload by ``4 * d`` (a float32
  update sent in the clear).
* ok: the round's aggregate equals the plaintext weighted mean of the
  survivors' clipped updates (computed in float64) within
  ``SecAggResult.error_bound`` in every coordinate, and the contributors are
  exactly the survivors.

A tiny warm-up round runs first. With ``--repeats R`` every figure is the
median over ``R`` fresh rounds (ok: all of them).

    python simulations/bench_secagg_core.py                          # n=100, d=1M, p=0/0.1/0.3
    python simulations/bench_secagg_core.py --clients 20 --dim 100000 --json secagg.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedsec.secagg.client import SecAggClient
from fedsec.secagg.server import SecAggParams, SecAggServer

CORRUPT_FRACTION = 0.05
STAGES = ("keys", "mask", "unmask")


def value_bytes(value: Any) -> int:
    """Size of one record value under the convention of the module docstring."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 8
    if isinstance(value, list | tuple):
        return sum(value_bytes(v) for v in value)
    raise TypeError(f"unexpected record value of type {type(value).__name__}")


def record_bytes(record: Mapping[str, Any]) -> int:
    """Bytes of a flat record's values (field names not counted)."""
    return sum(value_bytes(v) for v in record.values())


def make_update(client_id: int, dim: int, clip: float, seed: int) -> torch.Tensor:
    """The client's float32 update, reproducible from ``seed`` and its id."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + client_id)
    return torch.randn(dim, generator=gen).mul_(0.5 * clip)


def run_round(
    n: int, d: int, dropout: float, clip: float, design: float, seed: int
) -> dict[str, Any]:
    """One SecAgg+ round with ``round(dropout * n)`` clients dropping after key sharing."""
    params = SecAggParams.for_round(
        n, d, clip=clip, dropout_rate=design, corrupt_fraction=CORRUPT_FRACTION
    )
    rng = np.random.default_rng(seed)
    ids = list(range(1, n + 1))
    dropped = {int(i) for i in rng.choice(ids, size=round(dropout * n), replace=False)}
    weights = {i: float(rng.uniform(0.1, 1.0)) for i in ids}
    clients = {i: SecAggClient() for i in ids}
    ctime = {i: dict.fromkeys(STAGES, 0.0) for i in ids}
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    server = {"relay": 0.0, "sum": 0.0, "finish": 0.0}

    def serve(part: str, method: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = method(*args)
        server[part] += time.perf_counter() - t0
        return out

    def on_client(cid: int, stage: str, method: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = method(*args)
        ctime[cid][stage] += time.perf_counter() - t0
        return out

    srv = SecAggServer(params, server_round=1)
    req = serve("relay", srv.advertise_keys)
    rep: dict[int, Any] = {}
    for i, r in req.items():
        down[i] += record_bytes(r.to_record())
        rep[i] = on_client(i, "keys", clients[i].advertise_keys, r)
        up[i] += record_bytes(rep[i].to_record())

    req = serve("relay", srv.share_keys, rep)
    rep = {}
    for i, r in req.items():
        down[i] += record_bytes(r.to_record())
        rep[i] = on_client(i, "keys", clients[i].share_keys, r)
        up[i] += record_bytes(rep[i].to_record())

    req = serve("relay", srv.masked_input, rep)
    rep = {}
    ref_sum = torch.zeros(d, dtype=torch.float64)
    ref_weight = 0.0
    for i, r in req.items():
        down[i] += record_bytes(r.to_record())
        if i in dropped:
            continue  # received its shares' request, then left the round
        x = make_update(i, d, clip, seed)
        on_client(i, "mask", clients[i].receive_shares, r)
        rep[i] = on_client(i, "mask", clients[i].mask, x, weights[i])
        up[i] += int(rep[i].masked.nbytes)
        ref_sum.add_(x.to(torch.float64).clamp_(-clip, clip), alpha=weights[i])
        ref_weight += weights[i]
        del x

    req = serve("sum", srv.unmask, rep)
    rep = {}
    for i, r in req.items():
        down[i] += record_bytes(r.to_record())
        rep[i] = on_client(i, "unmask", clients[i].unmask, r)
        up[i] += record_bytes(rep[i].to_record())
    res = serve("finish", srv.finish, rep)

    survivors = sorted(set(ids) - dropped)
    expected = ref_sum.div_(ref_weight)
    error = float((res.aggregate.to(torch.float64) - expected).abs().max())
    ok = error <= res.error_bound and sorted(res.contributors) == survivors
    totals = [sum(ctime[i].values()) for i in survivors]
    return {
        "k": params.degree,
        "t": params.threshold,
        "dropped": len(dropped),
        "client_s_median": statistics.median(totals),
        "client_s_max": max(totals),
        **{
            f"client_{s}_s_median": statistics.median(ctime[i][s] for i in survivors)
            for s in STAGES
        },
        "dropped_client_s_median": (
            statistics.median(ctime[i]["keys"] for i in dropped) if dropped else 0.0
        ),
        "server_s": sum(server.values()),
        **{f"server_{part}_s": v for part, v in server.items()},
        "upload_bytes": statistics.median(up[i] for i in survivors),
        "download_bytes": statistics.median(down[i] for i in survivors),
        "upload_over_plaintext": statistics.median(up[i] for i in survivors) / (4 * d),
        "max_error": error,
        "error_bound": res.error_bound,
        "ok": ok,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over repeats; ok only if every round was."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, bool):
            out[key] = all(r[key] for r in runs)
        elif key in ("k", "t", "dropped"):
            out[key] = value
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def main() -> None:
    """Parse arguments, run the rounds, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument(
        "--dropouts", default="0,0.1,0.3", help="comma-separated fractions dropping after sharing"
    )
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--design-dropout",
        type=float,
        default=None,
        help="dropout rate k and t are chosen for (default: max(p, 0.1) per row)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows (and every repeat) to this JSON file")
    args = parser.parse_args()
    dropouts = [float(v) for v in args.dropouts.split(",") if v.strip()]
    n, d = args.clients, args.dim

    run_round(4, 16, 0.0, args.clip, 0.1, seed=12345)  # warm-up: imports, first calls
    print(
        f"SecAgg+ core, n={n}, d={d:,}, clip={args.clip}, 32-bit ring, unsigned mode, "
        f"{CORRUPT_FRACTION:.0%} corrupt tolerated; python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; "
        f"median of {args.repeats}"
    )
    head = [
        "n",
        "d",
        "k",
        "t",
        "dropout",
        "client s median",
        "client s max",
        "keys+shares / mask / unmask s",
        "server s",
        "relay / sum / finish s",
        "upload B/client",
        "download B/client",
        "upload / plaintext",
        "ok",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for p in dropouts:
        design = args.design_dropout if args.design_dropout is not None else max(p, 0.1)
        t0 = time.perf_counter()
        runs = [
            run_round(n, d, p, args.clip, design, seed=args.seed + rep)
            for rep in range(args.repeats)
        ]
        row = summarize(runs)
        row.update({"n": n, "d": d, "dropout": p, "design_dropout": design, "runs": runs})
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        cells = [
            str(n),
            f"{d:,}",
            str(row["k"]),
            str(row["t"]),
            f"{p:.0%} ({row['dropped']})",
            f"{row['client_s_median']:.3f}",
            f"{row['client_s_max']:.3f}",
            " / ".join(f"{row[f'client_{s}_s_median']:.3f}" for s in STAGES),
            f"{row['server_s']:.3f}",
            " / ".join(f"{row[f'server_{s}_s']:.3f}" for s in ("relay", "sum", "finish")),
            f"{row['upload_bytes']:,.0f}",
            f"{row['download_bytes']:,.0f}",
            f"{row['upload_over_plaintext']:.4f}x",
            "ok" if row["ok"] else f"FAIL ({row['max_error']:.2e} > {row['error_bound']:.2e})",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
        print(f"  ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    print(
        "\nclient s: one surviving client's compute over all its stages (median / max over "
        "survivors);\nkeys+shares / mask / unmask: per-stage medians. dropout: fraction (count) "
        "of clients dropping after key sharing;\nk, t chosen for dropout_rate="
        + (f"{args.design_dropout}" if args.design_dropout is not None else "max(p, 0.1)")
        + f", corrupt_fraction={CORRUPT_FRACTION}. Bytes: record values (bytes by length, "
        "ints/floats 8 B, bools 1 B)\nplus the masked vector; upload / plaintext: over 4*d "
        "bytes of a float32 update."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
