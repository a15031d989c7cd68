"""``fedlora bench simulate``: a recipe's round time split into client compute and framework overhead.

The recipe runs twice in one process, one client at a time both ways, with the same torch threads:

1. in Flower's simulation engine on Ray, one ClientApp at a time (``num-cpus`` = every core);
2. in a plain in-process loop over the same clients that does the same work with fedlora's own
   functions and no Flower: each client applies the rule's client step to a model of its rank,
   measures its probe responses, trains its local steps on the same seeded batches; the rule
   aggregates; each client applies the new global model and evaluates on its held-out split.

The loop's time is the client compute (plus the aggregation, timed apart); what the simulation
takes beyond it is the framework's overhead: Flower, Ray, serialization, rank queries. Both runs
report the clients' example-weighted held-out accuracy, which agree when the loop did the same
training. Round 1 of both includes building the model and the clients' data; the steady-state
figures are the means over the later rounds.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from clients.worker import Worker
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors, lora_scale
from fedlora.lora.probes import lora_probe_responses
from fedlora.lora.updates import ClientUpdate
from fedlora.lora.versioning import BaseCache
from fedlora.models.peft_io import apply_client_state, read_adapter, read_head
from fedlora.rules import RULES, AggregationRule, ClientSpec
from fedlora.rules.base import GlobalState
from fedlora.training.local import (
    client_seed,
    device_for,
    evaluate,
    set_torch_threads,
    train_round,
)
from simulations.recipes import (
    Recipe,
    SimulationSettings,
    load_recipe,
    machine_cpus,
    parse_overrides,
    resolve,
)
from simulations.run_dir import read_metrics
from simulations.runner import simulate
from strategies.server_app import make_strategy


def runs_in_plain_loop(rule: type[AggregationRule]) -> bool:
    """Whether the plain loop runs the method: clients that train and send whole LoRA factors
    and keep no node state (`AggregationRule.keeps_node_state`: FedSA-LoRA keeps B, Fed-SB its
    fixed factors, HetLoRA its pruned rank; FFA-LoRA freezes A and sends B alone)."""
    return not rule.keeps_node_state and rule.update_kind is LoRAFactors and rule.trains_A


RoundCallback = Callable[[str, int], None]
"""Called with ("simulation" or "plain loop", round) as each round ends."""


class PlainLoop:
    """The federation in one process without Flower: one worker, one drifted base, the rule."""

    def __init__(self, config: RunConfig, num_clients: int, rule: AggregationRule) -> None:
        self.config, self.num_clients, self.rule = config, num_clients, rule
        self.worker = Worker(config)
        self.cache = BaseCache()
        initial = self.worker.lora_model(config.max_rank).pristine
        self.state: GlobalState = rule.init_state(initial.adapter, initial.head)
        self.client_seconds = 0.0

    def rank(self, partition_id: int) -> int:
        return self.config.rank_for(partition_id, self.num_clients)

    def receive(self, partition_id: int) -> torch.nn.Module:
        """The rule's client step on a model of the client's rank, as the ClientApp takes it."""
        config = self.config
        ranks = self.rule.client_ranks(self.rank(partition_id), self.state.modules, config.max_rank)
        if isinstance(ranks, int):
            ranks = dict.fromkeys(self.state.modules, ranks)
        spec = ClientSpec(
            ranks=ranks,
            scales={m: lora_scale(config.lora_alpha, r, config.rslora) for m, r in ranks.items()},
            version=self.cache.version,
            client=str(partition_id),
        )
        built = self.worker.lora_model(ranks)
        payload = self.rule.client_payload(self.state, spec)
        apply_client_state(built.model, self.rule.client_step(built.pristine, payload, self.cache))
        lora_probe_responses(built.model, config.seed)
        return built.model

    def train(self, partition_id: int, server_round: int) -> ClientUpdate:
        config, worker = self.config, self.worker
        model = self.receive(partition_id)
        data = worker.data(partition_id, self.num_clients)
        seed = client_seed(config.seed, partition_id, server_round)
        train_round(
            model, data.train, worker.base.tokenizer, config, worker.device, seed, server_round
        )
        return ClientUpdate(
            str(partition_id), len(data.train), read_adapter(model), read_head(model)
        )

    def evaluate(self, partition_id: int) -> tuple[float, int]:
        """The client's held-out accuracy on the current global model, and its example count."""
        model = self.receive(partition_id)
        data = self.worker.data(partition_id, self.num_clients)
        report = evaluate(
            model, data.test, self.worker.base.tokenizer, self.config, self.worker.device
        )
        return report.accuracy, report.num_examples

    def round(self, server_round: int) -> dict:
        """Every client trains, the rule aggregates, every client evaluates; seconds per part."""
        start = time.perf_counter()
        updates = [self.train(pid, server_round) for pid in range(self.num_clients)]
        trained = time.perf_counter()
        self.state = self.rule.aggregate(self.state, updates).state
        aggregated = time.perf_counter()
        evaluations = [self.evaluate(pid) for pid in range(self.num_clients)]
        done = time.perf_counter()
        examples = sum(n for _, n in evaluations)
        return {
            "client_seconds": (trained - start) + (done - aggregated),
            "aggregate_seconds": aggregated - trained,
            "client_accuracy": sum(a * n for a, n in evaluations) / max(examples, 1),
        }


