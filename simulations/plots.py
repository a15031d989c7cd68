"""PNG plots of a comparison, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from simulations.run_dir import MetricsRow

FIGURE_SIZE = (7.0, 4.5)
DPI = 120
MIB = 2**20


def plot_accuracy_vs_round(
    runs: Mapping[str, Sequence[list[MetricsRow]]], path: Path, title: str
) -> None:
    """Held-out accuracy after each round, one line per strategy: the mean over its runs (seeds),
    and a band of one standard deviation around it when it ran more than once."""
    figure, axes = new_figure()
    for strategy, seed_runs in runs.items():
        rounds = sorted({row["round"] for rows in seed_runs for row in rows})
        by_round = [round_values(seed_runs, server_round) for server_round in rounds]
        plot_mean_and_band(axes, rounds, by_round, strategy)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    finish(figure, axes, path, f"{title}: accuracy per round")


def plot_accuracy_vs_bytes(
    runs: Mapping[str, Sequence[list[MetricsRow]]], path: Path, title: str
) -> None:
    """Held-out accuracy against the bytes communicated so far (up and down, all clients; the
    mean over a strategy's runs), with the band of `plot_accuracy_vs_round`."""
    figure, axes = new_figure()
    for strategy, seed_runs in runs.items():
        rounds = sorted({row["round"] for rows in seed_runs for row in rows})
        totals = {rows_id: cumulative_mib(rows) for rows_id, rows in enumerate(seed_runs)}
        mib = [
            statistics.fmean(totals[i][server_round] for i in totals if server_round in totals[i])
            for server_round in rounds
        ]
        by_round = [round_values(seed_runs, server_round) for server_round in rounds]
        plot_mean_and_band(axes, mib, by_round, strategy)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(LogFormatter())
    axes.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axes.set_xlabel("MiB communicated (up + down, cumulative, log scale)")
    finish(figure, axes, path, f"{title}: accuracy vs communication")


def cumulative_mib(rows: list[MetricsRow]) -> dict[int, float]:
    """{round: MiB communicated up to and including it}."""
    totals = itertools.accumulate((row["bytes_up"] + row["bytes_down"]) / MIB for row in rows)
    return {row["round"]: total for row, total in zip(rows, totals, strict=True)}


def round_values(seed_runs: Sequence[list[MetricsRow]], server_round: int) -> list[float]:
    """The accuracies the runs reached in ``server_round`` (runs without one left out)."""
    return [
        row["accuracy"]
        for rows in seed_runs
        for row in rows
        if row["round"] == server_round and row.get("accuracy") is not None
    ]


def plot_mean_and_band(axes, xs, by_x: list[list[float]], label: str) -> None:
    """The mean of each x's values as a line, and mean ± standard deviation (sample, over
    runs) as a band where an x has two values or more."""
    points = [(x, values) for x, values in zip(xs, by_x, strict=True) if values]
    if not points:
        return
    means = [statistics.fmean(values) for _, values in points]
    (line,) = axes.plot([x for x, _ in points], means, marker="o", label=label)
    spread = [
        (x, mean, statistics.stdev(values))
        for (x, values), mean in zip(points, means, strict=True)
        if len(values) > 1
    ]
    if spread:
        axes.fill_between(
            [x for x, _, _ in spread],
            [mean - std for _, mean, std in spread],
            [mean + std for _, mean, std in spread],
            color=line.get_color(),
            alpha=0.2,
        )


def new_figure():
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def finish(figure: Figure, axes, path: Path, title: str) -> None:
    axes.set_ylabel("held-out accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
