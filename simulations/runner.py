"""Run a recipe in Flower's simulation engine on Ray, or in this process, and leave a run directory behind.

Ray is an instance of the run's own, or an existing cluster the recipe names
(`simulations.recipes.check_cluster`), which stays up after the run.

On Ray the clients' splits are computed here once and written to the run directory, where the
workers read their rows (`fedlora.data.shared_splits`; a worker that cannot, partitions itself).

`flwr.simulation.run_simulation` passes an empty run_config, so the ServerApp and the ClientApp
are bound to the resolved run config (`strategies.server_app.server_app`,
`clients.app.client_app`). Flower's log goes to ``RUN_DIR/flower.log``, not to the console;
Ray's own logging is set to errors, without its workers' output. A ClientApp that raises does not
stop Flower's run (the strategy drops the reply); the runner raises afterwards with its reason.
When the engine itself crashes (Ray cannot start, say), the ServerApp is told to stop waiting for
replies, and the runner raises with the project's own error in the chain of causes (else the
innermost one), the traceback written to ``flower.log``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from flwr.common.logger import FLOWER_LOGGER, console_handler
from flwr.simulation import run_simulation

from clients.app import client_app
from fedlora.data.shared_splits import write_splits
from fedlora.errors import ConfigError, InvalidUpdateError, SimulationError
from fedlora.run_records.atomic_files import write_text_atomic
from fedlora.wire.messages import Scalar
from simulations.in_process import run_in_process
from simulations.recipes import (
    RESUME_KEY,
    RUN_DIR_KEY,
    Recipe,
    check_cluster,
    load_recipe,
    resolve,
    run_config_of,
)
from simulations.run_dir import (
    CONFIG_FILE,
    FLOWER_LOG,
    METRICS_JSONL,
    RowCallback,
    claim_run_dir,
    following,
    read_metrics,
    write_metrics_csv,
)
from strategies.checkpoint import checkpoint_rounds
from strategies.run_record import (
    EXPORT_DIR,
    FINISHED,
    INTERRUPTED,
    mark_failed,
    read_status,
    write_status,
)
from strategies.server_app import server_app

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*(\w*(?:Error|Exception)): .*$", re.MULTILINE)
"""A traceback's last line, e.g. ``ValueError: bad shape``."""
WRAPPING_EXCEPTIONS = ("ClientAppException", "RayTaskError")
"""Exceptions Flower and Ray wrap a ClientApp's own in; the reason is the wrapped one."""
PROJECT_ERRORS = (ConfigError, InvalidUpdateError, SimulationError)
"""The project's own errors, whose messages name the problem."""
PROJECT_ERROR_NAMES = {error.__name__ for error in PROJECT_ERRORS}
INTERRUPTED_HINT = (
    "fedlora: interrupted; a run is marked so in its status and goes on from its last "
    "checkpoint with: fedlora simulate --resume RUN_DIR"
)
INTERRUPT_GRACE_SECONDS = 5.0
"""How long Ctrl-C waits for the engine to wind down before the process exits (status 130)."""


