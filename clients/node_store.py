"""A node's own store: its state (``context.state``: FedSA-LoRA's personal B and head, Fed-SB's
fixed factors, its drifted base and base version, its sample-level DP accountant history, its
ranks) saved after each message of a round, so that a new Flower run that resumes the experiment
finds it. It lives with the node, never in the server's checkpoint: the node config's
``state-dir`` on a SuperNode, else, when the nodes share the run directory (``base-changes =
"run-dir"``, as in simulation), ``RUN_DIR/nodes/<partition id>``.

One file per round, ``round-{t}.safetensors``: the array records as tensors
(``record/key``), the config records as JSON in its metadata. A node whose state is empty (a
fresh run) or ahead of the message (a snapshot of a round the server did not finish) loads the
newest snapshot before the message's round (for a train message; up to it for an evaluate
message; up to the query's ``held-round`` for a rank query) and deletes the newer ones: the node
goes on from the round the server resumes at.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from safetensors import safe_open

from fedlora.config import ServerAppSettings
from fedlora.run_records.atomic_files import save_tensors_atomic
from fedlora.wire.messages import PARTITION_ID_KEY

STATE_DIR_KEY = "state-dir"
"""Node-config key of the directory that keeps the node's state across runs."""
NODES_DIR = "nodes"
STORE_ROUND_RECORD = "fedlora.store-round"
CONFIG_METADATA = "config_records"
ARRAYS_METADATA = "array_records"


class NodeStore:
    """The snapshots of one node's state, by round."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory, self.keep = directory, keep

    @classmethod
    def of(cls, context: Context, run_config: Mapping, keep: int) -> NodeStore | None:
        """The node's store (`STATE_DIR_KEY`, else ``RUN_DIR/nodes/<partition id>`` when the
        nodes share the run directory); None when it has none."""
        if STATE_DIR_KEY in context.node_config:
            return cls(Path(str(context.node_config[STATE_DIR_KEY])), keep)
        settings = ServerAppSettings.from_flower(run_config)
        if settings.run_dir and settings.base_changes == "run-dir":
            partition = str(context.node_config[PARTITION_ID_KEY])
            return cls(Path(settings.run_dir) / NODES_DIR / partition, keep)
        return None

    def rounds(self) -> list[int]:
        return sorted(int(p.stem.removeprefix("round-")) for p in self.directory.glob("round-*"))

    def path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round}.safetensors"

    def before(self, context: Context, newest: int | None) -> None:
        """Bring the node's state to round ``newest`` at most (None: any) when it is fresh or
        ahead: load the newest snapshot up to it, delete the ones after it."""
        held = stored_round(context)
        stale = held is not None and newest is not None and held > newest
        if held is not None and not stale:
            return
        candidates = [t for t in self.rounds() if newest is None or t <= newest]
        for ahead in self.rounds():
            if newest is not None and ahead > newest:
                self.path(ahead).unlink()
        state = load_state(self.path(candidates[-1])) if candidates else RecordDict()
        for name in list(context.state.keys()):
            del context.state[name]
        for name, record in state.items():
            context.state[name] = record

    def after(self, context: Context, server_round: int) -> None:
        """Save the node's state as of ``server_round``; keep the newest `keep` snapshots."""
        context.state[STORE_ROUND_RECORD] = ConfigRecord({"round": server_round})
        save_state(self.path(server_round), context.state)
        for old in self.rounds()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)


def stored_round(context: Context) -> int | None:
    """The round the node's state is as of (None for a fresh state)."""
    record = context.state.config_records.get(STORE_ROUND_RECORD)
    return None if record is None else int(record["round"])


def save_state(path: Path, state: RecordDict) -> None:
    tensors = {
        f"{name}/{key}": tensor
        for name, record in state.array_records.items()
        for key, tensor in record.to_torch_state_dict().items()
    }
    configs = {name: dict(record) for name, record in state.config_records.items()}
    metadata = {
        CONFIG_METADATA: json.dumps(configs),
        ARRAYS_METADATA: json.dumps(sorted(state.array_records)),
    }
    save_tensors_atomic(path, tensors, metadata)


def load_state(path: Path) -> RecordDict:
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        configs = json.loads(metadata[CONFIG_METADATA])
        arrays: dict[str, dict] = {name: {} for name in json.loads(metadata[ARRAYS_METADATA])}
        for key in file.keys():  # noqa: SIM118 - safe_open is not a mapping
            name, inner = key.split("/", 1)
            arrays.setdefault(name, {})[inner] = file.get_tensor(key)
    records = {name: ConfigRecord(values) for name, values in configs.items()}
    records.update({name: ArrayRecord(tensors) for name, tensors in arrays.items()})
    return RecordDict(records)
