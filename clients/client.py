"""The client one message runs as: the run config as the node runs it (its node config's
capacity and data), this process's worker, the method's model step and the node's identity.

A node's config names it (``partition-id``, ``num-partitions``) and states its capacity, which
overrides the run config's for this node: ``lora-rank``, ``batch-size``, ``device``, and
``data-path``, its own data instead of its partition of the run's dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, UserConfigValue

from clients.fedsb import SBModelStep
from clients.node import saved_version
from clients.steps import LoRAModelStep
from clients.worker import Worker, worker_for
from fedlora.config import RunConfig, ServerAppSettings, without_server_app_keys
from fedlora.data.partitioning import ClientData
from fedlora.errors import ConfigError
from fedlora.lora.adapter import SBCore
from fedlora.method_config import parse_run_config
from fedlora.rules import AggregationRule, make_rule
from fedlora.training.local import client_seed, set_torch_threads
from fedlora.wire.messages import PARTITION_ID_KEY, VERSION_KEY

MODEL_STEPS = (LoRAModelStep, SBModelStep)
"""The kinds of model a method's client step runs on; the ClientApp answers their queries."""

NODE_RANK_KEY = "lora-rank"
"""Node-config key of a node's own LoRA rank (else the run's rank-profile decides)."""
NUM_PARTITIONS_KEY = "num-partitions"
NODE_RUN_KEYS = ("batch-size", "device")
"""Node-config keys a device sets for itself, over the run config's (its capacity)."""
DATA_PATH_KEY = "data-path"
"""Node-config key of a device's own data (any ``dataset`` spec: ``json:PATH``, a folder...), used
whole, no server share held out, instead of its partition of the run's dataset."""

BoundRunConfig = Mapping[str, UserConfigValue] | None
"""A run config bound to the app (Flower's kebab-case keys), or None to read the context's."""


@dataclass
class Client:
    """One message's view: the run config, the worker, the method and the node's identity."""

    config: RunConfig
    worker: Worker
    model_step: LoRAModelStep | SBModelStep
    partition_id: int
    num_partitions: int
    node_rank: int | None
    local_data: bool
    run_dir: Path | None = None
    """The run directory, where the run's shared splits may be (`fedlora.data.shared_splits`)."""

    @classmethod
    def for_message(cls, context: Context, run_config: BoundRunConfig) -> Client:
        """The client a message runs as: the run config parsed (the ServerApp's own keys left
        out), torch's threads set, this process's worker for it."""
        values = dict(context.run_config if run_config is None else run_config)
        config = node_run_config(
            parse_run_config(without_server_app_keys(values)),
            context.node_config,
        )
        set_torch_threads(config)
        worker = worker_for(config)
        node_rank = context.node_config.get(NODE_RANK_KEY)
        run_dir = ServerAppSettings.from_flower(values).run_dir
        return cls(
            config=config,
            worker=worker,
            model_step=model_step_for(worker, make_rule(config.strategy)),
            partition_id=int(context.node_config[PARTITION_ID_KEY]),
            num_partitions=int(context.node_config[NUM_PARTITIONS_KEY]),
            node_rank=None if node_rank is None else int(node_rank),
            local_data=DATA_PATH_KEY in context.node_config,
            run_dir=Path(run_dir) if run_dir else None,
        )

    def initial_rank(self) -> int:
        return self.config.rank_for(self.partition_id, self.num_partitions, self.node_rank)

    def seed(self, server_round: int) -> int:
        return client_seed(self.config.seed, self.partition_id, server_round)

    def identity(self, context: Context) -> dict[str, int]:
        return {PARTITION_ID_KEY: self.partition_id, VERSION_KEY: saved_version(context)}

    def data(self) -> ClientData:
        """The node's train and test splits: its local data, else its partition (from the run's
        shared splits where they are)."""
        if self.local_data:
            return self.worker.data(0, 1)
        return self.worker.data(self.partition_id, self.num_partitions, self.run_dir)


def node_run_config(config: RunConfig, node_config: Mapping[str, UserConfigValue]) -> RunConfig:
    """The run config as this node runs it: its own ``batch-size`` and ``device`` (`NODE_RUN_KEYS`)
    and its ``data-path``, whose examples are all its own (one IID partition, no server share)."""
    values = {key: node_config[key] for key in NODE_RUN_KEYS if key in node_config}
    if DATA_PATH_KEY in node_config:
        values.update(
            {
                "dataset": node_config[DATA_PATH_KEY],
                "partitioner": "iid",
                "server-eval-fraction": 0.0,
            }
        )
    if not values:
        return config
    try:
        overrides = RunConfig.from_flower(values)
    except ConfigError as error:
        raise ConfigError(f"node config: {error}") from None
    names = [key.replace("-", "_") for key in values]
    return dataclasses.replace(config, **{name: getattr(overrides, name) for name in names})


def model_step_for(worker: Worker, rule: AggregationRule) -> LoRAModelStep | SBModelStep:
    """LoRA-SB layers for a rule whose updates are Fed-SB's R, else peft LoRA models."""
    return SBModelStep(worker, rule) if rule.update_kind is SBCore else LoRAModelStep(worker, rule)
