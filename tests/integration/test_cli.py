"""The ``fedlora`` command's recipes, overrides and run directories (``simulate`` and ``compare`` on
Ray are in ``tests/e2e/test_cli_on_ray.py``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from cli.main import main
from cli.simulate import round_progress, rounds_table, spread_table
from fedlora.data.partitioning import partition, server_eval_set
from fedlora.errors import ConfigError, SimulationError
from simulations.compare import seed_recipes, strategy_names, strategy_spreads, summary
from simulations.plots import plot_accuracy_vs_bytes, plot_accuracy_vs_round
from simulations.recipe_files import DEMO_RECIPE, RECIPES_DIR
from simulations.recipes import load_recipe, parse_overrides, resolve
from simulations.run_dir import read_metrics
from simulations.runner import error_reason, reported_cause, run_in
from strategies import STRATEGIES
from tests.support.tiny_runs import on_in_process_engine

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
    parsed = {"seed": 7}
    assert parse_overrides(parsed) == parsed and parse_overrides(parsed) is not parsed


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
    server_app_keys = (config.pop("run-dir"), config.pop("base-changes"), config.pop("resume"))
    assert server_app_keys == ("", "run-dir", False)
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
         "seconds": 2.0, "answer_accuracy": 0.4, "rouge_l": None},
        {"round": 3, "accuracy": 0.7, "relative_deviation": 0.1, "bytes_up": 12, "bytes_down": 31,
         "seconds": 0.5, "answer_accuracy": None, "rouge_l": None},
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
        "answer_accuracy": 0.4,
        "rouge_l": None,
        "error": None,
    }


def test_the_final_table_shows_the_generation_score_and_the_run_s_megabytes():
    rows = [
        {"round": 1, "accuracy": 0.5, "loss": 1.0, "answer_accuracy": None, "bytes_up": 2_000_000,
         "bytes_down": 3_000_000, "mb_up_total": 2.0, "mb_down_total": 3.0, "seconds": 1.0},
        {"round": 2, "accuracy": 0.6, "loss": 0.8, "answer_accuracy": 0.25, "bytes_up": 2_000_000,
         "bytes_down": 3_000_000, "mb_up_total": 4.0, "mb_down_total": 6.0, "seconds": 1.0},
    ]  # fmt: skip
    table = rounds_table(load_recipe(TINY), rows)
    cells = {column.header: list(column.cells) for column in table.columns}
    assert cells["answer_accuracy"] == ["-", "0.250"] and "rouge_l" not in cells
    assert cells["MB up, run"] == ["2.00", "4.00"] and cells["MB down, run"] == ["3.00", "6.00"]


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


def test_error_reason_shows_the_projects_own_error_not_the_library_cause_under_it():
    chained = (
        "pyarrow.lib.ArrowTypeError: object of type <class 'str'> cannot be converted to int\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "fedlora.errors.ConfigError: dataset 'json:x.json': labels must be all integers or all "
        "strings\nflwr.clientapp.client_app.ClientAppException: \n"
    )
    records = [logging.makeLogRecord({"msg": chained})]
    assert error_reason(records) == (
        "fedlora.errors.ConfigError: dataset 'json:x.json': labels must be all integers or all "
        "strings"
    )


def wrapped_as_flower_does(error: Exception) -> RuntimeError:
    """``error`` raised, then wrapped the way Flower's engine wraps a crash."""
    try:
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("An error was encountered. Ending simulation.") from cause
    except RuntimeError as wrapper:
        return wrapper


def test_an_engine_crash_reports_the_projects_own_error_in_its_chain():
    try:
        tomllib.loads("strategy = ")
    except tomllib.TOMLDecodeError as library_error:
        own = ConfigError("recipe 'x.toml' is not valid TOML")
        own.__cause__ = library_error
    assert reported_cause(wrapped_as_flower_does(own)) == (
        "ConfigError: recipe 'x.toml' is not valid TOML"
    )
    library_only = wrapped_as_flower_does(ValueError("ActorPool is empty\nmore"))
    assert reported_cause(library_only) == "ValueError: ActorPool is empty"


