"""The learning rate of each optimizer step over a federated run.

A client's steps are numbered across the run: step s (1-based) of round t is run step
(t - 1) * local-steps + s, and the run has T = rounds * local-steps of them. The rate is
learning-rate times a multiplier: s / W during the first W = ``warmup-steps`` steps (reaching the
full rate at step W); afterwards 1 (``constant``) or (T - s + 1) / (T - W), falling linearly from 1
at step W + 1 to 1 / (T - W) at the last step (``linear``: it would be 0 one step later).
"""

from __future__ import annotations

LR_SCHEDULES = ("constant", "linear")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the learning rate at run step ``step`` (1-based) of ``total_steps``."""
    if step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step + 1) / max(total_steps - warmup_steps, 1))


def round_learning_rates(
    learning_rate: float,
    server_round: int,
    local_steps: int,
    num_server_rounds: int,
    warmup_steps: int,
    schedule: str,
) -> list[float]:
    """The rates of a client's ``local_steps`` steps in round ``server_round`` (1-based; round 0,
    a step before the rounds, counts as round 1)."""
    first = (max(server_round, 1) - 1) * local_steps
    total = num_server_rounds * local_steps
    return [
        learning_rate * lr_multiplier(first + s, total, warmup_steps, schedule)
        for s in range(1, local_steps + 1)
    ]
