"""Recipes: named runs as TOML, a ``[run]`` table and a ``[simulation]`` table.

``[run]`` holds Flower run-config keys (kebab-case, `fedlora.config.RunConfig`'s fields, and the
ServerApp's ``base-changes``); keys left out keep RunConfig's defaults. ``[simulation]`` says how
many virtual nodes run, what Ray gives each ClientApp and which Ray runs them: one of the run's
own, or an existing cluster (`check_cluster`). A recipe is resolved against
``key=value`` overrides of the run table (values are TOML scalars; a bare word is a string) and
checked by `RunConfig`, so a bad key or value is refused, named, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import (
    RunConfig,
    Scalar,
    ServerAppSettings,
    kebab,
    unknown_key,
    without_server_app_keys,
)
from fedlora.data.loading import load_dataset, load_eval_dataset
from fedlora.errors import ConfigError
from fedlora.method_config import parse_run_config
from fedlora.models.base_model import check_model_limits
from fedlora.run_records.tracking import check_trackers_installed
from fedlora.toml_values import toml_table

RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"
OUTPUT_KEYS = {RUN_DIR_KEY: "--out", RESUME_KEY: "--resume"}
"""ServerApp keys a recipe leaves to the command's options."""
BASE_CHANGES_KEY = "base-changes"
QUOTES_AND_BRACKETS = "\"'[{"
ENGINES = ("ray", "in-process")
RAY_ADDRESS_ENV = "RAY_ADDRESS"
"""Ray's environment variable naming a cluster to join, used when ``ray-address`` is empty."""
OWN_RAY = "local"
"""`ray.init`'s address for a Ray instance of the run's own, never a cluster found on the machine."""
AUTO_ADDRESS = "auto"
HOST_PORT = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")