def plain_loop_rounds(recipe: Recipe, on_round: RoundCallback | None = None) -> list[dict]:
    """Run the recipe's rounds in the plain loop; round 1 includes building the worker."""
    config = recipe.run_config
    if not runs_in_plain_loop(RULES[config.strategy]):
        plain = [name for name, rule in RULES.items() if runs_in_plain_loop(rule)]
        raise ConfigError(f"bench simulate runs strategies {plain}, not {config.strategy!r}")
    previous_threads = torch.get_num_threads()
    set_torch_threads(config)
    try:
        start = time.perf_counter()
        rule = make_strategy(config, base_store=None).rule
        loop = PlainLoop(config, recipe.simulation.num_supernodes, rule)
        setup_seconds = time.perf_counter() - start
        rows = []
        for server_round in range(1, config.num_server_rounds + 1):
            row = loop.round(server_round)
            if server_round == 1:
                row["client_seconds"] += setup_seconds
            rows.append(row)
            if on_round:
                on_round("plain loop", server_round)
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def one_client_at_a_time(recipe: Recipe) -> Recipe:
    """The recipe with every core given to each ClientApp, so Ray runs one at a time."""
    settings = dataclasses.replace(recipe.simulation, num_cpus=float(machine_cpus()))
    return dataclasses.replace(
        recipe, simulation=SimulationSettings(**dataclasses.asdict(settings))
    )


def simulate_benchmark(
    recipe_path: str | Path,
    overrides=(),
    rounds: int | None = None,
    on_round: RoundCallback | None = None,
) -> dict:
    """Both runs of the recipe; per round and steady-state seconds, overhead and accuracies."""
    overrides = parse_overrides(overrides)
    recipe = one_client_at_a_time(resolve(load_recipe(recipe_path), overrides, rounds=rounds))
    plain = plain_loop_rounds(recipe, on_round)
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as run_dir:
        simulated = read_metrics(
            simulate(
                recipe,
                out_dir=run_dir,
                on_round=(lambda row: on_round("simulation", row["round"])) if on_round else None,
            )
        )
    rows = [round_row(sim, loop) for sim, loop in zip(simulated, plain, strict=True)]
    config = recipe.run_config
    return {
        "setup": {
            "recipe": recipe.name,
            "overrides": overrides,
            "run": recipe.run,
            "strategy": config.strategy,
            "model": config.model,
            "clients": recipe.simulation.num_supernodes,
            "rounds": config.num_server_rounds,
            "torch_threads": config.num_threads,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "device": str(device_for(config)),
        },
        "rounds": rows,
        "steady": steady_state(rows),
    }


def round_row(simulated: dict, plain: dict) -> dict:
    plain_seconds = plain["client_seconds"] + plain["aggregate_seconds"]
    overhead = simulated["seconds"] - plain_seconds
    return {
        "round": simulated["round"],
        "simulation_seconds": simulated["seconds"],
        "plain_seconds": plain_seconds,
        "client_compute_seconds": plain["client_seconds"],
        "aggregate_seconds": plain["aggregate_seconds"],
        "overhead_seconds": overhead,
        "overhead_fraction": overhead / plain["client_seconds"],
        "simulation_client_accuracy": simulated["client_accuracy"],
        "plain_client_accuracy": plain["client_accuracy"],
    }


def steady_state(rows: list[dict]) -> dict:
    """Means over the rounds after the first (round 1 alone when there is no other)."""
    later = rows[1:] or rows
    keys = ("simulation_seconds", "plain_seconds", "client_compute_seconds", "overhead_seconds")
    means = {key: statistics.fmean(row[key] for row in later) for key in keys}
    means["overhead_fraction"] = means["overhead_seconds"] / means["client_compute_seconds"]
    means["rounds"] = [row["round"] for row in later]
    return means
