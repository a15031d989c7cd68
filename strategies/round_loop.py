"""The rounds of Flower's ``Strategy.start`` (train, evaluate, the server's end-of-round hook),
from any round on, so that a resumed run goes on where its checkpoint left off; the clients
evaluate only in the rounds that ``evaluates`` names."""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

EndOfRound = Callable[[int, ArrayRecord], object]
Evaluates = Callable[[int], bool]


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    timeout: float,
    end_of_round: EndOfRound,
    evaluates: Evaluates,
) -> None:
    """Rounds ``first_round``..``num_rounds`` as ``Strategy.start`` runs them, with the evaluate
    exchange in the rounds for which ``evaluates`` is true; ``end_of_round`` is called once
    before them (with ``first_round - 1``) and after each."""
    log(
        INFO,
        "Starting %s strategy at round %d of %d:",
        type(strategy).__name__,
        first_round,
        num_rounds,
    )
    strategy.summary()
    end_of_round(first_round - 1, arrays)
    for server_round in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=timeout
        )
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        if evaluates(server_round):
            replies = grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                timeout=timeout,
            )
            strategy.aggregate_evaluate(server_round, replies)
        end_of_round(server_round, arrays)
