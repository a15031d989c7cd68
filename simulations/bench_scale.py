"""``fedlora bench scale``: a federation of many clients, few sampled a round, round by round:
the server process's resident memory as each round ends and the round's seconds.

The default recipe (`scale.toml`) has 1000 clients of the tiny BERT, 10 sampled per round, 50
rounds. Memory should stay flat: what the server keeps grows with the rounds only where it must
(FedEx-LoRA's and FLoRA's change log is folded into a dense snapshot once its factors are larger,
`fedlora.lora.versioning.ChangeLog`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, parse_overrides, resolve
from simulations.run_dir import claim_run_dir
from simulations.runner import simulate

SCALE_RECIPE = RECIPES_DIR / "scale.toml"
MB = 2**20


def resident_mb() -> float:
    """This process's resident memory in MiB (Linux: ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def scale_benchmark(
    recipe_path: str | Path = SCALE_RECIPE,
    overrides=(),
    rounds: int | None = None,
    clients: int | None = None,
    out_dir: str | Path = "runs/bench-scale",
    say: Callable[[str], None] = lambda text: None,
) -> dict:
    """The recipe simulated into ``out_dir`` (an earlier benchmark's run there is replaced); one
        row per round: ``round``, ``rss_mb`` (this process, which runs the ServerApp, as the round's
        row is written) and ``seconds`` (the round's wall time). ``clients`` replaces the recipe's
    ``num-supernodes``."""
    overrides = parse_overrides(overrides)
    recipe = resolve(load_recipe(recipe_path), overrides, rounds=rounds)
    if clients is not None:
        settings = dataclasses.replace(recipe.simulation, num_supernodes=clients)
        recipe = dataclasses.replace(recipe, simulation=settings)
    run_dir = Path(out_dir).resolve()
    claim_run_dir(run_dir, overwrite=True)
    rows = []

    def on_round(row: dict) -> None:
        rows.append({"round": row["round"], "rss_mb": resident_mb(), "seconds": row["seconds"]})
        say(f"round {row['round']}: {rows[-1]['rss_mb']:.0f} MiB")

    simulate(recipe, out_dir=run_dir, on_round=on_round, overwrite=True)
    return {
        "setup": {
            "recipe": recipe.name,
            "overrides": overrides,
            "run": recipe.run,
            "simulation": recipe.simulation.table(),
        },
        "rounds": rows,
    }
