"""``fedlora bench train``: the clients' training rate inside a simulated federation against the
plain LoRA loop at the batch the clients add up to, from one call on one device.

- ``plain_tokens_per_s``: one peft LoRA model trained at ``group`` x ``batch-size`` rows a step
  (`fedlora.bench.train.plain_throughput`) as the run's clients train (``base-dtype``,
  ``torch-compile``); ``mfu`` is its model FLOP utilisation; ``float32_tokens_per_s`` and
  ``float32_mfu`` the same loop with float32 weights and no compilation (the defaults), and
  ``speedup`` plain / float32;
- ``federation_tokens_per_s``: the recipe run in its engine (Flower's on Ray, or in process);
  over the rounds after the first, the clients' training tokens (clients x local steps x
  accumulation x batch-size x max-length) over the training exchange's wall time
  (``client_seconds`` + ``communication_seconds``: the slowest client's handling of its message
  and the rest of the exchange); ``round_tokens_per_s`` over whole rounds; ``first_round_seconds``
  and ``later_round_seconds`` (their mean) beside them;
- ``training_tokens_per_s``: the same tokens over the clients' training seconds: the seconds of
  the exchanges in which some client was training (``train_busy_seconds``: a group's steps, or
  clients training side by side on one GPU, count once); ``training_ratio`` = it / plain;
- ``grouped_tokens_per_s``: ``group`` clients trained together in one forward/backward per step
  (`fedlora.bench.train.grouped_throughput`), in this process;
- ``ratio`` = federation / plain, ``grouped_ratio`` = grouped / plain.

Without the federation (``federation=False``, ``--no-federation``) the figures are the
in-process loops' alone.

``group`` defaults to the clients that train together in the recipe: its ``group-size`` in the
in-process engine, the ClientApps that share a GPU on Ray (1 / ``num-gpus``), else 4 (at most the
recipe's clients).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from fedlora.bench.train import device_name, grouped_throughput, mfu, plain_throughput
from fedlora.errors import ConfigError
from fedlora.models.base_model import load_base_model
from fedlora.training.local import device_for
from simulations.recipes import Recipe, load_recipe, parse_overrides, resolve
from simulations.run_dir import claim_run_dir, read_metrics
from simulations.runner import simulate

DEFAULT_GROUP = 4
TIMED_STEPS = 40
"""Timed steps of each in-process loop: a step of the 0.4B model at 32 x 256 is about 0.1 s on an
H200 and bound by the host, so 10 steps (one second) left the plain loop's figure up to 31% apart
between two passes of the same settings (40: 4% and 22% apart in two calls)."""


def default_group(recipe: Recipe) -> int:
    settings = recipe.simulation
    share = settings.num_gpus
    if settings.engine == "in-process" and settings.group_size > 1:
        group = settings.group_size
    else:
        group = round(1 / share) if 0 < share < 1 else DEFAULT_GROUP
    return min(group, settings.num_supernodes)


def train_benchmark(
    recipe_path: str | Path,
    overrides=(),
    rounds: int | None = None,
    group: int | None = None,
    steps: int = TIMED_STEPS,
    warmup: int = 2,
    out_dir: str | Path = "runs/bench-train",
    say: Callable[[str], None] = lambda text: None,
    federation: bool = True,
) -> dict:
    """The figures of the module docstring, for the recipe with ``overrides``; with ``federation``
    off, the in-process loops' alone (no simulation, nothing written to ``out_dir``)."""
    overrides = parse_overrides(overrides)
    recipe = resolve(load_recipe(recipe_path), overrides, rounds=rounds)
    config = recipe.run_config
    group = group or default_group(recipe)
    partitions = recipe.simulation.num_supernodes
    if not 1 <= group <= partitions:
        raise ConfigError(f"--group {group}: choose 1 to the recipe's {partitions} clients")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps}, --warmup {warmup}: need 1 or more and 0 or more")
    if federation:  # a taken --out is refused before any work
        claim_run_dir(Path(out_dir).resolve(), overwrite=True)
    device = device_for(config)
    base = load_base_model(config)
    parameters = sum(parameter.numel() for parameter in base.model.parameters())
    rows = group * config.batch_size
    say("plain loop, float32 weights")
    defaults = replace(config, base_dtype="float32", torch_compile="none")
    float32 = plain_throughput(base, defaults, device, rows, partitions, steps, warmup)
    say("plain loop")
    plain = plain_throughput(base, config, device, rows, partitions, steps, warmup)
    say("grouped clients")
    grouped = grouped_throughput(base, config, device, group, partitions, steps, warmup)
    results = {
        "device": device_name(device),
        "plain_tokens_per_s": plain["tokens_per_s"],
        "mfu": plain["mfu"],
        "float32_tokens_per_s": float32["tokens_per_s"],
        "float32_mfu": float32["mfu"],
        "speedup": plain["tokens_per_s"] / float32["tokens_per_s"],
        "grouped_tokens_per_s": grouped["tokens_per_s"],
        "grouped_ratio": grouped["tokens_per_s"] / plain["tokens_per_s"],
        "grouped_mfu": grouped["mfu"],
        "setup": {
            "recipe": recipe.name,
            "overrides": overrides,
            "run": recipe.run,
            "simulation": recipe.simulation.table(),
            "group": group,
            "steps": steps,
            "warmup": warmup,
            "parameters": parameters,
            "torch": torch.__version__,
        },
        "plain": plain,
        "float32": float32,
        "grouped": grouped,
    }
    if not federation:
        return results
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    simulated = federation_throughput(recipe, Path(out_dir), say)
    return {
        **results,
        "federation_tokens_per_s": simulated["tokens_per_s"],
        "ratio": simulated["tokens_per_s"] / plain["tokens_per_s"],
        "training_tokens_per_s": simulated["training_tokens_per_s"],
        "training_ratio": simulated["training_tokens_per_s"] / plain["tokens_per_s"],
        "first_round_seconds": simulated["first_round_seconds"],
        "later_round_seconds": simulated["later_round_seconds"],
        "round_tokens_per_s": simulated["round_tokens_per_s"],
        "federation_mfu": mfu(parameters, simulated["tokens_per_s"], device_name(device)),
        "federation": simulated,
    }


