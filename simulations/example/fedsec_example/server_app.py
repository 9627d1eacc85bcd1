"""fedsec_example: the ServerApp, written as Flower's quickstart-pytorch writes it.

Plain Flower runs ``FedAvg``; with any server-side fedsec part the strategy is
``FedSecStrategy``, configured where it is created. Each part sits between
``# fedsec: <part>`` and ``# end fedsec`` (tests/test_worked_example.py counts
those lines).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from fedsec import Collusion, FedSecStrategy, SecureAggregation, SignatureFilter, load_registry
from fedsec.aggregation import make
from fedsec_example.client_app import parts_from_env
from fedsec_example.task import load_test_data, new_model
from fedsec_example.task import test as test_fn

#: Run settings (``[tool.flwr.app.config]`` under ``flwr run``; defaults otherwise).
DEFAULTS: dict[str, Any] = {"num-server-rounds": 8, "fraction-evaluate": 0.5, "lr": 0.1}
#: Parts that change the server side (the others live in the ClientApp only).
SERVER_PARTS = frozenset({"robust-rule", "secure-aggregation", "signed-replies"})


def make_strategy(
    parts: frozenset[str],
    fraction_evaluate: float,
    keys_dir: str | Path,
    collusion: Collusion | None = None,
) -> Strategy:
    """Flower's FedAvg, or FedSecStrategy with the server-side ``parts``."""
    if not parts & SERVER_PARTS and collusion is None:
        return FedAvg(fraction_evaluate=fraction_evaluate)
    options: dict[str, Any] = {"rule": make("mean"), "filters": []}
    # fedsec: robust-rule
    if "robust-rule" in parts:
        options["rule"] = make("geometric-median")
    # end fedsec
    # fedsec: secure-aggregation
    if "secure-aggregation" in parts:
        options["secure"] = SecureAggregation(bucket_size=2, clip=1.0)
    # end fedsec
    # fedsec: signed-replies
    if "signed-replies" in parts:
        options["filters"].append(SignatureFilter(load_registry(keys_dir)))
    # end fedsec
    # fedsec: collusion
    if collusion is not None:
        options["filters"].append(collusion.server_filter())
    # end fedsec
    strategy: Strategy = FedSecStrategy(fraction_evaluate=fraction_evaluate, **options)
    return strategy


def make_server_app(
    parts: frozenset[str] = frozenset(),
    *,
    keys_dir: str | Path = "keys",
    collusion: Collusion | None = None,
    on_result: Callable[[Result, Strategy], None] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> ServerApp:
    """The ServerApp with the fedsec ``parts`` switched on (none: plain FedAvg).

    ``on_result`` gets the strategy's result and the strategy when the rounds
    are over; ``settings`` override the run config (``run_simulation`` has none).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Main entry point for the ServerApp."""
        config = {**DEFAULTS, **context.run_config, **(settings or {})}
        strategy = make_strategy(parts, float(config["fraction-evaluate"]), keys_dir, collusion)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(new_model(parts).state_dict()),
            train_config=ConfigRecord({"lr": float(config["lr"])}),
            num_rounds=int(config["num-server-rounds"]),
            evaluate_fn=global_evaluate(parts),
        )
        if on_result is not None:
            on_result(result, strategy)

    return app


def global_evaluate(parts: frozenset[str]) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Evaluate the global model on the server's held-out test set."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = new_model(parts)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test_fn(model, load_test_data())
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    return evaluate


# Flower ServerApp (``flwr run``): the parts named in the environment, none by default.
app = make_server_app(parts_from_env())
