"""Baselines of a recipe's federation on the same task, in this process (no Flower, no Ray).

- ``pretrained``: the base model without fine-tuning.
- ``centralized``: one LoRA model (the top rank) trained on the pooled train splits of all the
  recipe's clients with the federation's total steps and examples: in each of the
  ``num-server-rounds`` rounds, training clients x ``local-steps`` steps of ``batch-size``
  examples (training clients: ``fraction-train`` of the clients, at least ``min-train-nodes``),
  the warm-up scaled alike, so the learning-rate schedule spans the same share of training.
- ``local-only``: each client trains its own LoRA model (its rank) alone on its train split, for
  the steps and at the learning rates it has in the federation, without any aggregation; the
  results are the mean and the standard deviation (population) over the clients.

Each is evaluated as the server evaluates the global model: loss and accuracy on its held-out set
(`fedlora.training.local.evaluate`) and, for instruction data, the generation score
(`fedlora.training.generation_eval`). ``results.csv`` has one row per baseline.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import datasets

from fedlora.config import RunConfig
from fedlora.data.encoding import is_instruction_data
from fedlora.data.partitioning import client_data, server_eval_set
from fedlora.models.base_model import BaseModel, load_base_model, with_lora
from fedlora.training.generation_eval import GenerationEvaluation
from fedlora.training.local import (
    client_seed,
    device_for,
    evaluate,
    set_torch_threads,
    train_round,
)
from simulations.recipes import Recipe

BASELINES = ("pretrained", "centralized", "local-only")
BASELINES_CSV = "results.csv"
SCORES = ("accuracy", "loss", "generation")
RESULT_COLUMNS = (
    "baseline",
    "clients",
    "steps",
    *(f"{score}{suffix}" for score in SCORES for suffix in ("", "_std")),
    "generation_metric",
    "seconds",
)
"""results.csv: each score and its standard deviation over clients (local-only; else empty);
``steps``: optimizer steps of one model (local-only: of each client's)."""


def training_clients(config: RunConfig, num_clients: int) -> int:
    """How many clients train in a round: ``fraction-train`` of them, at least
    ``min-train-nodes``, at most all."""
    return min(num_clients, max(config.min_train_nodes, int(config.fraction_train * num_clients)))


class Baselines:
    """The recipe's base model, held-out set and scoring, shared by the baselines."""

    def __init__(self, recipe: Recipe) -> None:
        self.config = recipe.run_config
        self.num_clients = recipe.simulation.num_supernodes
        set_torch_threads(self.config)
        self.device = device_for(self.config)
        self.base: BaseModel = load_base_model(self.config)
        self.held_out = server_eval_set(self.config)
        self.generation = None
        if is_instruction_data(self.held_out, self.config.task):
            generating = dataclasses.replace(
                self.config,
                generation_every=self.config.generation_every or self.config.evaluate_every,
            )
            self.generation = GenerationEvaluation(generating, self.held_out, self.base.tokenizer)

    def scores(self, model) -> dict[str, float | None]:
        model = model.to(self.device)
        report = evaluate(model, self.held_out, self.base.tokenizer, self.config, self.device)
        generated = self.generation(model).value if self.generation else None
        return {"accuracy": report.accuracy, "loss": report.loss, "generation": generated}

    def pretrained(self) -> tuple[dict, int]:
        return self.scores(self.base.model), 0

    def centralized(self) -> tuple[dict, int]:
        clients = training_clients(self.config, self.num_clients)
        pooled = datasets.concatenate_datasets(
            [client_data(self.config, p, self.num_clients).train for p in range(self.num_clients)]
        )
        config = dataclasses.replace(
            self.config,
            local_steps=clients * self.config.local_steps,
            warmup_steps=clients * self.config.warmup_steps,
        )
        model = self.lora(self.config.max_rank)
        for server_round in range(1, config.num_server_rounds + 1):
            seed = client_seed(config.seed, -1, server_round)
            train_round(model, pooled, self.base.tokenizer, config, self.device, seed, server_round)
        return self.scores(model), config.num_server_rounds * config.local_steps

    def local_only(self) -> list[dict]:
        results = []
        for partition_id in range(self.num_clients):
            train = client_data(self.config, partition_id, self.num_clients).train
            model = self.lora(self.config.rank_for(partition_id, self.num_clients))
            for server_round in range(1, self.config.num_server_rounds + 1):
                seed = client_seed(self.config.seed, partition_id, server_round)
                train_round(
                    model, train, self.base.tokenizer, self.config, self.device, seed, server_round
                )
            results.append(self.scores(model))
        return results

    def lora(self, rank: int):
        return with_lora(
            self.base,
            rank,
            self.config.lora_alpha,
            self.config.rslora,
            self.config.target_module_names,
            self.config.head_module_names,
            device=self.device,
            seed=self.config.seed,
        )


def run_baselines(
    recipe: Recipe, out_dir: str | Path, on_result: Callable[[dict], None] | None = None
) -> list[dict]:
    """Run the three baselines of ``recipe``; write ``out_dir/results.csv``; return its rows."""
    baselines = Baselines(recipe)
    metric = baselines.generation.metric if baselines.generation else None
    rows = []
    for name in BASELINES:
        start = time.perf_counter()
        if name == "local-only":
            per_client = baselines.local_only()
            row = {"clients": len(per_client), "steps": steps_of_each_client(recipe.run_config)}
            row |= spread(per_client)
        else:
            scores, steps = getattr(baselines, name)()
            row = {"clients": baselines.num_clients, "steps": steps, **scores}
        row = {"baseline": name, **row, "generation_metric": metric}
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if on_result is not None:
            on_result(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / BASELINES_CSV).open("w", newline="") as file:
        writer = csv.DictWriter(file, RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def steps_of_each_client(config: RunConfig) -> int:
    return config.num_server_rounds * config.local_steps


def spread(results: list[dict]) -> dict[str, float | None]:
    """Each score's mean and population standard deviation over the clients (None if absent)."""
    row = {}
    for score in SCORES:
        values = [result[score] for result in results if result[score] is not None]
        row[score] = statistics.fmean(values) if values else None
        row[f"{score}_std"] = statistics.pstdev(values) if values else None
    return row
