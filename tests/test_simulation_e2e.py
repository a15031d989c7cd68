"""Every strategy for 3 rounds in Flower's real simulation engine on Ray, on the tiny BERT and the
tiny Llama, with three nodes of LoRA ranks 2, 4 and 8.

The ServerApp is the project's own (`strategies.server_app.run`) on Flower's grid, wrapped to
record every message and reply; the ClientApp is `clients.app.client_app`. `run_simulation`
passes an empty run_config, so both apps are bound to the run config here. Exactness is measured
by the clients (probe responses of the weights they run with), not by the server: FedEx-LoRA,
FLoRA and Fed-SB must stay within 1e-5 of the ideal model every round; FedEx-LoRA and FLoRA run
with half the nodes per round on the Llama.
"""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import MessageType
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from clients.app import client_app
from fedlora.messages import B_SUFFIX, CONFIG_RECORD, HEAD_RECORD, PARTITION_ID_KEY
from strategies import STRATEGIES
from strategies.records import serialized_bytes
from strategies.server_app import run

pytestmark = pytest.mark.slow

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
RANKS = {2, 4, 8}
RUN = {
    "partitioner": "iid",
    "max-length": 32,
    "batch-size": 8,
    "local-steps": 2,
    "num-server-rounds": 3,
    "rank-profile": "2:0.3333334,4:0.3333333,8:0.3333333",
    "learning-rate": 0.01,
}
EXACT = {"fedex", "flora", "fedsb"}
PARTIAL = {("fedex", "tiny-llama"), ("flora", "tiny-llama")}
CASES = [(strategy, model) for model in ("tiny-bert", "tiny-llama") for strategy in STRATEGIES]


class RecordingGrid:
    """Flower's grid, with every message it sends and every reply it receives recorded."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.sent, self.replies, self.exchanges = [], [], []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        self.exchanges.append((messages, replies))
        return replies

    def train_exchanges(self) -> list[tuple[list, list]]:
        """(messages, replies) of each round's training, in round order."""
        return [
            (sent, replies)
            for sent, replies in self.exchanges
            if sent and sent[0].metadata.message_type == MessageType.TRAIN
        ]


def by_partition(messages) -> dict[str, int]:
    """Serialized bytes of each message, by the partition id of its node."""
    return {
        str(int(m.content[CONFIG_RECORD][PARTITION_ID_KEY])): serialized_bytes(m.content)
        for m in messages
    }


def simulate(config: dict, run_dir) -> tuple[list[dict], RecordingGrid]:
    recorded = []
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        recorded.append(RecordingGrid(grid))
        run(recorded[0], {**config, "run-dir": str(run_dir)})

    run_simulation(
        server_app=server, client_app=client_app(config), num_supernodes=3, backend_config=BACKEND
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, recorded[0]


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


@pytest.mark.parametrize(("strategy", "model"), CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_strategy_runs_three_rounds_on_ray(strategy, model, tmp_path):
    task = "classification" if model == "tiny-bert" else "causal-lm"
    fraction = 0.5 if (strategy, model) in PARTIAL else 1.0
    config = {**RUN, "strategy": strategy, "model": model, "task": task, "fraction-train": fraction}
    rows, grid = simulate(config, tmp_path)

    assert [row["round"] for row in rows] == [1, 2, 3]
    assert not [reply for reply in grid.replies if reply.has_error()]
    assert all(row["clients"] == (2 if fraction < 1 else 3) for row in rows)
    queries = [r for r in grid.replies if r.metadata.message_type.startswith(MessageType.QUERY)]
    ranks = {
        value
        for r in queries
        for key, value in r.content[CONFIG_RECORD].items()
        if key.startswith("rank.")
    }
    assert ranks == RANKS
    for row, (sent, replies) in zip(rows, grid.train_exchanges(), strict=True):
        assert row["bytes_up_by_client"] == by_partition(replies)
        assert sum(row["bytes_down_by_client"].values()) == sum(
            serialized_bytes(m.content) for m in sent
        )
        assert len(row["bytes_down_by_client"]) == row["clients"]
        assert 0 < row["train_seconds"] <= row["client_seconds"] < row["seconds"]
        assert row["communication_seconds"] >= 0 and row["aggregate_seconds"] > 0
    export = tmp_path / "export"
    if strategy == "fedsa":
        assert all(row["accuracy_source"] == "clients" for row in rows)
    else:
        assert all(row["accuracy_source"] == "server" for row in rows)
        assert all(0 <= row["accuracy"] <= 1 for row in rows)
        expected_classes = {"8"} if strategy in EXACT else {str(rank) for rank in RANKS}
        assert all(set(row["accuracy_by_rank"]) == expected_classes for row in rows)
        assert (export / "config.json").exists() or (export / "adapter_config.json").exists()
    deviations = [row["relative_deviation"] for row in rows]
    if strategy in EXACT:
        assert all(deviation < 1e-5 for deviation in deviations), deviations
    elif strategy == "fedsa":
        assert deviations == [None, None, None]
        for message in grid.sent + grid.replies:
            assert HEAD_RECORD not in message.content.array_records
            keys = [key for record in message.content.array_records.values() for key in record]
            assert not [key for key in keys if key.endswith(B_SUFFIX)]
    else:
        assert all(math.isfinite(deviation) for deviation in deviations)