def test_cli_refuses_bad_overrides_anywhere_with_status_2(capsys):
    assert main(["simulate", str(TINY), "--rounds", "2", "lr=1"]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert main(["demo", "seed=x", "--out", "somewhere"]) == 2
    assert "'seed'" in capsys.readouterr().err
    assert main(["compare", str(TINY), "--strategies", "fedavg", "--rounds", "0"]) == 2
    assert "num-server-rounds" in capsys.readouterr().err
    assert main(["compare", str(TINY), "--strategies", "fedavg,fedprox"]) == 2
    assert "fedprox" in capsys.readouterr().err


def test_cli_refuses_a_cluster_run_that_keeps_the_default_base_changes(
    tmp_path, monkeypatch, capsys
):
    """``RAY_ADDRESS`` names a cluster: a new run and a resumed one are refused before Ray starts
    or a run directory is made, naming the key."""
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints" / "round-1").mkdir(parents=True)
    (stopped / "config.toml").write_text(resolve(load_recipe(TINY)).to_toml())
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    out = tmp_path / "run"
    assert main(["simulate", str(TINY), "--out", str(out)]) == 2
    assert "base-changes: on the Ray cluster of RAY_ADDRESS" in capsys.readouterr().err
    assert not out.exists()
    assert main(["simulate", "--resume", str(stopped)]) == 2
    assert "base-changes: on the Ray cluster of RAY_ADDRESS" in capsys.readouterr().err


def test_cli_still_mounts_bench(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "aggregate", "--quick", "--device", "cpu", "--methods", "fedavg"]
    assert main([*args, "--clients", "3", "--json", str(out)]) == 0
    assert [row["method"] for row in json.loads(out.read_text())["results"]] == ["fedavg"]


def test_a_run_that_fails_in_the_engine_shows_the_projects_error_and_logs_its_traceback(tmp_path):
    """A model that is not there, past the command's checks: the in-process engine's ServerApp
    refuses it; the error is the project's own and flower.log holds the traceback."""
    recipe = on_in_process_engine(resolve(load_recipe(TINY), (), rounds=1))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_config = {**recipe.run, "model": str(tmp_path / "no-model"), "run-dir": str(run_dir)}
    with pytest.raises(SimulationError) as failure:
        run_in(run_dir, recipe, run_config, None)
    assert str(failure.value).startswith("ConfigError: model ")
    assert str(run_dir / "flower.log") in str(failure.value)
    log = (run_dir / "flower.log").read_text()
    assert "the simulation failed" in log and "Traceback (most recent call last)" in log


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_shows_the_time_left_on_a_terminal_only(terminal):
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=100, color_system=None)
    with round_progress(console) as progress:
        task = progress.add_task("rounds", total=4)
        progress.update(task, completed=1)
        progress.console.print("round 1: accuracy 0.5")
        progress.refresh()
    assert "round 1: accuracy 0.5" in out.getvalue()
    assert ("ETA" in out.getvalue()) is terminal


def test_seed_runs_vary_the_seed_and_share_the_data():
    recipe = resolve(load_recipe(TINY), {"seed": 5, "dataset": "bbcnews", "partitioner": "shard"})
    runs = seed_recipes(recipe, 3)
    assert list(runs) == [5, 6, 7]
    configs = [run.run_config for run in runs.values()]
    assert [config.seed for config in configs] == [5, 6, 7]
    assert {config.partition_seed for config in configs} == {5}
    shares = [[sorted(partition(config, i, 3)["text"]) for i in range(3)] for config in configs]
    assert shares[0] == shares[1] == shares[2]
    assert sorted(server_eval_set(configs[0])["text"]) == sorted(
        server_eval_set(configs[2])["text"]
    )
    other = dataclasses.replace(configs[1], data_seed=-1)  # without data-seed, seed 6 re-deals
    assert [sorted(partition(other, i, 3)["text"]) for i in range(3)] != shares[0]
    assert seed_recipes(recipe, 1) == {5: recipe}


