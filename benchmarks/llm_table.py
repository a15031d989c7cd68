"""Every strategy on the BBC instruction tasks, over several seeds, next to the three baselines:
one `fedlora simulate` per (task, seed, strategy) and one `fedlora baselines` per (task, seed), as
processes sharing the machine (and its GPU), ``--parallel`` at a time, seeds in the outer loop so
that a run cut short still holds whole seeds. Each finished job appends its result to
``OUT/results.jsonl``; then ``--csv`` gets one row per job and the table of mean ± standard
deviation (population) over the seeds is printed (``--markdown`` writes it too).

The score is the last round's server generation score (``answer_accuracy`` on bbc-topic,
``rouge_l`` on bbc-headline); FedSA-LoRA has no global model, so its score is the clients'
(``client-generation``: each client's personal model on its own held-out split). MB are the run's
payload totals each way; seconds are a federation's process wall time (model loads included)
and each baseline's own time.

    python benchmarks/llm_table.py simulations/recipes/llm-gpu.toml --out runs/llm-table \\
        --seeds 0,1,2 --parallel 12 --csv benchmarks/llm-gpu-table-h200.csv \\
        --markdown benchmarks/llm-gpu-table-h200.md

``--skip-done RESULTS --limit N`` runs the next N jobs not yet in RESULTS (to fill a table over
several calls of limited time).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = (
    "fedavg", "fedex", "flora", "fedsa", "fedsb", "lorafair", "flexlora", "hetlora",
    "ffalora", "fslora", "legend",
)  # fmt: skip
BASELINES = ("pretrained", "centralized", "local-only")
TASK_OVERRIDES = {
    "bbc-topic": ("dataset=bbc-topic",),
    "bbc-headline": ("dataset=bbc-headline", "max-new-tokens=24"),
}
COLUMNS = ("task", "method", "seed", "score", "metric", "mb_up", "mb_down", "seconds", "error")


@dataclass(frozen=True)
class Job:
    """One process: a strategy's federation, or the baselines, of a task and seed."""

    task: str
    seed: int
    method: str  # a strategy, or "baselines"

    @property
    def name(self) -> str:
        return f"{self.task}-{self.method}-{self.seed}"

    def command(self, recipe: str, out: Path) -> list[str]:
        overrides = [*TASK_OVERRIDES[self.task], f"seed={self.seed}"]
        if self.method == "baselines":
            return [*FEDLORA, "baselines", recipe, "--out", str(out / self.name), *overrides]
        return [
            *FEDLORA, "simulate", recipe, "--out", str(out / self.name),
            f"strategy={self.method}", *overrides,
        ]  # fmt: skip


FEDLORA = (sys.executable, "-m", "cli")


def jobs(tasks: list[str], seeds: list[int], strategies: list[str]) -> list[Job]:
    return [
        Job(task, seed, method)
        for seed in seeds
        for task in tasks
        for method in ("baselines", *strategies)
    ]


def done_jobs(results: Path) -> set[Job]:
    """The jobs whose rows in ``results`` hold no error (a baselines job: its three rows)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    ok = {(row["task"], row["seed"], row["method"]) for row in rows if not row["error"]}
    done = {Job(task, seed, method) for task, seed, method in ok if method in STRATEGIES}
    baseline_runs = {(task, seed) for task, seed, method in ok if method in BASELINES}
    for task, seed in baseline_runs:
        if all((task, seed, name) in ok for name in BASELINES):
            done.add(Job(task, seed, "baselines"))
    return done


def federation_result(job: Job, run_dir: Path) -> list[dict]:
    """The last round's generation score, and the run's MB each way."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    metric = "answer_accuracy" if job.task == "bbc-topic" else "rouge_l"
    score = last.get(metric)
    if score is None:
        metric = f"client_{metric}"
        score = last.get(metric)
    return [
        {
            "method": job.method,
            "score": score,
            "metric": metric,
            "mb_up": last["mb_up_total"],
            "mb_down": last["mb_down_total"],
        }
    ]