def simulate(
    recipe: str | Path | Mapping | Recipe,
    overrides: Mapping[str, Scalar] | Sequence[str] = (),
    out_dir: str | Path = "runs/latest",
    strategy: str | None = None,
    rounds: int | None = None,
    on_round: RowCallback | None = None,
    overwrite: bool = False,
    shared_ray: str = "",
) -> Path:
    """Run ``recipe`` (a TOML path, a dict of tables or a `Recipe`) with the overrides applied;
    return the run directory. ``shared_ray``: the address of a Ray instance that the command's
    runs share (`simulations.shared_ray`), used where the recipe names no cluster.

    ``out_dir`` must be empty or absent, or, with ``overwrite``, an earlier run's directory (it
    is emptied). It receives ``config.toml`` (the resolved recipe), the manifest and status of
    `strategies.run_record`, ``metrics.jsonl`` (one row per round, from the ServerApp),
    ``metrics.csv`` (the same rows, written after the run, even a failed one) and
    ``flower.log``. ``on_round`` is called with each row as the ServerApp writes it (from another
    thread). Raises `fedlora.errors.ConfigError` before anything starts when a key or value is
    bad or the directory is taken, and `SimulationError` when the run fails, a node's ClientApp
    raised, or rounds are missing: the run is then marked failed and has no export.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    resolved = resolve(recipe, overrides, strategy, rounds)
    run_dir = Path(out_dir).resolve()
    claim_run_dir(run_dir, overwrite)
    write_text_atomic(run_dir / CONFIG_FILE, resolved.to_toml())
    logger.info("simulating %s into %s", resolved.name, run_dir)
    run_config = {**resolved.run, RUN_DIR_KEY: str(run_dir)}
    return run_in(run_dir, resolved, run_config, on_round, shared_ray)


def resume(run_dir: str | Path, on_round: RowCallback | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint, with the recipe its
    ``config.toml`` holds; return the run directory. The rows and base changes newer than the
    checkpoint are discarded; the nodes go on from their own stores. Raises
    `fedlora.errors.ConfigError` when the directory holds no run to resume or its recipe cannot
    run on the Ray cluster it names, and `SimulationError` as `simulate` does."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"{run_dir} holds no {CONFIG_FILE}: not a fedlora run directory")
    if read_status(run_dir) == FINISHED:
        raise ConfigError(f"the run in {run_dir} is finished: nothing to resume")
    if not checkpoint_rounds(run_dir):
        raise ConfigError(f"{run_dir} holds no checkpoint to resume from")
    recipe = load_recipe(run_dir / CONFIG_FILE)
    check_cluster(recipe)
    logger.info("resuming %s", run_dir)
    run_config = {**recipe.run, RUN_DIR_KEY: str(run_dir), RESUME_KEY: True}
    return run_in(run_dir, recipe, run_config, on_round)


def run_in(
    run_dir: Path,
    resolved: Recipe,
    run_config: Mapping[str, Scalar],
    on_round: RowCallback | None,
    shared_ray: str = "",
) -> Path:
    """Run the engine into ``run_dir``; the metrics CSV after it, and the status (failed:
    no export; interrupted)."""
    stop = threading.Event()
    try:
        with (
            interruptible(run_dir, stop),
            quiet_run(run_dir / FLOWER_LOG) as errors,
            following(run_dir / METRICS_JSONL, on_round),
        ):
            try:
                run_engine(resolved, run_config, stop, shared_ray)
            finally:
                stop.set()
                rows = read_metrics(run_dir)
                write_metrics_csv(run_dir, rows)
        check_complete(run_dir, rows, resolved.run_config.num_server_rounds, errors)
    except SimulationError as error:
        mark_failed(run_dir, str(error))
        shutil.rmtree(run_dir / EXPORT_DIR, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        write_status(run_dir, INTERRUPTED)
        raise
    return run_dir


@contextmanager
def interruptible(run_dir: Path, stop: threading.Event) -> Iterator[None]:
    """Ctrl-C (SIGINT) while the engine runs: the ServerApp stops waiting for replies, the run is
    marked interrupted and KeyboardInterrupt is raised; if the engine has not wound down within
    `INTERRUPT_GRACE_SECONDS` (Ray or Flower may hold the main thread), the process exits with
    status 130. Checkpoints are written atomically, so the last one stays valid either way.
    Only the main thread can take signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame) -> None:
        stop.set()
        write_status(run_dir, INTERRUPTED)
        threading.Thread(target=exit_after_grace, daemon=True).start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_after_grace() -> None:
    time.sleep(INTERRUPT_GRACE_SECONDS)
    print(INTERRUPTED_HINT, file=sys.stderr, flush=True)
    os._exit(130)


