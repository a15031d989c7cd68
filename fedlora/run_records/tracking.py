"""Live tracking of a run's rows: TensorBoard event files in the run directory, and MLflow or
Weights & Biases when installed and asked for (the ``tracking`` key: names separated by commas,
``none`` for no tracking).

Each metrics row becomes scalars at step = its round: every number of the row (``accuracy``,
``loss``, ``relative_deviation``, ``bytes_up``, ``epsilon_max``, ``seconds``, ...) under its
column's name, and the numbers of a column that holds a mapping (``accuracy_by_rank``, the
clients' ``epsilon``) as ``column/key``. A resumed run's TensorBoard writer purges the steps from
its first round on, so that the rows an interrupted run wrote past its checkpoint are not shown.
The libraries are imported only when a run tracks with them.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fedlora.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
"""``RUN_DIR/tensorboard``: the TensorBoard event files (``tensorboard --logdir RUN_DIR``)."""
MLFLOW_DIR = "mlruns"
"""``RUN_DIR/mlruns``: MLflow's store when ``MLFLOW_TRACKING_URI`` names none."""
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
"""Tracker name: the package it needs."""
NO_TRACKING = "none"


class Tracker(Protocol):
    def log(self, scalars: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def tracker_names(text: str) -> tuple[str, ...]:
    """The trackers ``tracking`` names (none for ``none`` or empty); an unknown name raises
    `ConfigError`."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if names in ((), (NO_TRACKING,)):
        return ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(
            f"tracking = {text!r}: unknown tracker(s) {unknown}; choose of "
            f"{[*TRACKERS, NO_TRACKING]}, separated by commas"
        )
    return names


def check_trackers_installed(text: str) -> None:
    """Raise `ConfigError` naming a tracker of ``tracking`` whose package is not installed (on
    the server: the clients track nothing)."""
    for name in tracker_names(text):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(
                f"tracking = {text!r}: {name} is not installed (pip install {TRACKERS[name]})"
            )


def row_scalars(row: Mapping[str, object]) -> dict[str, float]:
    """The row's finite numbers by column (``column/key`` within a mapping), its round left out."""
    scalars = {}
    for column, value in row.items():
        if column == "round":
            continue
        if isinstance(value, Mapping):
            scalars.update({f"{column}/{key}": v for key, v in value.items() if is_number(v)})
        elif is_number(value):
            scalars[column] = value
    return {name: float(value) for name, value in scalars.items() if math.isfinite(value)}


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class TensorBoardTracker:
    """Scalars in TensorBoard event files under ``RUN_DIR/tensorboard``."""

    def __init__(self, run_dir: Path, first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / TENSORBOARD_DIR),
            purge_step=first_round if first_round > 1 else None,
        )

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """An MLflow run named after the run directory, with the run config as its parameters; the
    store is ``MLFLOW_TRACKING_URI``'s, else ``RUN_DIR/mlruns``."""

    def __init__(self, run_dir: Path, params: Mapping[str, object]) -> None:
        import mlflow

        if not mlflow.is_tracking_uri_set():
            mlflow.set_tracking_uri((run_dir / MLFLOW_DIR).as_uri())
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params(dict(params))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics(dict(scalars), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    """A Weights & Biases run named after the run directory, its files under the run directory
    (``WANDB_MODE=offline`` keeps it off the network)."""

    def __init__(self, run_dir: Path, params: Mapping[str, object]) -> None:
        import wandb

        self.run = wandb.init(
            project="fedlora", name=run_dir.name, dir=str(run_dir), config=dict(params)
        )

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class RunTracking:
    """The run's trackers; `log_row` sends a metrics row to each."""

    def __init__(
        self, tracking: str, run_dir: Path, params: Mapping[str, object], first_round: int = 1
    ) -> None:
        check_trackers_installed(tracking)
        self.trackers: list[Tracker] = []
        for name in tracker_names(tracking):
            if name == "tensorboard":
                self.trackers.append(TensorBoardTracker(run_dir, first_round))
            elif name == "mlflow":
                self.trackers.append(MLflowTracker(run_dir, params))
            else:
                self.trackers.append(WandbTracker(run_dir, params))

    def log_row(self, row: Mapping[str, object]) -> None:
        scalars = row_scalars(row)
        for tracker in self.trackers:
            tracker.log(scalars, int(row["round"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