def baseline_results(run_dir: Path) -> list[dict]:
    with (run_dir / "results.csv").open() as file:
        return [
            {
                "method": row["baseline"],
                "score": float(row["generation"]) if row["generation"] else None,
                "metric": row["generation_metric"],
                "mb_up": 0.0,
                "mb_down": 0.0,
                "seconds": round(float(row["seconds"]), 1),
            }
            for row in csv.DictReader(file)
        ]


def finish(job: Job, out: Path, code: int, seconds: float, log: Path) -> list[dict]:
    base = {"task": job.task, "seed": job.seed, "seconds": round(seconds, 1), "error": ""}
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        return [{**base, "method": job.method, "error": f"exit {code}: {' '.join(tail)}"}]
    run_dir = out / job.name
    if job.method == "baselines":
        results = baseline_results(run_dir)
    else:
        results = federation_result(job, run_dir)
    return [{**base, **result} for result in results]


def run_all(recipe: str, all_jobs: list[Job], out: Path, parallel: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    waiting, running, results = list(all_jobs), {}, []
    with (out / "results.jsonl").open("a") as sink:
        while waiting or running:
            while waiting and len(running) < parallel:
                job = waiting.pop(0)
                log = out / f"{job.name}.log"
                with log.open("w") as log_file:
                    process = subprocess.Popen(
                        job.command(recipe, out), stdout=log_file, stderr=subprocess.STDOUT,
                        env=env,
                    )  # fmt: skip
                running[job] = (process, time.monotonic(), log)
            time.sleep(1.0)
            for job, (process, started, log) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[job]
                for row in finish(job, out, process.returncode, time.monotonic() - started, log):
                    results.append(row)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    print(json.dumps(row), flush=True)
    return results


def table(rows: list[dict]) -> str:
    """Mean ± standard deviation over the seeds, per task and method, in markdown."""
    lines = [
        "| task | method | score (mean ± sd) | seeds | MB up | MB down | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate((*BASELINES, *STRATEGIES))}
    keys = sorted(
        {(row["task"], row["method"]) for row in rows},
        key=lambda key: (key[0], order.get(key[1], len(order))),
    )
    for task, method in keys:
        done = [
            row for row in rows
            if (row["task"], row["method"]) == (task, method)
            and not row["error"] and row["score"] is not None
        ]  # fmt: skip
        if not done:
            lines.append(f"| {task} | {method} | failed | 0 | | | |")
            continue
        scores = [row["score"] for row in done]
        spread = statistics.pstdev(scores) if len(scores) > 1 else 0.0
        mean = statistics.fmean
        lines.append(
            f"| {task} | {method} | {mean(scores):.3f} ± {spread:.3f} | {len(done)} "
            f"| {mean(row['mb_up'] for row in done):.0f} "
            f"| {mean(row['mb_down'] for row in done):.0f} "
            f"| {mean(row['seconds'] for row in done):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--out", type=Path, default=Path("runs/llm-table"))
    parser.add_argument("--tasks", default="bbc-topic,bbc-headline")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--from-results", type=Path, help="only tabulate this results.jsonl")
    parser.add_argument(
        "--skip-done", type=Path, help="a results.jsonl: skip the jobs it holds without error"
    )
    parser.add_argument("--limit", type=int, help="run at most this many of the jobs left")
    args = parser.parse_args(argv)
    if args.from_results:
        rows = [json.loads(line) for line in args.from_results.read_text().splitlines()]
    else:
        tasks = [task for task in args.tasks.split(",") if task]
        seeds = [int(seed) for seed in args.seeds.split(",") if seed]
        strategies = [name for name in args.strategies.split(",") if name]
        left = jobs(tasks, seeds, strategies)
        if args.skip_done:
            done = done_jobs(args.skip_done)
            left = [job for job in left if job not in done]
        rows = run_all(args.recipe, left[: args.limit], args.out, args.parallel)
    if args.csv:
        with args.csv.open("w", newline="") as file:
            writer = csv.DictWriter(file, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    markdown = table(rows)
    print(markdown)
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
