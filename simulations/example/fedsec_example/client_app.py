"""fedsec_example: the ClientApp, written as Flower's quickstart-pytorch writes it.

``@app.train`` and ``@app.evaluate`` are the user's own. fedsec adds nothing
but mods, configured where they are created; each part sits between
``# fedsec: <part>`` and ``# end fedsec`` (tests/test_worked_example.py counts
those lines). Order matters because Flower applies ``mods`` outermost first:
``signing`` signs what leaves the node, so it comes first; ``secagg_mod``
masks the update that ``local_dp`` privatized, so ``local_dp`` comes after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedsec import Collusion, enable_simulated_adversary, local_dp, secagg_mod, signing
from fedsec_example.task import load_data, new_model
from fedsec_example.task import test as test_fn
from fedsec_example.task import train as train_fn

#: Run settings (``[tool.flwr.app.config]`` under ``flwr run``; defaults otherwise).
DEFAULTS: dict[str, Any] = {"local-epochs": 2, "batch-size": 32, "lr": 0.1}


def _setting(context: Context, key: str) -> Any:
    return context.run_config.get(key, DEFAULTS[key])


def make_client_app(
    parts: frozenset[str] = frozenset(),
    *,
    keys_dir: str | Path = "keys",
    state_dir: str | Path | Callable[[Context], str | Path] = "state",
    collusion: Collusion | None = None,
) -> ClientApp:
    """The ClientApp with the fedsec ``parts`` switched on (none: plain Flower).

    ``keys_dir`` holds ``client-<partition-id>.pem`` (signed replies),
    ``state_dir`` the local-DP ledgers, ``collusion`` the simulation's
    colluding-attack component (the ``collusion`` part, on when given).
    """
    mods: list[Mod] = []
    masking: Mod = secagg_mod
    # fedsec: signed-replies
    if "signed-replies" in parts:
        mods.append(signing(key=lambda c: f"{keys_dir}/client-{c.node_config['partition-id']}.pem"))
    # end fedsec
    # fedsec: collusion
    if collusion is not None:
        enable_simulated_adversary()  # this process and the simulation workers it starts
        masking = collusion.client_mod(secagg_mod)
    # end fedsec
    # fedsec: secure-aggregation
    if "secure-aggregation" in parts:
        mods.append(masking)
    # end fedsec
    # fedsec: local-dp
    if "local-dp" in parts:
        privacy = local_dp(
            clip=10.0, noise_multiplier=5e-4, delta=1e-5, epsilon_budget=1e9, state_dir=state_dir
        )
        mods.append(privacy)
    # end fedsec
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Train the model on local data."""
        model = new_model(parts)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        trainloader, _ = load_data(partition_id, num_partitions, _setting(context, "batch-size"))
        metrics = train_fn(
            model,
            trainloader,
            _setting(context, "local-epochs"),
            float(msg.content["config"].get("lr", _setting(context, "lr"))),
            parts,
        )
        record = MetricRecord({**metrics, "num-examples": len(trainloader.dataset)})  # type: ignore[arg-type]
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": record})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Evaluate the model on local data."""
        model = new_model(parts)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
        _, valloader = load_data(partition_id, num_partitions, _setting(context, "batch-size"))
        eval_loss, eval_acc = test_fn(model, valloader)
        metrics = MetricRecord(
            {
                "eval_loss": eval_loss,
                "eval_acc": eval_acc,
                "num-examples": len(valloader.dataset),  # type: ignore[arg-type]
            }
        )
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def parts_from_env() -> frozenset[str]:
    """The parts named in ``FEDSEC_EXAMPLE_PARTS`` (comma-separated), for ``flwr run``."""
    return frozenset(
        p.strip() for p in os.environ.get("FEDSEC_EXAMPLE_PARTS", "").split(",") if p.strip()
    )


# Flower ClientApp (``flwr run``): the parts named in the environment, none by default.
app = make_client_app(parts_from_env())