@dataclass(frozen=True)
class SimulationSettings:
    """The ``[simulation]`` table.

    Parameters
    ----------
    num_supernodes : int (default: 10)
        Virtual nodes, one data partition each.
    num_cpus : float (default: 1.0)
        CPU cores Ray reserves per ClientApp; Ray runs cores / num_cpus ClientApps at once (a
        Ray of the run's own has at most num_supernodes x num_cpus cores).
    num_gpus : float (default: 0.0)
        GPUs per ClientApp; a fraction lets several share one (0.25: four per GPU).
    gpus : int (default: 0)
        How many of the host's GPUs Ray may hand out (0: every GPU it finds).
    engine : str (default: "ray")
        ``"ray"``: Flower's simulation engine, ClientApps in Ray workers (the resources above);
        ``"in-process"``: every node's ClientApp in this process, one after another
        (`simulations.in_process`; the resources above are not used).
    ray_address : str (default: "")
        An existing Ray cluster to run the ClientApps on: ``"auto"`` (the cluster ``ray start``
        started on this machine) or its head's ``"host:port"``; empty: the ``RAY_ADDRESS``
        environment variable if set, else a Ray instance of the run's own (`check_cluster`).
    group_size : int (default: 1)
        In-process engine: a round's training clients train ``group_size`` at a time in one
        forward/backward per step over the shared frozen base (docs/grouped-training.md); 1:
        one at a time.
    """

    num_supernodes: int = 10
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    gpus: int = 0
    engine: str = "ray"
    ray_address: str = ""
    group_size: int = 1

    def __post_init__(self) -> None:
        for name, least in (("num_supernodes", 1), ("gpus", 0), ("group_size", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise ConfigError(f"{kebab(name)} must be an integer >= {least}, got {value!r}")
        for name, allowed, bound in (
            ("num_cpus", lambda value: value > 0, "> 0"),
            ("num_gpus", lambda value: value >= 0, ">= 0"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not allowed(value):
                raise ConfigError(f"{kebab(name)} must be a number {bound}, got {value!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if not isinstance(self.ray_address, str):
            raise ConfigError(f"ray-address must be a string, got {self.ray_address!r}")
        if self.group_size > 1 and self.engine != "in-process":
            raise ConfigError(
                f"group-size = {self.group_size} needs engine = 'in-process': Flower's engine on "
                "Ray hands each node's message to a worker of its own"
            )

    @classmethod
    def from_table(cls, table: Mapping[str, Scalar]) -> SimulationSettings:
        fields = {kebab(field.name): field.name for field in dataclasses.fields(cls)}
        for key in table:
            if key not in fields:
                raise unknown_key(key, fields, "[simulation] ")
        return cls(**{fields[key]: value for key, value in table.items()})

    def cluster_address(self) -> str:
        """The Ray cluster the run joins: ``ray-address``, else ``RAY_ADDRESS``; empty for a Ray
        instance of the run's own, and for the in-process engine."""
        if self.engine != "ray":
            return ""
        return self.ray_address or os.environ.get(RAY_ADDRESS_ENV, "")

    def backend_config(self, shared_ray: str = "") -> dict:
        """Flower's Ray backend config: the client resources, the Ray to run on (the cluster, else
        ``shared_ray``, the address of an instance the command's runs share, else one of the run's
        own) and the GPUs it may use, Ray's own logs kept quiet. Flower passes ``init_args`` to
        `ray.init` and calls `ray.shutdown` after the run, which leaves a Ray it joined running."""
        address = self.cluster_address() or shared_ray
        init_args = {
            "address": address or OWN_RAY,
            "logging_level": "error",
            "log_to_driver": False,
        }
        if not address:
            init_args["num_cpus"] = self.own_ray_cpus()
        if self.gpus and not address:
            init_args["num_gpus"] = self.gpus
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": init_args,
        }

    def own_ray_cpus(self) -> int:
        """The CPUs of a Ray instance of the run's own: the machine's (`machine_cpus`), at most
        what its nodes can use at once (num-supernodes x num-cpus, rounded up). Flower starts a
        worker for every ``num-cpus`` of Ray's CPUs whether or not a node will use it, and each
        imports torch and builds the model: 32 workers for the tiny recipe's 3 nodes on 64 cores."""
        return max(1, min(machine_cpus(), math.ceil(self.num_supernodes * self.num_cpus)))

    def table(self) -> dict[str, Scalar]:
        return {kebab(name): value for name, value in dataclasses.asdict(self).items()}


def machine_cpus() -> int:
    """This machine's CPUs as Ray counts them (a container's CPU quota included); the OS's count
    where Ray does not say."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:
        return os.cpu_count() or 1
    return int(get_num_cpus())


@dataclass(frozen=True)
class Recipe:
    """A run table (Flower's run_config) and how to simulate it."""

    name: str
    run: dict[str, Scalar]
    simulation: SimulationSettings

    @property
    def run_config(self) -> RunConfig:
        return run_config_of(self.run)

    def to_toml(self) -> str:
        """The recipe as TOML that `load_recipe` reads back."""
        return f"[run]\n{toml_table(self.run)}\n[simulation]\n{toml_table(self.simulation.table())}"


def load_recipe(source: str | Path | Mapping) -> Recipe:
    """A recipe from a TOML file or a dict with ``run`` and ``simulation`` tables."""
    if isinstance(source, Mapping):
        name, tables = "recipe", dict(source)
    else:
        path = Path(source)
        tables = read_toml(path)
        name = path.stem
    unknown = sorted(set(tables) - {"run", "simulation"})
    if unknown:
        raise ConfigError(
            f"recipe {name!r}: unknown table(s) {unknown}; use [run] and [simulation]"
        )
    for table in ("run", "simulation"):
        if not isinstance(tables.get(table, {}), Mapping):
            raise ConfigError(f"recipe {name!r}: {table!r} must be a table ([{table}])")
    run = dict(tables.get("run", {}))
    for key, option in OUTPUT_KEYS.items():
        if key in run:
            raise ConfigError(f"recipe {name!r}: {key!r} is the command's to set (use {option})")
    return Recipe(name, run, SimulationSettings.from_table(tables.get("simulation", {})))


def read_toml(path: Path) -> dict:
    """A recipe file's tables; a missing, unreadable, non-UTF-8 or invalid file is named."""
    where = f"recipe {str(path)!r}"
    if not path.exists():
        raise ConfigError(f"{where} does not exist")
    if not path.is_file():
        raise ConfigError(f"{where} is not a file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{where} is not UTF-8 text: {error.reason} at byte {error.start}"
        ) from None
    except OSError as error:
        raise ConfigError(f"{where} cannot be read: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where} is not valid TOML: {error}") from None


def parse_overrides(pairs: Mapping[str, Scalar] | Sequence[str]) -> dict[str, Scalar]:
    """``key=value`` pairs as a dict; values are TOML scalars, a bare word is a string. A mapping
    (overrides parsed already) comes back as a copy."""
    if isinstance(pairs, Mapping):
        return dict(pairs)
    overrides = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"override {pair!r} is not key=value")
        overrides[key] = override_value(key, text.strip())
    return overrides


def override_value(key: str, text: str) -> Scalar:
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        if not text or text[0] in QUOTES_AND_BRACKETS:
            raise ConfigError(f"override {key!r}: {text!r} is not a TOML value") from None
        return text
    if not isinstance(value, int | float | str | bool):
        raise ConfigError(f"override {key!r}: {text!r} is not a scalar (int, float, str, bool)")
    return value


def resolve(
    recipe: Recipe,
    overrides: Mapping[str, Scalar] | Sequence[str] = (),
    strategy: str | None = None,
    rounds: int | None = None,
) -> Recipe:
    """The recipe with the overrides applied (then ``strategy``, ``rounds``), every run key
    checked and written out: RunConfig's fields resolved, the ServerApp's keys as given; the
    model's limits (positions, hidden size) and a local dataset file checked too."""
    overrides = parse_overrides(overrides)
    for key, option in OUTPUT_KEYS.items():
        if key in overrides:
            raise ConfigError(f"{key!r} is the command's to set (use {option})")
    run = {**recipe.run, **overrides}
    if strategy is not None:
        run["strategy"] = strategy
    if rounds is not None:
        run["num-server-rounds"] = rounds
    config = run_config_of(run)
    check_model_limits(config)
    if config.dataset != "bbcnews":
        load_dataset(config)  # a local file that cannot be read is named before anything runs
    if config.eval_dataset:
        load_eval_dataset(config)
    check_trackers_installed(config.tracking)
    resolved = {kebab(f.name): getattr(config, f.name) for f in dataclasses.fields(config)}
    if BASE_CHANGES_KEY in run:
        resolved[BASE_CHANGES_KEY] = run[BASE_CHANGES_KEY]
    resolved_recipe = dataclasses.replace(recipe, run=resolved)
    check_cluster(resolved_recipe)
    return resolved_recipe


def check_cluster(recipe: Recipe) -> None:
    """Refuse, naming the key, what cannot run on an existing Ray cluster: ``ray-address`` with
    the in-process engine; an address that is not ``"auto"`` or ``host:port`` (a Ray Client
    ``ray://`` address among them); ``gpus``, which limits a Ray instance of the run's own (each
    node's ``ray start --num-gpus`` sets a cluster's); and ``base-changes`` left at its default:
    the workers may not see the run directory, so the run says ``"messages"``, or ``"run-dir"``
    where every node shares its filesystem."""
    settings = recipe.simulation
    if settings.ray_address and settings.engine != "ray":
        raise ConfigError(
            f"[simulation] ray-address is for engine = 'ray'; engine = {settings.engine!r} runs "
            "every ClientApp in this process"
        )
    address = settings.cluster_address()
    if not address:
        return
    where = "[simulation] ray-address" if settings.ray_address else RAY_ADDRESS_ENV
    if "://" in address:
        raise ConfigError(
            f"{where} {address!r}: Ray Client addresses are not supported; run fedlora on a node "
            "of the cluster with the head's host:port (as `ray start --head` prints it) or 'auto'"
        )
    port = HOST_PORT.fullmatch(address)
    if address != AUTO_ADDRESS and (port is None or not 0 < int(port.group(1)) < 2**16):
        raise ConfigError(f"{where} {address!r} is neither 'auto' nor host:port")
    if settings.gpus:
        raise ConfigError(
            f"[simulation] gpus limits a Ray instance of the run's own; on the cluster of "
            f"{where} each node's `ray start --num-gpus` sets its GPUs: leave gpus at 0"
        )
    if BASE_CHANGES_KEY not in recipe.run:
        raise ConfigError(
            f"{BASE_CHANGES_KEY}: on the Ray cluster of {where}, set base-changes = 'messages' "
            "(workers that cannot read the run directory) or 'run-dir' (every node shares its "
            "filesystem)"
        )


def run_config_of(run: Mapping[str, Scalar]) -> RunConfig:
    """`RunConfig` of a run table; the ServerApp's keys are checked apart."""
    ServerAppSettings.from_flower(run)
    return parse_run_config(without_server_app_keys(run))
