"""Live tracking: a run's rows as TensorBoard scalars, read back with the tensorboard package."""

from importlib.util import find_spec

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clients.app import client_app
from fedlora.errors import ConfigError
from fedlora.run_records.tracking import TENSORBOARD_DIR, RunTracking, row_scalars, tracker_names
from simulations.recipes import load_recipe, resolve
from simulations.run_dir import read_metrics
from strategies.server_app import run
from tests.support.local_grid import LocalGrid


def scalars_by_round(log_dir):
    """{tag: {step: value}} of every scalar in the event files under ``log_dir``."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: {event.step: event.value for event in events.Scalars(tag)}
        for tag in events.Tags()["scalars"]
    }


def test_every_number_of_every_round_is_a_tensorboard_scalar(tmp_path, task_identity, one_thread):
    rows = [{"text": f"words {i} w{i % 3}", "label": i % 3} for i in range(36)]
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    flower_config = {
        "strategy": "flexlora",
        "model": "tiny-bert",
        "dataset": f"csv:{tmp_path / 'data.csv'}",
        "partitioner": "iid",
        "rank-profile": "2:0.5,4:0.5",
        "num-server-rounds": 2,
        "local-steps": 1,
        "batch-size": 4,
        "max-length": 16,
    }
    run_dir = tmp_path / "run"
    run(
        LocalGrid(client_app(flower_config), num_nodes=2),
        {**flower_config, "run-dir": str(run_dir)},
    )
    metrics = read_metrics(run_dir)
    scalars = scalars_by_round(run_dir / TENSORBOARD_DIR)
    for column in ("accuracy", "loss", "relative_deviation", "bytes_up", "bytes_down", "seconds"):
        expected = {row["round"]: row[column] for row in metrics}
        assert scalars[column] == pytest.approx(expected, rel=1e-6), column
    by_rank = {row["round"]: row["accuracy_by_rank"]["2"] for row in metrics}
    assert scalars["accuracy_by_rank/2"] == pytest.approx(by_rank)


def test_a_resumed_run_purges_the_steps_it_writes_again(tmp_path):
    first = RunTracking("tensorboard", tmp_path, {})
    for step in (1, 2, 3):
        first.log_row({"round": step, "accuracy": 0.1 * step})
    first.close()
    resumed = RunTracking("tensorboard", tmp_path, {}, first_round=3)
    resumed.log_row({"round": 3, "accuracy": 0.9})
    resumed.close()
    assert scalars_by_round(tmp_path / TENSORBOARD_DIR)["accuracy"] == pytest.approx(
        {1: 0.1, 2: 0.2, 3: 0.9}
    )


def test_row_scalars_keep_finite_numbers_and_flatten_mappings():
    row = {
        "round": 4,
        "accuracy": 0.5,
        "clients": 3,
        "dp_stopped": True,
        "strategy": "fedex",
        "relative_deviation": None,
        "eval_loss": float("nan"),
        "epsilon": {"0": 1.5, "2": 2.0},
    }
    assert row_scalars(row) == {"accuracy": 0.5, "clients": 3.0, "epsilon/0": 1.5, "epsilon/2": 2.0}


def test_trackers_are_named_checked_and_can_be_off():
    assert tracker_names("tensorboard, mlflow") == ("tensorboard", "mlflow")
    assert tracker_names("none") == tracker_names("") == ()
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tensorbord'\]"):
        tracker_names("tensorbord")


@pytest.mark.skipif(find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_a_tracker_that_is_not_installed_is_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"mlflow is not installed \(pip install mlflow\)"):
        resolve(load_recipe({"run": {"tracking": "tensorboard,mlflow"}}))
