"""What a SuperNode's ``flwr-clientapp`` process imports (issue 17, item 6).

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, and
its first step is importing the module the app's entry point names
(``fedsec.client.app``). These tests import in a fresh interpreter and check
that nothing heavy comes with it, nor with what SecAgg's key and unmask
stages run, and that the lazy names still resolve. They check which modules
are loaded, never how long it took.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Never imported by the ClientApp entry module or by a key/unmask stage.
HEAVY = ("torch", "opacus", "sklearn", "scipy", "matplotlib", "ray", "pandas")


def _loaded_after(code: str) -> set[str]:
    """Top-level packages of HEAVY loaded after running ``code`` in a fresh interpreter."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_clientapp_entry_module_imports_nothing_heavy() -> None:
    assert _loaded_after("import fedsec.client.app") == set()


def test_flower_loads_the_entry_point_without_heavy_imports() -> None:
    # As flwr-clientapp does: resolve "module:attribute" from pyproject's components.
    code = (
        "import tomllib\n"
        "from flwr.supercore.object_ref import load_app\n"
        "ref = tomllib.load(open('pyproject.toml', 'rb'))['tool']['flwr']['app']"
        "['components']['clientapp']\n"
        "app = load_app(ref, ValueError, '.')\n"
        "from flwr.clientapp import ClientApp\n"
        "assert isinstance(app, ClientApp), type(app)"
    )
    assert _loaded_after(code) == set()


#: One message to the ClientApp in a fresh interpreter, as a SuperNode runs it: the
#: node's context state and the message's ConfigRecords come in, the reply's records,
#: the new state and the heavy packages loaded go out (pickled files).
_ONE_MESSAGE = f"""
import pickle, sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedsec.client.app import app
for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
    setattr(TaskIdentity, attr, value)  # messages built outside a Flower runtime need one
job = pickle.load(open(sys.argv[1], "rb"))
state = RecordDict({{k: ConfigRecord(v) for k, v in job["state"].items()}})
context = Context(run_id=1, node_id=job["node"], node_config=job["node_config"],
                  state=state, run_config={{}})
content = RecordDict({{k: ConfigRecord(v) for k, v in job["records"].items()}})
reply = app(Message(content, message_type=MessageType.TRAIN, dst_node_id=job["node"]), context)
pickle.dump({{
    "error": str(reply.error.reason) if reply.has_error() else None,
    "records": {{}} if reply.has_error() else {{
        k: dict(v) for k, v in reply.content.config_records.items()}},
    "state": {{k: dict(v) for k, v in context.state.config_records.items()}},
    "heavy": [m for m in {list(HEAVY)!r} if m in sys.modules],
}}, open(sys.argv[2], "wb"))
"""


def _message_in_fresh_process(
    tmp: Path, node: int, state: dict[str, Any], records: dict[str, Any]
) -> dict[str, Any]:
    job, out = tmp / f"job-{node}.pkl", tmp / f"out-{node}.pkl"
    job.write_bytes(
        pickle.dumps(
            {"node": node, "node_config": {"partition-id": node - 1}, "state": state,
             "records": records}
        )
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", _ONE_MESSAGE, str(job), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result: dict[str, Any] = pickle.loads(out.read_bytes())
    assert result["error"] is None, result["error"]
    return result


def test_secagg_key_and_unmask_stages_run_without_torch(tmp_path: Path) -> None:
    """A SecAgg round whose key and unmask stages each run in a fresh ClientApp process.

    Masked input (training) needs torch; it runs here, from the state the
    fresh processes left. The sum must come out right, and none of the fresh
    processes may have imported a heavy package.
    """
    import torch

    from fedsec.client.secagg_mod import SECAGG_KEY
    from fedsec.secagg.client import SecAggClient
    from fedsec.secagg.messages import AdvertiseKeysReply, ShareKeysReply, UnmaskReply
    from fedsec.secagg.server import SecAggParams, SecAggServer

    n, dim = 4, 8
    server = SecAggServer(
        SecAggParams.for_round(n, dim, clip=1.0, dropout_rate=0.0, corrupt_fraction=0.0),
        server_round=1,
    )
    states: dict[int, dict[str, Any]] = {cid: {} for cid in range(1, n + 1)}

    def stage(requests: dict[int, Any], reply_type: Any) -> dict[int, Any]:
        replies = {}
        for cid, request in requests.items():
            out = _message_in_fresh_process(
                tmp_path, cid, states[cid], {SECAGG_KEY: request.to_record()}
            )
            assert out["heavy"] == [], f"{request.stage} imported {out['heavy']}"
            states[cid] = out["state"]
            replies[cid] = reply_type.from_record(out["records"][SECAGG_KEY])
        return replies

    shares = stage(
        server.share_keys(stage(server.advertise_keys(), AdvertiseKeysReply)), ShareKeysReply
    )
    updates = {cid: torch.full((dim,), 0.1 * cid) for cid in states}
    masked = {}
    for cid, request in server.masked_input(shares).items():
        (slot,) = states[cid]
        client = SecAggClient.from_state(states[cid][slot])
        client.receive_shares(request)
        masked[cid] = client.mask(updates[cid])
        states[cid] = {slot: client.to_state()}
    result = server.finish(stage(server.unmask(masked), UnmaskReply))
    expected = sum(updates.values()) / n
    assert torch.allclose(result.aggregate, expected, atol=result.error_bound + 1e-6)


@pytest.mark.parametrize(
    "name", ["Hardware", "batch_cap", "client_partition", "local_train", "node_hardware"]
)
def test_training_side_names_stay_importable_from_the_app(name: str) -> None:
    import fedsec.client.app as app_module
    import fedsec.client.handlers as handlers

    assert getattr(app_module, name) is getattr(handlers, name)


def test_privacy_package_names_load_lazily() -> None:
    assert _loaded_after("import fedsec.privacy, fedsec.privacy.distributed") == set()
    import fedsec.privacy as privacy
    from fedsec.privacy.client_level import clip_update

    assert privacy.clip_update is clip_update
    with pytest.raises(AttributeError):
        _ = privacy.no_such_name  # type: ignore[attr-defined]


def test_rdp_orders_keep_opacus_default_grid() -> None:
    from opacus.accountants import RDPAccountant

    from fedsec.privacy.accounting import RDP_ORDERS

    default = [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
    assert list(RDP_ORDERS[: len(default)]) == default
    assert RDP_ORDERS[len(default) :] == (128.0, 256.0, 512.0, 1024.0)