def federation_throughput(recipe: Recipe, run_dir: Path, say: Callable[[str], None]) -> dict:
    """The recipe simulated into ``run_dir`` (an earlier benchmark's run there is replaced):
    training tokens per second of the training exchange and of whole rounds, after round 1."""
    config = recipe.run_config
    rows = read_metrics(
        simulate(
            recipe,
            out_dir=run_dir,
            on_round=lambda row: say(f"simulation: round {row['round']} done"),
            overwrite=True,
        )
    )
    if len(rows) < 2:
        raise ConfigError("the federation's rate is taken after round 1: run 2 rounds or more")
    later = rows[1:]
    per_client = (
        config.local_steps
        * config.gradient_accumulation_steps
        * config.batch_size
        * config.max_length
    )
    tokens = sum(row["clients"] * per_client for row in later)
    exchange = sum(row["client_seconds"] + row["communication_seconds"] for row in later)
    training = sum(row["train_busy_seconds"] for row in later)
    return {
        "tokens": tokens,
        "exchange_seconds": exchange,
        "tokens_per_s": tokens / exchange,
        "training_seconds": training,
        "training_tokens_per_s": tokens / training,
        "round_tokens_per_s": tokens / sum(row["seconds"] for row in later),
        "first_round_seconds": rows[0]["seconds"],
        "later_round_seconds": sum(row["seconds"] for row in later) / len(later),
        "rounds": [
            {
                key: row[key]
                for key in (
                    "round",
                    "clients",
                    "seconds",
                    "train_seconds",
                    "train_busy_seconds",
                    "client_seconds",
                    "communication_seconds",
                )
            }
            for row in rows
        ],
    }
