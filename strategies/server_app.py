"""The Flower ServerApp: the run config's strategy, started from the base model's initial adapter,
with one JSON row per round in ``RUN_DIR/metrics.jsonl``, tracked live as the ``tracking`` key
asks (`fedlora.run_records.tracking`: TensorBoard event files in ``RUN_DIR/tensorboard`` by default).

Besides `fedlora.config.RunConfig`'s keys the run config may hold two of the ServerApp's own:
``run-dir`` (default: empty, a directory of the run's own, ``runs/flwr/<Flower run id>``) and
``base-changes``: ``run-dir`` (default; FedEx-LoRA and FLoRA clients catch their base up from
``RUN_DIR/base``, which they must be able to read, as in simulation) or ``messages`` (the changes
travel in the payloads, for deployment).

With ``resume = true`` it continues the experiment in ``run-dir`` from its newest checkpoint
(`strategies.checkpoint`, written every ``checkpoint-every`` rounds and after the last): a new
Flower run that adds its run id to the manifest; metrics rows and base changes newer than the
checkpoint are discarded.

The ServerApp owns its run directory's record (`strategies.run_record`): the manifest and the
status, ``running`` until the run ends ``finished``, ``interrupted`` or ``failed: <reason>``. A
run in which no round aggregated an update has failed; only a finished run is exported.

``app`` reads the run config from the context (``flwr run``); `server_app` binds one instead
(``flwr.simulation.run_simulation`` passes an empty run_config).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord, UserConfigValue
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedlora.config import (
    RunConfig,
    ServerAppSettings,
    every_k_rounds,
    without_server_app_keys,
)
from fedlora.lora.measurement import worst
from fedlora.method_config import parse_run_config
from fedlora.models.base_model import check_model_limits
from fedlora.process_exit import freeze_heap_at_exit
from fedlora.run_records.atomic_files import write_text_atomic
from fedlora.run_records.tracking import RunTracking, row_scalars
from fedlora.training.local import device_for
from fedlora.wire.base_store import discard_changes_after
from strategies import LoRAStrategy, strategy_class
from strategies.checkpoint import read_checkpoint, write_checkpoint
from strategies.client_dp import CLIPPED_METRIC, EPSILON_METRIC, ClientLevelDP
from strategies.evaluation import ServerEvaluation
from strategies.round_loop import run_rounds
from strategies.round_metrics import RoundMetrics, TrainMetrics
from strategies.run_record import (
    EXPORT_DIR,
    FINISHED,
    INTERRUPTED,
    mark_failed,
    record_start,
    write_status,
)
from strategies.stoppable_grid import SimulationStopped, StoppableGrid

logger = logging.getLogger(__name__)

FLWR_RUNS_DIR = Path("runs/flwr")
"""Where each run without a ``run-dir`` gets a directory of its own."""
SAMPLES_DIR = "samples"
"""``RUN_DIR/samples/round-N.jsonl``: the generation rounds' prompts, references and generations;
those of rounds after the one a run starts from are removed as it starts."""
MB = 1e6
"""Bytes in the megabyte of ``mb_up_total``, ``mb_down_total`` and ``communication-budget-mb``."""


def server_app(
    run_config: Mapping[str, UserConfigValue] | None = None, stop: threading.Event | None = None
) -> ServerApp:
    """A ServerApp; ``run_config`` (Flower's kebab-case keys) replaces the context's when given.
    With ``stop``, it stops waiting for replies once the event is set (`StoppableGrid`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if stop is not None:
            grid = StoppableGrid(grid, stop)
        run(grid, context.run_config if run_config is None else run_config, context.run_id)

    return app


freeze_heap_at_exit()  # a deployed ServerApp's process ends with its run
app = server_app()


def run(
    grid: Grid, run_config: Mapping[str, UserConfigValue], flower_run_id: int | None = None
) -> LoRAStrategy:
    """Run the configured strategy for ``num-server-rounds`` rounds, recording how the run went
    in its run directory; return the strategy."""
    settings = ServerAppSettings.from_flower(run_config)
    run_dir = run_directory(settings.run_dir, flower_run_id)
    resume, base_changes = settings.resume, settings.base_changes
    values = without_server_app_keys(run_config)
    config = parse_run_config(values)
    check_model_limits(config)
    checkpoint = read_checkpoint(run_dir) if resume else None
    record_start(run_dir, str(device_for(config)), flower_run_id)
    try:
        strategy = make_strategy(config, run_dir / "base" if base_changes == "run-dir" else None)
        evaluation = ServerEvaluation(config)
        arrays, first_round, rows = strategy.initial_arrays(config), 1, []
        if checkpoint is not None:
            checkpoint.restore(strategy)
            first_round, rows = checkpoint.server_round + 1, checkpoint.rows
            if strategy.base_store is not None:
                discard_changes_after(strategy.base_store, checkpoint.server_round)
        log = MetricsLog(run_dir / "metrics.jsonl", strategy, evaluation, config, rows)
        tracking = RunTracking(config.tracking, run_dir, values, first_round)

        def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
            written = len(log.rows)
            log.end_of_round(server_round, arrays)
            for row in log.rows[written:]:
                tracking.log_row(row)
                log_server_metrics(row)
            if every_k_rounds(server_round, config.checkpoint_every, config.num_server_rounds):
                write_checkpoint(run_dir, server_round, strategy, log.rows)

        try:
            run_rounds(
                strategy,
                grid,
                arrays,
                first_round,
                config.num_server_rounds,
                config.round_timeout,
                end_of_round,
                config.evaluates,
            )
        finally:
            tracking.close()
        if not any(row["clients"] for row in log.rows):
            mark_failed(run_dir, "no round aggregated an update (see the log's dropped replies)")
            return strategy
        evaluation.export(strategy.rule, strategy.state, run_dir / EXPORT_DIR)
    except KeyboardInterrupt:
        write_status(run_dir, INTERRUPTED)
        raise
    except SimulationStopped:
        raise  # the runner that stopped the engine says how the run ended
    except BaseException as error:
        mark_failed(run_dir, f"{type(error).__name__}: {error}")
        raise
    write_status(run_dir, FINISHED)
    return strategy


def log_server_metrics(row: dict) -> None:
    """Log a row's numbers as ``name=value`` pairs (4 significant digits; not the by-rank,
    by-client or by-partition ones) in Flower's log, which ``flwr run --stream`` shows."""
    scalars = row_scalars({key: value for key, value in row.items() if not isinstance(value, dict)})
    pairs = ", ".join(f"{name}={value:.4g}" for name, value in scalars.items())
    log(INFO, "\t└──> Server metrics, round %d: %s", row["round"], pairs)


def run_directory(run_dir: str, flower_run_id: int | None) -> Path:
    """``run-dir`` when given, else a directory of the run's own under `FLWR_RUNS_DIR`: its
    Flower run id, or the start time when it has none."""
    if run_dir:
        return Path(run_dir)
    name = str(flower_run_id) if flower_run_id else time.strftime("%Y%m%d-%H%M%S")
    return FLWR_RUNS_DIR / name


def make_strategy(config: RunConfig, base_store: Path | None) -> LoRAStrategy:
    """The strategy named by ``strategy``, with its own options, sampling and seeds from the run
    config."""
    strategy = strategy_class(config.strategy)
    return strategy(
        lora_alpha=config.lora_alpha,
        rslora=config.rslora,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        min_available_nodes=max(config.min_train_nodes, config.min_evaluate_nodes),
        probe_seed=config.seed,
        query_timeout=config.round_timeout,
        max_examples_per_client=config.max_examples_per_client,
        base_store=base_store,
        client_dp=client_dp(config),
        **strategy.options_from(config),
    )


def client_dp(config: RunConfig) -> ClientLevelDP | None:
    """Client-level DP from the ``dp-client-*`` keys (the accountant: ``dp-accountant``)."""
    if not config.dp_client:
        return None
    return ClientLevelDP(
        config.dp_client_clip,
        config.dp_client_noise_multiplier,
        delta=config.dp_client_delta,
        accountant=config.dp_accountant,
        noise_seed=None if config.dp_client_noise_seed < 0 else config.dp_client_noise_seed,
        init_clip=config.dp_client_init_clip,
    )


class MetricsLog:
    """Appends one JSON object per round: round, accuracy and loss (``accuracy_source`` says whose:
    "server", the global model at the top rank on the server's held-out set, with
    ``accuracy_by_rank``; or "clients", their example-weighted held-out accuracy, personal models
    for FedSA-LoRA), client_accuracy and client_loss, train_loss, relative_deviation (the worst
    measured in the round, by train and evaluate replies, NaN when one measured NaN; null when
    none, as for FedSA-LoRA), dropped (the nodes whose replies or rank answers were dropped in the
    round, by node id, with the reason),
    bytes_up, bytes_down (train and evaluate payloads), bytes_up_by_client and
    bytes_down_by_client (the train exchange, by partition id), seconds (wall time of the round's
    training and client evaluation), train_seconds and client_seconds (the slowest client's local
    training and whole handling of its train message), aggregate_seconds (the rule),
    communication_seconds (the train exchange beyond the slowest client's handling) and
    server_eval_seconds; with client-level DP, client_dp_epsilon (spent so far) and
    client_dp_clipped (the fraction of the round's clients that had to clip); with sample-level
    DP, epsilon_max, epsilon (by partition id, of the clients that replied) and dp_stopped
    (clients whose budget was spent); mb_up_total and mb_down_total (the run's bytes_up and
    bytes_down so far, in MB of 10^6 bytes; a warning is logged in the round their sum first
    passes ``communication-budget-mb``); with ``generation-every``, the generation score's column
    (answer_accuracy or rouge_l) and eval_loss (the held-out responses' loss) in the rounds that
    generate, null in the others, and ``samples/round-N.jsonl`` (prompt, reference, generation);
    with ``client-generation``, client_answer_accuracy or client_rouge_l (the clients'
    example-weighted score on their held-out splits). In the rounds that ``evaluate-every`` skips
    (no evaluate exchange, no server evaluation) accuracy, loss, client_accuracy, client_loss and
    accuracy_by_rank's values are null, its keys kept."""

    def __init__(
        self,
        path: Path,
        strategy: LoRAStrategy,
        evaluation: ServerEvaluation,
        config: RunConfig,
        rows: list[dict] | None = None,
    ) -> None:
        self.rows = list(rows or [])
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in self.rows))
        discard_samples_after(path.parent / SAMPLES_DIR, self.rows[-1]["round"] if self.rows else 0)
        self.path, self.strategy, self.evaluation, self.config = path, strategy, evaluation, config
        self.round_start = time.perf_counter()
        last = self.rows[-1] if self.rows else {}
        self.mb_up_total = last.get("mb_up_total", 0.0)
        self.mb_down_total = last.get("mb_down_total", 0.0)

    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called before the first round and after every round; a row per round not written yet
        (a resumed run's hook before its first round, at its checkpoint's round, writes none)."""
        if server_round > 0 and server_round > len(self.rows):
            row = self.row(server_round, time.perf_counter() - self.round_start)
            self.rows.append(row)
            with self.path.open("a") as file:
                file.write(json.dumps(row) + "\n")
        self.round_start = time.perf_counter()
        return None

    def row(self, server_round: int, seconds: float) -> dict:
        train = self.strategy.train_metrics.get(server_round, TrainMetrics())
        evaluation = self.strategy.evaluate_metrics.get(server_round)
        measured = [train.relative_deviation]
        if evaluation is not None:
            measured.append(evaluation.relative_deviation)
        deviations = [deviation for deviation in measured if deviation is not None]
        started = time.perf_counter()
        server = self.evaluation(self.strategy.rule, self.strategy.state, server_round)
        bytes_up = train.bytes_up + (train.setup_bytes_up or 0)
        bytes_down = train.bytes_down + (evaluation.bytes_down if evaluation else 0)
        client_accuracy = evaluation.accuracy if evaluation else None
        client_loss = evaluation.loss if evaluation else None
        mb_up_total, mb_down_total = self.communication_totals(server_round, bytes_up, bytes_down)
        return RoundMetrics(
            round=server_round,
            strategy=self.strategy.rule.name,
            accuracy=server["accuracy"] if server else client_accuracy,
            accuracy_source="server" if server else "clients",
            loss=server["loss"] if server else client_loss,
            accuracy_by_rank=server["accuracy_by_rank"] if server else None,
            client_accuracy=client_accuracy,
            client_loss=client_loss,
            train_loss=train.loss,
            relative_deviation=worst(deviations) if deviations else None,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            mb_up_total=mb_up_total,
            mb_down_total=mb_down_total,
            bytes_up_by_client=train.bytes_up_by_client,
            bytes_down_by_client=train.bytes_down_by_client,
            base_store_bytes=train.base_store_bytes or 0,
            clients=train.clients,
            dropped={
                str(node): why for node, why in self.strategy.dropped.get(server_round, {}).items()
            },
            seconds=seconds,
            train_seconds=train.train_seconds,
            train_busy_seconds=train.train_busy_seconds,
            client_seconds=train.client_seconds,
            aggregate_seconds=train.aggregate_seconds,
            communication_seconds=train.communication_seconds,
            server_eval_seconds=time.perf_counter() - started,
            client_dp=self.client_dp_columns(train),
            sample_dp=train.sample_dp,
            generation=self.generation_columns(server_round, server),
        ).to_row()

    def communication_totals(
        self, server_round: int, bytes_up: int, bytes_down: int
    ) -> tuple[float, float]:
        """The running totals in MB; warns in the round their sum first passes the budget."""
        before = self.mb_up_total + self.mb_down_total
        self.mb_up_total += bytes_up / MB
        self.mb_down_total += bytes_down / MB
        budget = self.config.communication_budget_mb
        if 0 < budget < self.mb_up_total + self.mb_down_total and before <= budget:
            logger.warning(
                "round %d: the run has sent %.3f MB up and %.3f MB down, past its "
                "communication budget of %g MB",
                server_round,
                self.mb_up_total,
                self.mb_down_total,
                budget,
            )
        return self.mb_up_total, self.mb_down_total

    def generation_columns(self, server_round: int, server: dict | None) -> dict:
        """The generation score's column and eval_loss (null in rounds without generation), and
        the round's samples file; nothing without ``generation-every``."""
        if not self.config.generation_every:
            return {}
        report = server["generation"] if server else None
        column = self.evaluation.generation.column
        clients = {}
        if self.config.client_generation:
            evaluation = self.strategy.evaluate_metrics.get(server_round)
            clients = {f"client_{column}": evaluation.generation if evaluation else None}
        if report is None:
            return {column: None, "eval_loss": None, **clients}
        samples = self.path.parent / SAMPLES_DIR / f"round-{server_round}.jsonl"
        samples.parent.mkdir(exist_ok=True)
        samples.write_text("".join(json.dumps(sample) + "\n" for sample in report.samples))
        return {column: report.value, "eval_loss": server["loss"], **clients}

    def client_dp_columns(self, train: TrainMetrics) -> dict:
        """The round's client-level DP columns (none without it); epsilon from the accountant
        when the round released nothing."""
        if self.strategy.client_dp is None:
            return {}
        return {
            EPSILON_METRIC: train.client_dp.get(EPSILON_METRIC, self.strategy.client_dp.epsilon()),
            CLIPPED_METRIC: train.client_dp.get(CLIPPED_METRIC),
        }


def discard_samples_after(folder: Path, server_round: int) -> None:
    """Remove the samples files of rounds after ``server_round`` (all of them for a new run):
    a resumed run writes those rounds again."""
    for path in folder.glob("round-*.jsonl"):
        if int(path.stem.removeprefix("round-")) > server_round:
            path.unlink()
