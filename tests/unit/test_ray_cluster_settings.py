"""The Ray a simulation runs on: a Ray instance of its own unless ``[simulation] ray-address`` or
``RAY_ADDRESS`` names an existing cluster, and what `check_cluster` refuses there, naming the
key (the run on a real cluster is in ``tests/e2e/test_ray_cluster.py``)."""

from __future__ import annotations

import pytest

from fedlora.errors import ConfigError
from simulations import recipes
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve

TINY = RECIPES_DIR / "tiny.toml"
MESSAGES = {"base-changes": "messages"}


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    """No cluster named in the environment unless a test names one."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def tiny(simulation: dict | None = None, run: dict | None = None):
    """The tiny recipe with ``simulation`` keys over its own and ``run`` keys over its run table."""
    recipe = load_recipe(TINY)
    tables = {"run": {**recipe.run, **(run or {})}, "simulation": recipe.simulation.table()}
    tables["simulation"].update(simulation or {})
    return load_recipe(tables)


def init_args(recipe) -> dict:
    return resolve(recipe).simulation.backend_config()["init_args"]


def test_without_a_cluster_ray_is_the_run_s_own():
    """``address="local"``: ray.init starts a Ray of the run's own even where ``ray start`` left
    a cluster on the machine (ray.init without an address would join it)."""
    assert init_args(tiny())["address"] == "local"


@pytest.mark.parametrize(
    ("machine", "simulation", "cpus"),
    [
        (64, {}, 6),  # the tiny recipe's 3 nodes of 2 CPUs: 3 workers, not 32
        (64, {"num-supernodes": 10, "num-cpus": 0.5}, 5),
        (2, {"num-supernodes": 10, "num-cpus": 1}, 2),  # the machine bounds it
        (2, {"num-cpus": 4096}, 2),  # no worker fits: Flower says so, as before
    ],
)
def test_a_run_s_own_ray_has_no_more_cpus_than_its_nodes_use(
    monkeypatch, machine, simulation, cpus
):
    monkeypatch.setattr(recipes, "machine_cpus", lambda: machine)
    assert init_args(tiny(simulation))["num_cpus"] == cpus


def test_the_machine_s_cpus_are_ray_s_count():
    from ray._private.utils import get_num_cpus

    assert recipes.machine_cpus() == int(get_num_cpus()) >= 1


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "head.example.org:6380"])
def test_ray_address_is_the_cluster_ray_joins(address):
    args = init_args(tiny({"ray-address": address}, MESSAGES))
    assert args["address"] == address
    assert "num_gpus" not in args and "num_cpus" not in args  # refused by ray.init on a cluster


def test_ray_address_env_names_the_cluster_when_the_recipe_does_not(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert init_args(tiny(run=MESSAGES))["address"] == "10.0.0.5:6379"
    assert init_args(tiny({"ray-address": "auto"}, MESSAGES))["address"] == "auto"


def test_a_shared_filesystem_is_stated_with_an_explicit_run_dir():
    recipe = resolve(tiny({"ray-address": "auto"}, {"base-changes": "run-dir"}))
    assert recipe.run["base-changes"] == "run-dir"


def test_the_in_process_engine_ignores_ray_address_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    recipe = resolve(tiny({"engine": "in-process"}))
    assert recipe.simulation.cluster_address() == ""


@pytest.mark.parametrize(
    ("simulation", "run", "named"),
    [
        ({"ray-address": 6379}, MESSAGES, "ray-address must be a string"),
        ({"ray-address": "10.0.0.5"}, MESSAGES, r"ray-address '10\.0\.0\.5' is neither"),
        ({"ray-address": "10.0.0.5:"}, MESSAGES, "ray-address '10.0.0.5:' is neither"),
        ({"ray-address": ":6379"}, MESSAGES, "ray-address ':6379' is neither"),
        ({"ray-address": "head:70000"}, MESSAGES, "ray-address 'head:70000' is neither"),
        ({"ray-address": "head:0"}, MESSAGES, "ray-address 'head:0' is neither"),
        ({"ray-address": "my head:6379"}, MESSAGES, "ray-address 'my head:6379' is neither"),
        ({"ray-address": "local"}, MESSAGES, "ray-address 'local' is neither"),
        ({"ray-address": "ray://head:10001"}, MESSAGES, "ray-address .* Ray Client"),
        ({"ray-address": "auto", "engine": "in-process"}, MESSAGES, "ray-address is for engine"),
        ({"ray-address": "auto", "gpus": 2}, MESSAGES, r"\[simulation\] gpus"),
        ({"ray-address": "auto"}, {}, "base-changes: on the Ray cluster of .* ray-address"),
    ],
)
def test_what_cannot_run_on_a_cluster_is_refused_naming_the_key(simulation, run, named):
    with pytest.raises(ConfigError, match=named):
        resolve(tiny(simulation, run))


@pytest.mark.parametrize(
    ("address", "simulation", "run", "named"),
    [
        ("head", {}, MESSAGES, "RAY_ADDRESS 'head' is neither"),
        ("ray://head:10001", {}, MESSAGES, "RAY_ADDRESS .* Ray Client"),
        ("head:6379", {"gpus": 1}, MESSAGES, r"gpus .* cluster of RAY_ADDRESS"),
        ("head:6379", {}, {}, "base-changes: on the Ray cluster of RAY_ADDRESS"),
    ],
)
def test_a_cluster_named_by_ray_address_env_is_checked_alike(
    monkeypatch, address, simulation, run, named
):
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match=named):
        resolve(tiny(simulation, run))


@pytest.mark.parametrize(
    ("simulation", "named"),
    [
        ({"group-size": 4}, "group-size = 4 needs engine = 'in-process'"),
        ({"group-size": 0, "engine": "in-process"}, "group-size must be an integer >= 1"),
        ({"group-size": 2.0, "engine": "in-process"}, "group-size must be an integer >= 1"),
    ],
)
def test_group_size_is_for_the_in_process_engine(simulation, named):
    with pytest.raises(ConfigError, match=named):
        resolve(tiny(simulation))
    assert resolve(tiny({"engine": "in-process", "group-size": 4})).simulation.group_size == 4
