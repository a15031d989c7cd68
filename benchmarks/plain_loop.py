"""The plain LoRA loop of ``fedlora bench train`` (`fedlora.bench.train.plain_throughput`) under
several ``base-dtype`` / ``torch-compile`` (/ ``pack-sequences``) settings in one process, without
the federation: the first setting is the baseline of the ratios. One JSON line per setting, as
each finishes. A variant is ``DTYPE:COMPILE``, or ``DTYPE:COMPILE:pack`` for packed rows.

    python benchmarks/plain_loop.py --recipe multi-gpu --rows 16 batch-size=16 max-length=512 \\
        --variants float32:none,bfloat16:none,bfloat16:blocks,bfloat16:model,bfloat16:model:pack
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from fedlora.bench.train import device_name, plain_throughput
from fedlora.models.base_model import load_base_model
from fedlora.training.local import device_for
from simulations.recipe_files import recipe_file
from simulations.recipes import load_recipe, resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="multi-gpu")
    parser.add_argument("--rows", type=int, default=16, help="rows a step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="float32:none,bfloat16:none,bfloat16:model")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    recipe = resolve(load_recipe(recipe_file(args.recipe)), args.overrides)
    config = recipe.run_config
    device = device_for(config)
    base = load_base_model(config)
    baseline = None
    for variant in args.variants.split(","):
        dtype, compile_mode, *packed = variant.split(":")
        pack = packed == ["pack"]
        setting = replace(config, base_dtype=dtype, torch_compile=compile_mode, pack_sequences=pack)
        result = plain_throughput(
            base,
            setting,
            device,
            args.rows,
            recipe.simulation.num_supernodes,
            args.steps,
            args.warmup,
        )
        baseline = baseline or result["tokens_per_s"]
        line = {
            "device": device_name(device),
            "base_dtype": dtype,
            "torch_compile": compile_mode,
            "pack_sequences": pack,
            "width": config.max_length,
            **result,
            "vs_first": result["tokens_per_s"] / baseline,
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