def run_engine(
    recipe: Recipe, run_config: Mapping[str, Scalar], stop: threading.Event, shared_ray: str = ""
) -> None:
    """The recipe's engine (Flower's simulation engine on Ray, or this process) with the bound
    apps; `SimulationError` with `reported_cause` when the engine itself fails."""
    settings = recipe.simulation
    try:
        if settings.engine == "in-process":  # one thread: Ctrl-C reaches the ServerApp itself
            run_in_process(
                server_app(run_config),
                client_app(run_config),
                settings.num_supernodes,
                settings.group_size,
            )
        else:
            share_splits(run_config, settings.num_supernodes)
            run_simulation(
                server_app=server_app(run_config, stop),
                client_app=client_app(run_config),
                num_supernodes=settings.num_supernodes,
                backend_config=settings.backend_config(shared_ray),
            )
    except Exception as error:
        FLOWER_LOGGER.error("the simulation failed", exc_info=error)
        log_file = Path(str(run_config[RUN_DIR_KEY])) / FLOWER_LOG
        raise SimulationError(f"{reported_cause(error)} (see {log_file})") from error


def share_splits(run_config: Mapping[str, Scalar], num_partitions: int) -> None:
    """The clients' splits written once for the workers (`fedlora.data.shared_splits`); data that
    cannot be split is left for the clients to report, as they do without the file."""
    try:
        write_splits(Path(str(run_config[RUN_DIR_KEY])), run_config_of(run_config), num_partitions)
    except ConfigError as error:
        logger.info("no shared splits: %s", error)


def reported_cause(error: BaseException) -> str:
    """The error to show of ``error``'s chain of causes (Flower wraps the engine's crash twice):
    the outermost of the project's own (`fedlora.errors`: its message names the problem), else
    the innermost, as ``Name: first line``."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    shown = next((e for e in chain if isinstance(e, PROJECT_ERRORS)), chain[-1])
    lines = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def check_complete(
    run_dir: Path, rows: list[dict], num_rounds: int, errors: list[logging.LogRecord]
) -> None:
    """Raise `SimulationError` when Flower logged an error (a ClientApp that raised) or a round
    is missing from the metrics."""
    if errors:
        raise SimulationError(
            f"{error_reason(errors)} (the first error of the run; see {run_dir / FLOWER_LOG})"
        )
    if len(rows) != num_rounds:
        raise SimulationError(
            f"{len(rows)} of {num_rounds} rounds in {run_dir / METRICS_JSONL}; "
            f"see {run_dir / FLOWER_LOG}"
        )


def error_reason(records: list[logging.LogRecord]) -> str:
    """The first of the project's own errors named in the records (a traceback names a library's
    cause before it), else the first exception past Flower's and Ray's wrappers; else the first
    record's message."""
    named = [
        match
        for record in records
        for match in EXCEPTION_LINE.finditer(record.getMessage())
        if match.group(1) not in WRAPPING_EXCEPTIONS
    ]
    own = [match for match in named if match.group(1) in PROJECT_ERROR_NAMES]
    return (own or named)[0].group(0) if named else records[0].getMessage()


class ErrorRecords(logging.Handler):
    """Keeps the error records it sees."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def quiet_run(path: Path) -> Iterator[list[logging.LogRecord]]:
    """Send Flower's log to ``path`` instead of the console (nor to the root logger, which
    Opacus gives a console handler on import) and silence Ray's tips (FutureWarnings); yield
    Flower's error records."""
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    errors = ErrorRecords()
    console_level = console_handler.level
    console_handler.setLevel(logging.CRITICAL + 1)
    propagate = FLOWER_LOGGER.propagate
    FLOWER_LOGGER.propagate = False
    FLOWER_LOGGER.addHandler(file_handler)
    FLOWER_LOGGER.addHandler(errors)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            yield errors.records
    finally:
        FLOWER_LOGGER.removeHandler(errors)
        FLOWER_LOGGER.removeHandler(file_handler)
        file_handler.close()
        console_handler.setLevel(console_level)
        FLOWER_LOGGER.propagate = propagate
