"""Every strategy for 3 rounds on the tiny BERT and the tiny Llama, with three nodes of LoRA ranks
2, 4 and 8: the run config and the checks that one run must pass, whichever grid carries it.

Exactness is measured by the clients (probe responses of the weights they run with), not by the
server: FedEx-LoRA, FLoRA and Fed-SB must stay within 1e-5 of the ideal model every round;
FedEx-LoRA and FLoRA run with half the nodes per round on the Llama.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flwr.app import MessageType

from fedlora.rules.legend import layer_index
from fedlora.wire.messages import A_SUFFIX, B_SUFFIX, CONFIG_RECORD, HEAD_RECORD, PARTITION_ID_KEY
from strategies import STRATEGIES
from strategies.records import serialized_bytes

NUM_NODES = 3
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
EXACT = {"fedex", "flora", "fedsb", "ffalora"}
PARTIAL = {("fedex", "tiny-llama"), ("flora", "tiny-llama")}
CASES = [(strategy, model) for model in ("tiny-bert", "tiny-llama") for strategy in STRATEGIES]


def case_id(case: tuple[str, str]) -> str:
    return "-".join(case)


def run_config(strategy: str, model: str) -> dict:
    """The run config of one case (Flower's kebab-case keys)."""
    task = "classification" if model == "tiny-bert" else "causal-lm"
    fraction = 0.5 if (strategy, model) in PARTIAL else 1.0
    return {**RUN, "strategy": strategy, "model": model, "task": task, "fraction-train": fraction}


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_partition(messages) -> dict[str, int]:
    """Serialized bytes of each message, by the partition id of its node."""
    return {
        str(int(m.content[CONFIG_RECORD][PARTITION_ID_KEY])): serialized_bytes(m.content)
        for m in messages
    }


def train_exchanges(grid) -> list[tuple[list, list]]:
    """(messages, replies) of each round's training, in round order."""
    return [
        (sent, replies)
        for sent, replies in grid.exchanges
        if sent and sent[0].metadata.message_type == MessageType.TRAIN
    ]


def check_run(strategy: str, model: str, run_dir: Path, grid) -> None:
    """What every case must show: three rounds of every node's rank, per-client bytes equal to
    the recorded messages, ordered timings, server or client accuracy, the export, and the
    exact rules within 1e-5 of the ideal model (FedSA-LoRA: no B and no head on the wire;
    FFA-LoRA: no A)."""
    rows = metrics_rows(run_dir)
    fraction = run_config(strategy, model)["fraction-train"]
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert not [reply for reply in grid.replies if reply.has_error()]
    assert all(row["clients"] == (2 if fraction < 1 else NUM_NODES) for row in rows)
    queries = [r for r in grid.replies if r.metadata.message_type.startswith(MessageType.QUERY)]
    ranks = {
        value
        for r in queries
        for key, value in r.content[CONFIG_RECORD].items()
        if key.startswith("rank.")
    }
    assert ranks == RANKS
    for row, (sent, replies) in zip(rows, train_exchanges(grid), strict=True):
        assert row["bytes_up_by_client"] == by_partition(replies)
        assert sum(row["bytes_down_by_client"].values()) == sum(
            serialized_bytes(m.content) for m in sent
        )
        assert len(row["bytes_down_by_client"]) == row["clients"]
        assert 0 < row["train_seconds"] <= row["client_seconds"] < row["seconds"]
        assert row["train_seconds"] <= row["train_busy_seconds"] + 1e-3 < row["seconds"], row
        assert row["communication_seconds"] >= 0 and row["aggregate_seconds"] > 0
    export = run_dir / "export"
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
    if strategy == "ffalora":
        for message in grid.sent + grid.replies:
            keys = [key for record in message.content.array_records.values() for key in record]
            assert not [key for key in keys if key.endswith(A_SUFFIX)]
    if strategy == "legend":
        check_legend_depths(grid)


def check_legend_depths(grid) -> None:
    """LEGEND: each node trains the modules of its depth (the rank-2 node fewer layers than the
    rank-8 one), at ranks that do not fall towards the output."""
    adapted = {}
    for _, replies in train_exchanges(grid):
        for reply in replies:
            config = reply.content[CONFIG_RECORD]
            ranks = {k[len("rank.") :]: v for k, v in config.items() if k.startswith("rank.")}
            adapted[max(ranks.values())] = ranks
    assert set(adapted) == RANKS
    assert set(adapted[2]) < set(adapted[8])
    top = adapted[8]
    by_layer = sorted((layer_index(m), r) for m, r in top.items())
    assert [r for _, r in by_layer] == sorted(r for _, r in by_layer)
