"""A client-level DP federation of three nodes of ranks 2, 4 and 8 (tiny BERT, every node every
round) and what its run must show, whichever grid carries it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import MessageType
from opacus.accountants import create_accountant

from fedlora.privacy.client_level import UPDATE_NORM_KEY
from fedlora.rules import RULES
from fedlora.wire.messages import (
    A_SUFFIX,
    ADAPTER_RECORD,
    B_SUFFIX,
    CONFIG_RECORD,
    HEAD_RECORD,
    METRICS_RECORD,
    scale_key,
)

CLIP, SIGMA, ROUNDS = 0.05, 0.3, 2
RUN = {
    "model": "tiny-bert",
    "partitioner": "iid",
    "max-length": 32,
    "batch-size": 8,
    "local-steps": 2,
    "num-server-rounds": ROUNDS,
    "rank-profile": "2:0.3333334,4:0.3333333,8:0.3333333",
    "learning-rate": 0.01,
    "dp-client": True,
    "dp-client-clip": CLIP,
    "dp-client-noise-multiplier": SIGMA,
    "dp-client-noise-seed": 0,
}


def sent_update_norm(message, reply, scale_power: float = 0.5) -> float:
    """||f (sent - received)|| over the reply's adapter and head, f = s ** ``scale_power`` for
    LoRA factors (the rule's ``dp_scale_power``: sqrt(s), FFA-LoRA's s)."""
    config = reply.content[CONFIG_RECORD]
    squared = 0.0
    for name in (ADAPTER_RECORD, HEAD_RECORD):
        if name not in reply.content.array_records:
            continue
        received = dict(message.content.array_records[name].to_torch_state_dict())
        for key, t in reply.content.array_records[name].to_torch_state_dict().items():
            fold = 1.0
            if key.endswith((A_SUFFIX, B_SUFFIX)):
                module = key.removesuffix(A_SUFFIX).removesuffix(B_SUFFIX)
                fold = float(config[scale_key(module)]) ** scale_power
            squared += float((fold * (t.double() - received[key].double())).pow(2).sum())
    return math.sqrt(squared)


def check_client_level_dp(strategy: str, run_dir: Path, grid) -> None:
    """Every train reply's update has norm <= C though the clients' own exceeded it, and each
    round's epsilon is a fresh RDP accountant's after that round's releases (q = 1; Fed-SB's
    initialisation is one more)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    assert not [reply for reply in grid.replies if reply.has_error()]
    train = [
        (message, reply)
        for sent, replies in grid.exchanges
        for message in sent
        for reply in replies
        if message.metadata.message_type == MessageType.TRAIN
        and reply.metadata.src_node_id == message.metadata.dst_node_id
    ]
    assert len(train) == 3 * ROUNDS
    power = RULES[strategy].dp_scale_power
    norms = [sent_update_norm(message, reply, power) for message, reply in train]
    assert max(norms) <= CLIP * (1 + 1e-5), norms
    before = [float(r.content[METRICS_RECORD][UPDATE_NORM_KEY]) for _, r in train]
    assert max(before) > CLIP
    assert all(0 < row["client_dp_clipped"] <= 1 for row in rows)
    initialisation = 1 if strategy == "fedsb" else 0
    for row in rows:
        fresh = create_accountant("rdp")
        for _ in range(row["round"] + initialisation):
            fresh.step(noise_multiplier=SIGMA, sample_rate=3 / 3)
        assert row["client_dp_epsilon"] == pytest.approx(
            fresh.get_epsilon(delta=1e-5), rel=0, abs=1e-6
        )
    assert all(row["relative_deviation"] is None for row in rows)
