"""The fedsec ClientApp: local training and evaluation on the client's partition.

The server sends the validated experiment config with every message (as JSON
under ``fedsec-config``), so a client needs nothing but its node config:
``partition-id`` (which Flower's simulation engine sets, and a SuperNode gets
from ``--node-config``). Replies carry the trained model in the ArrayRecord
``arrays`` and ``num-examples`` plus metrics in the MetricRecord ``metrics``.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsec.config import WIRE_CONFIG_KEY, ExperimentConfig, parse_config
from fedsec.data import client_dataset, load_dataset
from fedsec.models import make_model
from fedsec.training import evaluate, resolve_device, train

app = ClientApp()


def config_from_message(msg: Message) -> ExperimentConfig:
    """Parse and validate the experiment config the server sent.

    Raises
    ------
    ValueError
        If the message carries no config or an invalid one.
    """
    config_record = msg.content.config_records.get("config")
    if config_record is None or WIRE_CONFIG_KEY not in config_record:
        raise ValueError(f"message carries no '{WIRE_CONFIG_KEY}' config")
    return parse_config(json.loads(str(config_record[WIRE_CONFIG_KEY])))


def partition_id_of(context: Context, cfg: ExperimentConfig) -> int:
    """This node's partition, checked against the configured number of clients."""
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no 'partition-id' (set it with --node-config)")
    partition_id = int(context.node_config["partition-id"])
    if not 0 <= partition_id < cfg.data.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {cfg.data.num_clients}) (data.num_clients)"
        )
    return partition_id


def _local_setup(
    msg: Message, context: Context
) -> tuple[ExperimentConfig, int, torch.nn.Module, torch.Tensor, torch.Tensor, torch.device]:
    cfg = config_from_message(msg)
    partition_id = partition_id_of(context, cfg)
    data = load_dataset(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)
    x, y = client_dataset(
        data,
        partition_id,
        cfg.data.num_clients,
        cfg.data.partition,
        seed=cfg.experiment.seed,
        alpha=cfg.data.alpha,
        shards_per_partition=cfg.data.shards_per_client,
    )
    model = make_model(cfg.model.name, data.info.input_shape, data.info.num_classes)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return cfg, partition_id, model, x, y, resolve_device(cfg.experiment.device)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition."""
    cfg, partition_id, model, x, y, device = _local_setup(msg, context)
    server_round = msg.content.config_records["config"].get("server-round", 0)
    if not isinstance(server_round, int):
        raise ValueError(f"'server-round' must be an integer, got {server_round!r}")
    result = train(
        model,
        x,
        y,
        epochs=cfg.client.local_epochs,
        batch_size=cfg.client.batch_size,
        optimizer=cfg.client.optimizer,
        lr=cfg.client.lr,
        momentum=cfg.client.momentum,
        weight_decay=cfg.client.weight_decay,
        device=device,
        # Distinct, reproducible shuffling per client and round.
        seed=cfg.experiment.seed * 1_000_003 + server_round * 10_007 + partition_id,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "train_loss": result.loss,
                    "train_accuracy": result.accuracy,
                    "num-examples": result.num_examples,
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local partition."""
    _, _, model, x, y, device = _local_setup(msg, context)
    result = evaluate(model, x, y, device=device)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "eval_loss": result.loss,
                    "eval_accuracy": result.accuracy,
                    "num-examples": result.num_examples,
                }
            )
        }
    )
    return Message(content=content, reply_to=msg)
