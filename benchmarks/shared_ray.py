"""`fedlora compare`'s wall time with one Ray instance shared by its runs (`simulations.shared_ray`)
against a Ray started by each run, alternating, in one process; prints one JSON line per call and
the medians.

    python benchmarks/shared_ray.py --recipe tiny --strategies fedavg,fedex,flora --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

from simulations import compare as compare_module
from simulations.recipe_files import recipe_file


@contextlib.contextmanager
def ray_per_run(settings, runs):
    yield ""


def timed_compare(args, shared: bool) -> float:
    original = compare_module.shared_ray
    compare_module.shared_ray = original if shared else ray_per_run
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            compare_module.compare(
                recipe_file(args.recipe), args.strategies.split(","), out, rounds=args.rounds
            )
            return time.perf_counter() - start
    finally:
        compare_module.shared_ray = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--strategies", default="fedavg,fedex,flora")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    seconds = {"shared": [], "per_run": []}
    for _ in range(args.repeats):
        for way in ("per_run", "shared"):
            seconds[way].append(timed_compare(args, shared=way == "shared"))
            print(json.dumps({"way": way, "seconds": seconds[way][-1]}), flush=True)
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    print(
        json.dumps(
            {
                **medians,
                "saved_per_run": (medians["per_run"] - medians["shared"])
                / (len(args.strategies.split(",")) - 1),
            }
        )
    )


if __name__ == "__main__":
    main()
