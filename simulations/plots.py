"""PNG plots of a comparison, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from simulations.run_dir import MetricsRow

FIGURE_SIZE = (7.0, 4.5)
DPI = 120
MIB = 2**20


def plot_accuracy_vs_round(runs: Mapping[str, list[MetricsRow]], path: Path, title: str) -> None:
    """Held-out accuracy after each round, one line per strategy."""
    figure, axes = new_figure()
    for strategy, rows in runs.items():
        points = [
            (row["round"], row["accuracy"]) for row in rows if row.get("accuracy") is not None
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=strategy)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    finish(figure, axes, path, f"{title}: accuracy per round")


def plot_accuracy_vs_bytes(runs: Mapping[str, list[MetricsRow]], path: Path, title: str) -> None:
    """Held-out accuracy against the bytes communicated so far (up and down, all clients)."""
    figure, axes = new_figure()
    for strategy, rows in runs.items():
        totals = itertools.accumulate((row["bytes_up"] + row["bytes_down"]) / MIB for row in rows)
        points = [
            (total, row["accuracy"])
            for total, row in zip(totals, rows, strict=True)
            if row.get("accuracy") is not None
        ]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=strategy)
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(LogFormatter())
    axes.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axes.set_xlabel("MiB communicated (up + down, cumulative, log scale)")
    finish(figure, axes, path, f"{title}: accuracy vs communication")


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
