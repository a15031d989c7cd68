"""``fedlora simulate`` and ``fedlora compare`` end to end in Flower's simulation engine on Ray with
the tiny BERT: the run directory (and the same rows from the in-process engine), results and
plots, a run whose clients fail, an engine that cannot start."""

from __future__ import annotations

import csv
import dataclasses
import threading
import time

import pytest
from flwr.clientapp import ClientApp

from cli.main import main
from clients.app import client_app
from simulations import runner
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve
from simulations.run_dir import read_metrics
from simulations.runner import SimulationError, simulate
from tests.support.tiny_runs import on_in_process_engine

pytestmark = pytest.mark.slow

TINY = RECIPES_DIR / "tiny.toml"
ROW_KEYS = ("round", "accuracy", "loss", "relative_deviation", "bytes_up", "bytes_down", "seconds")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_simulate_through_the_cli_writes_the_run_directory_as_the_in_process_engine(
    tmp_path, capsys
):
    out = tmp_path / "run"
    assert main(["simulate", str(TINY), "--rounds", "2", "--out", str(out), "seed=1"]) == 0
    rows = read_metrics(out)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        assert 0 <= row["accuracy"] <= 1 and row["loss"] > 0 and row["seconds"] > 0
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["relative_deviation"] < 1e-5  # FedEx-LoRA is exact
    config = load_recipe(out / "config.toml")
    assert config.run["seed"] == 1 and config.run["num-server-rounds"] == 2
    assert config.simulation.num_supernodes == 3
    with (out / "metrics.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [int(row["round"]) for row in table] == [1, 2]
    assert float(table[-1]["accuracy"]) == pytest.approx(rows[-1]["accuracy"])
    assert (out / "flower.log").stat().st_size > 0
    err = capsys.readouterr().err
    assert "round 1: accuracy" in err and "round 2: accuracy" in err
    in_process = on_in_process_engine(config)
    same_rows = read_metrics(simulate(in_process, out_dir=tmp_path / "in-process"))
    for ray_row, row in zip(rows, same_rows, strict=True):
        for key in ("accuracy", "loss", "relative_deviation"):
            assert row[key] == pytest.approx(ray_row[key], rel=1e-4, abs=1e-9), key
        assert (row["bytes_up"], row["bytes_down"]) == (ray_row["bytes_up"], ray_row["bytes_down"])


def failing_train_app(run_config) -> ClientApp:
    """The project's ClientApp, except that training raises."""
    real = client_app(run_config)
    app = ClientApp()

    @app.query()
    def query(message, context):
        return real(message, context)

    @app.train()
    def train(message, context):
        raise RuntimeError("no room for the adapter")

    return app


def training_fails_for(strategy: str):
    """`runner.client_app`'s stand-in: the project's ClientApp, whose training raises in runs
    of ``strategy``."""

    def make(run_config) -> ClientApp:
        if run_config["strategy"] == strategy:
            return failing_train_app(run_config)
        return client_app(run_config)

    return make


def test_compare_writes_results_and_plots_and_carries_on_past_a_failed_run(
    tmp_path, monkeypatch, capsys
):
    """The failed run is one whose client raises: `simulate` fails it with the client's reason,
    which the results keep."""
    monkeypatch.setattr(runner, "client_app", training_fails_for("flexlora"))
    out = tmp_path / "compare"
    strategies = "flexlora,fedavg,fedsa"
    args = ["compare", str(TINY), "--strategies", strategies, "--rounds", "2", "--out", str(out)]
    assert main(args) == 1
    with (out / "results.csv").open() as file:
        results = {row["strategy"]: row for row in csv.DictReader(file)}
    assert set(results) == {"flexlora", "fedavg", "fedsa"}
    assert "RuntimeError: no room for the adapter" in results["flexlora"]["error"]
    assert results["flexlora"]["bytes_up"] == "0"  # no client trained
    assert "flexlora failed" in capsys.readouterr().err
    for name in ("fedavg", "fedsa"):
        rows = read_metrics(out / name)
        assert results[name]["error"] == ""
        assert int(results[name]["rounds"]) == len(rows) == 2
        assert float(results[name]["final_accuracy"]) == pytest.approx(rows[-1]["accuracy"])
        assert int(results[name]["bytes_up"]) == sum(row["bytes_up"] for row in rows)
    assert float(results["fedavg"]["max_relative_deviation"]) >= 0
    assert results["fedsa"]["max_relative_deviation"] == ""  # personalized: no global model
    assert int(results["fedsa"]["bytes_up"]) < int(results["fedavg"]["bytes_up"])  # A only
    assert load_recipe(out / "fedsa" / "config.toml").run == {
        **load_recipe(out / "fedavg" / "config.toml").run,
        "strategy": "fedsa",
    }
    for plot in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE


def test_an_engine_that_cannot_start_fails_the_run_and_frees_the_server_thread(tmp_path):
    """No Ray actor fits 4096 CPUs: Flower's engine crashes while the ServerApp's thread waits for
    round 1's replies; the error names the cause and the thread ends instead of waiting an hour."""
    threads_before = set(threading.enumerate())
    recipe = resolve(load_recipe(TINY), (), rounds=2)
    recipe = dataclasses.replace(
        recipe, simulation=dataclasses.replace(recipe.simulation, num_cpus=4096)
    )
    with pytest.raises(SimulationError, match="ValueError: ActorPool is empty") as failure:
        simulate(recipe, (), tmp_path)
    assert str(tmp_path / "flower.log") in str(failure.value)
    log = (tmp_path / "flower.log").read_text()
    assert "the simulation failed" in log and "Traceback (most recent call last)" in log

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads_before and not t.daemon]

    deadline = time.monotonic() + 10
    while new_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not new_threads()