def test_strategy_spreads_are_the_mean_and_sample_std_of_the_finished_runs():
    def result(strategy, seed, final, error=None):
        return {"strategy": strategy, "seed": seed, "final_accuracy": final, "best_accuracy": final,
                "max_relative_deviation": None, "answer_accuracy": None, "rouge_l": None,
                "bytes_up": 100, "bytes_down": 300, "seconds": 2.0, "error": error}  # fmt: skip

    results = [result("fedex", 0, 0.5), result("fedex", 1, 0.7), result("fedex", 2, 0.6),
               result("fedavg", 0, 0.4), result("fedavg", 1, 0.1, "died")]  # fmt: skip
    fedex, fedavg = strategy_spreads(results)
    assert (fedex["runs"], fedex["failed"], fedavg["runs"], fedavg["failed"]) == (3, 0, 2, 1)
    assert fedex["final_accuracy_mean"] == pytest.approx(0.6)
    assert fedex["final_accuracy_std"] == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert fedavg["final_accuracy_mean"] == 0.4 and fedavg["final_accuracy_std"] is None
    assert fedex["max_relative_deviation_mean"] is None
    cells = {c.header: list(c.cells) for c in spread_table(results, load_recipe(TINY)).columns}
    assert cells["final acc."] == ["0.600 ± 0.100", "0.400"]
    assert cells["runs"] == ["3", "2 (1 failed)"]


def test_the_plots_draw_a_band_over_seeds(tmp_path):
    def rows(accuracies):
        return [{"round": r + 1, "accuracy": a, "bytes_up": 10, "bytes_down": 20}
                for r, a in enumerate(accuracies)]  # fmt: skip

    runs = {"fedex": [rows([0.5, 0.7]), rows([0.7, 0.9])], "fedavg": [rows([0.4, 0.6])]}
    plot_accuracy_vs_round(runs, tmp_path / "round.png", "tiny")
    plot_accuracy_vs_bytes(runs, tmp_path / "bytes.png", "tiny")
    for name in ("round.png", "bytes.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_compare_over_seeds_reports_the_mean_and_spread(tmp_path, capsys):
    rows = [{"text": f"words {i} w{i % 3}", "label": i % 3} for i in range(36)]
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    recipe = tmp_path / "tiny-in-process.toml"
    recipe.write_text(
        TINY.read_text().replace("[simulation]", '[simulation]\nengine = "in-process"')
    )
    out = tmp_path / "compare"
    args = ["compare", str(recipe), "--strategies", "fedavg", "--seeds", "2", "--rounds", "1"]
    assert main([*args, "--out", str(out), "seed=3", f"dataset=csv:{tmp_path / 'data.csv'}"]) == 0
    runs = {seed: out / "fedavg" / f"seed-{seed}" for seed in (3, 4)}
    configs = {seed: load_recipe(run / "config.toml").run for seed, run in runs.items()}
    assert [configs[s]["seed"] for s in (3, 4)] == [3, 4]
    assert configs[3]["data-seed"] == configs[4]["data-seed"] == 3
    finals = [read_metrics(run)[-1] for run in runs.values()]
    assert finals[0]["loss"] != finals[1]["loss"]  # the seed varies training
    with (out / "summary.csv").open() as file:
        (fedavg,) = list(csv.DictReader(file))
    accuracies = [row["accuracy"] for row in finals]
    assert int(fedavg["runs"]) == 2 and int(fedavg["failed"]) == 0
    assert float(fedavg["final_accuracy_mean"]) == pytest.approx(sum(accuracies) / 2)
    spread = abs(accuracies[0] - accuracies[1]) / 2**0.5  # sample std of two values
    assert float(fedavg["final_accuracy_std"]) == pytest.approx(spread, abs=1e-12)
    with (out / "results.csv").open() as file:
        assert [row["seed"] for row in csv.DictReader(file)] == ["3", "4"]
    assert "±" in capsys.readouterr().out
