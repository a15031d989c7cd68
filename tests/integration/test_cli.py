"""The ``fedlora`` command's recipes, overrides and run directories; ``simulate`` and ``compare``
end to end on Ray with the tiny BERT (marked slow)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import threading
import time
import tomllib
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp

from clients.app import client_app
from fedlora.errors import ConfigError
from simulations import runner
from simulations.cli import main
from simulations.compare import strategy_names, summary
from simulations.recipes import (
    DEMO_RECIPE,
    RECIPES_DIR,
    load_recipe,
    parse_overrides,
    resolve,
)
from simulations.run_dir import read_metrics
from simulations.runner import SimulationError, error_reason, simulate
from strategies import STRATEGIES

TINY = RECIPES_DIR / "tiny.toml"
PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
ROW_KEYS = ("round", "accuracy", "loss", "relative_deviation", "bytes_up", "bytes_down", "seconds")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- recipes and overrides ------------------------------------------------------------------------


def test_demo_recipe_is_the_issue_s_main_job():
    recipe = load_recipe(DEMO_RECIPE)
    config = recipe.run_config
    assert (config.model, config.dataset, config.strategy) == ("minilm", "bbcnews", "fedex")
    assert (config.partitioner, config.dirichlet_alpha) == ("dirichlet", 0.3)
    assert config.rank_profile == "4:0.3,8:0.5,16:0.2"
    assert [config.rank_for(i, 10) for i in range(10)] == [4] * 3 + [8] * 5 + [16] * 2
    assert config.target_module_names == ("query", "value")
    assert config.head_module_names == ("classifier", "pooler")
    assert (config.max_length, config.local_steps, config.batch_size) == (96, 3, 16)
    assert (config.learning_rate, config.num_server_rounds) == (5e-3, 5)
    assert recipe.simulation.num_supernodes == 10
    assert recipe.simulation.backend_config()["client_resources"] == {
        "num_cpus": 1,
        "num_gpus": 0.0,
    }


def test_every_shipped_recipe_resolves():
    for path in RECIPES_DIR.glob("*.toml"):
        resolve(load_recipe(path))


def test_overrides_are_toml_scalars_and_a_bare_word_is_a_string():
    assert parse_overrides(
        [
            "learning-rate=1e-3",
            "seed = 7",
            "rslora=true",
            "strategy=fedavg",
            'model="tiny-bert"',
            "rank-profile=4:0.5,8:0.5",
            "dataset=json:data/x.json",
        ]
    ) == {
        "learning-rate": 0.001,
        "seed": 7,
        "rslora": True,
        "strategy": "fedavg",
        "model": "tiny-bert",
        "rank-profile": "4:0.5,8:0.5",
        "dataset": "json:data/x.json",
    }


def test_overrides_then_strategy_and_rounds_apply_in_that_order():
    recipe = resolve(
        load_recipe(TINY), ["strategy=flora", "num-server-rounds=7", "seed=3"], "fedsa"
    )
    assert recipe.run["strategy"] == "fedsa" and recipe.run["seed"] == 3
    assert recipe.run["num-server-rounds"] == 7
    assert resolve(recipe, rounds=1).run["num-server-rounds"] == 1


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["lr=1e-3"], "lr"),
        (["seed=abc"], "seed"),
        (["learning-rate=fast"], "learning-rate"),
        (['model="tiny-bert'], "model"),
        (["max-length=[1, 2]"], "max-length"),
        (["max-length=0"], "max-length"),
        (["strategy=fedprox"], "fedprox"),
        (["base-changes=email"], "base-changes"),
        (["seed"], "seed"),
        (["run-dir=x"], "--out"),
    ],
)
def test_a_bad_override_is_refused_naming_it(overrides, named):
    with pytest.raises(ConfigError, match=named):
        resolve(load_recipe(TINY), overrides)


def test_bad_recipes_are_refused_naming_the_key(tmp_path):
    cases = {
        "[simulation]\nnum-clients = 3\n": "num-clients",
        "[simulation]\nnum-gpus = -1\n": "num-gpus",
        "[simulation]\nnum-gpus = -0.5\n": "num-gpus",
        "[simulation]\nnum-cpus = 0\n": "num-cpus",
        "[simulation]\nnum-supernodes = 2.5\n": "num-supernodes",
        "[federation]\nx = 1\n": "federation",
        "[run]\nlora-rnk = 4\n": "lora-rnk",
        "[run]\nrun-dir = 'x'\n": "--out",
        "[run\n": "not valid TOML",
    }
    for text, named in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=named):
            resolve(load_recipe(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_resolved_recipe_round_trips_through_its_toml(tmp_path):
    recipe = resolve(load_recipe(DEMO_RECIPE), ["base-changes=messages", "lora-alpha=8"])
    path = tmp_path / "config.toml"
    path.write_text(recipe.to_toml())
    again = load_recipe(path)
    assert again.run == recipe.run and again.simulation == recipe.simulation
    assert again.run["target-modules"] == "query,value" and again.run["lora-alpha"] == 8.0


def test_flwr_run_config_in_pyproject_is_the_demo():
    """``flwr run .`` runs what ``fedlora demo`` runs (the model-derived keys left to RunConfig)."""
    app = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "strategies.server_app:app",
        "clientapp": "clients.app:app",
    }
    config = dict(app["config"])
    assert (config.pop("run-dir"), config.pop("base-changes")) == ("runs/flwr", "run-dir")
    demo = resolve(load_recipe(DEMO_RECIPE)).run
    assert config == {
        k: v for k, v in demo.items() if k not in ("target-modules", "modules-to-save")
    }
    assert resolve(load_recipe({"run": config})).run == demo


def test_strategy_names():
    assert strategy_names("all") == tuple(STRATEGIES)
    assert strategy_names("fedsa, fedavg,fedsa") == ("fedsa", "fedavg")
    with pytest.raises(ConfigError, match="fedprox"):
        strategy_names("fedavg,fedprox")


def test_summary_of_a_run():
    rows = [
        {"round": 1, "accuracy": 0.5, "relative_deviation": 0.2, "bytes_up": 10, "bytes_down": 30,
         "seconds": 1.5},
        {"round": 2, "accuracy": 0.8, "relative_deviation": None, "bytes_up": 10, "bytes_down": 30,
         "seconds": 2.0},
        {"round": 3, "accuracy": 0.7, "relative_deviation": 0.1, "bytes_up": 12, "bytes_down": 31,
         "seconds": 0.5},
    ]  # fmt: skip
    assert summary("fedavg", rows, 9.0) == {
        "strategy": "fedavg",
        "rounds": 3,
        "final_accuracy": 0.7,
        "best_accuracy": 0.8,
        "bytes_up": 32,
        "bytes_down": 91,
        "seconds": 4.0,
        "wall_seconds": 9.0,
        "max_relative_deviation": 0.2,
        "error": None,
    }


def test_error_reason_looks_past_flower_and_ray_wrappers():
    wrapped = (
        'ray::ClientAppActor.run() (pid=1)\n  File "clients/app.py", line 9, in train\n'
        "ValueError: shapes (3, 4) and (5, 4)\n\nThe above exception was the direct cause\n"
        "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred."
    )
    records = [
        logging.makeLogRecord({"msg": "An exception was raised when processing a message"}),
        logging.makeLogRecord({"msg": wrapped}),
    ]
    assert error_reason(records) == "ValueError: shapes (3, 4) and (5, 4)"
    assert error_reason(records[:1]) == "An exception was raised when processing a message"


def test_cli_refuses_bad_overrides_anywhere_with_status_2(capsys):
    assert main(["simulate", str(TINY), "--rounds", "2", "lr=1"]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert main(["demo", "seed=x", "--out", "somewhere"]) == 2
    assert "'seed'" in capsys.readouterr().err
    assert main(["compare", str(TINY), "--strategies", "fedavg", "--rounds", "0"]) == 2
    assert "num-server-rounds" in capsys.readouterr().err
    assert main(["compare", str(TINY), "--strategies", "fedavg,fedprox"]) == 2
    assert "fedprox" in capsys.readouterr().err


def test_cli_still_mounts_bench(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "aggregate", "--quick", "--device", "cpu", "--methods", "fedavg"]
    assert main([*args, "--clients", "3", "--json", str(out)]) == 0
    assert [row["method"] for row in json.loads(out.read_text())["results"]] == ["fedavg"]


# ---- on Ray -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_simulate_through_the_cli_writes_the_run_directory(tmp_path, capsys):
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


@pytest.mark.slow
def test_compare_writes_results_and_plots(tmp_path):
    out = tmp_path / "compare"
    args = ["compare", str(TINY), "--strategies", "fedavg,fedsa", "--rounds", "2", "--out"]
    assert main([*args, str(out)]) == 0
    with (out / "results.csv").open() as file:
        results = {row["strategy"]: row for row in csv.DictReader(file)}
    assert set(results) == {"fedavg", "fedsa"}
    for name, result in results.items():
        rows = read_metrics(out / name)
        assert int(result["rounds"]) == len(rows) == 2
        assert float(result["final_accuracy"]) == pytest.approx(rows[-1]["accuracy"])
        assert int(result["bytes_up"]) == sum(row["bytes_up"] for row in rows)
    assert float(results["fedavg"]["max_relative_deviation"]) >= 0
    assert results["fedsa"]["max_relative_deviation"] == ""  # personalized: no global model
    assert int(results["fedsa"]["bytes_up"]) < int(results["fedavg"]["bytes_up"])  # A only
    assert load_recipe(out / "fedsa" / "config.toml").run == {
        **load_recipe(out / "fedavg" / "config.toml").run,
        "strategy": "fedsa",
    }
    for plot in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / plot).read_bytes()[:8] == PNG_SIGNATURE


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


@pytest.mark.slow
def test_a_client_that_raises_fails_the_run_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "client_app", failing_train_app)
    with pytest.raises(SimulationError, match="RuntimeError: no room for the adapter"):
        simulate(TINY, (), tmp_path, rounds=1)


@pytest.mark.slow
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

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads_before and not t.daemon]

    deadline = time.monotonic() + 10
    while new_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not new_threads()


def training_fails_for(strategy: str):
    """`runner.client_app`'s stand-in: the project's ClientApp, whose training raises in runs
    of ``strategy``."""

    def make(run_config) -> ClientApp:
        if run_config["strategy"] == strategy:
            return failing_train_app(run_config)
        return client_app(run_config)

    return make


@pytest.mark.slow
def test_compare_carries_on_past_a_failed_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "client_app", training_fails_for("fedsa"))
    out = tmp_path / "compare"
    args = ["compare", str(TINY), "--strategies", "fedsa,fedavg", "--rounds", "1", "--out"]
    assert main([*args, str(out)]) == 1
    with (out / "results.csv").open() as file:
        results = {row["strategy"]: row for row in csv.DictReader(file)}
    assert "no room for the adapter" in results["fedsa"]["error"]
    assert results["fedsa"]["final_accuracy"] == ""  # no client trained
    assert results["fedavg"]["error"] == "" and results["fedavg"]["rounds"] == "1"
    assert "fedsa failed" in capsys.readouterr().err
