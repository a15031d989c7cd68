"""A round's metrics as typed records: what the strategy measures in its train and evaluate
exchanges (`TrainMetrics`, `EvaluateMetrics`, Flower's MetricRecord by `to_record`), and the row
the ServerApp writes to ``metrics.jsonl`` (`RoundMetrics`, by `to_row`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import MetricRecord

from fedlora.privacy.sample_level import EPSILON_KEY
from fedlora.wire.messages import ACCURACY_KEY, GENERATION_KEY, LOSS_KEY

TIMING_COLUMNS = (
    "train_seconds",
    "train_busy_seconds",
    "client_seconds",
    "aggregate_seconds",
    "communication_seconds",
)
"""The train exchange's seconds in a row, as `strategies.base.LoRAStrategy` measures them."""


@dataclass
class SampleDP:
    """Sample-level DP in a round: each replying client's epsilon by partition id, the largest,
    and how many clients stopped with their budget spent."""

    epsilons: dict[str, float]
    dp_stopped: int

    @property
    def epsilon_max(self) -> float:
        return max(self.epsilons.values())

    def to_record(self) -> dict[str, float]:
        return {
            **{f"{EPSILON_KEY}.{pid}": epsilon for pid, epsilon in self.epsilons.items()},
            "epsilon_max": self.epsilon_max,
            "dp_stopped": self.dp_stopped,
        }

    def to_row(self) -> dict:
        return {
            "epsilon_max": self.epsilon_max,
            "epsilon": dict(self.epsilons),
            "dp_stopped": self.dp_stopped,
        }


@dataclass
class TrainMetrics:
    """A train exchange: the clients' example-weighted loss, the slowest client's seconds, bytes in total and by partition id, and the privacy metrics. A round
    without enough valid updates has ``clients`` 0 and nothing measured but its sample-level DP."""

    clients: int = 0
    loss: float | None = None
    num_examples: int = 0
    train_seconds: float | None = None
    train_busy_seconds: float | None = None
    client_seconds: float | None = None
    communication_seconds: float | None = None
    aggregate_seconds: float | None = None
    bytes_up_by_client: dict[str, int] = field(default_factory=dict)
    bytes_down_by_client: dict[str, int] = field(default_factory=dict)
    bytes_down: int = 0
    base_store_bytes: int | None = None
    setup_bytes_up: int | None = None
    client_dp: dict[str, float] = field(default_factory=dict)
    """Client-level DP's metrics of the round (`strategies.client_dp.ClientLevelDP.aggregate`)."""
    sample_dp: SampleDP | None = None
    relative_deviation: float | None = None

    @property
    def bytes_up(self) -> int:
        return sum(self.bytes_up_by_client.values())

    def to_record(self) -> MetricRecord:
        if self.loss is None:
            return MetricRecord({"clients": 0, **self.sample_dp_record()})
        metrics = {
            LOSS_KEY: self.loss,
            "num_examples": self.num_examples,
            "clients": self.clients,
            "train_seconds": self.train_seconds,
            **optional("train_busy_seconds", self.train_busy_seconds),
            "client_seconds": self.client_seconds,
            "communication_seconds": self.communication_seconds,
            "aggregate_seconds": self.aggregate_seconds,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            **{f"bytes_up.{pid}": size for pid, size in self.bytes_up_by_client.items()},
            **{f"bytes_down.{pid}": size for pid, size in self.bytes_down_by_client.items()},
            **optional("base_store_bytes", self.base_store_bytes),
            **optional("setup_bytes_up", self.setup_bytes_up),
            **self.client_dp,
            **self.sample_dp_record(),
            **optional("relative_deviation", self.relative_deviation),
        }
        return MetricRecord(metrics)

    def sample_dp_record(self) -> dict[str, float]:
        return {} if self.sample_dp is None else self.sample_dp.to_record()


@dataclass
class EvaluateMetrics:
    """An evaluate exchange: the clients' example-weighted loss, accuracy and generation score
    (when every client measured one), the bytes sent and the measured deviation."""

    loss: float
    accuracy: float
    num_examples: int
    bytes_down: int
    relative_deviation: float | None = None
    generation: float | None = None

    def to_record(self) -> MetricRecord:
        return MetricRecord(
            {
                LOSS_KEY: self.loss,
                ACCURACY_KEY: self.accuracy,
                "num_examples": self.num_examples,
                "bytes_down": self.bytes_down,
                **optional("relative_deviation", self.relative_deviation),
                **optional(GENERATION_KEY, self.generation),
            }
        )


@dataclass
class RoundMetrics:
    """One row of ``metrics.jsonl`` (its columns: `strategies.server_app.MetricsLog`). The
    optional groups of columns are written only when the run has them: client-level DP
    (``client_dp``), sample-level DP (``sample_dp``) and generation (``generation``, the score's
    column and ``eval_loss``)."""

    round: int
    strategy: str
    accuracy: float | None
    accuracy_source: str
    loss: float | None
    accuracy_by_rank: dict[str, float | None] | None
    client_accuracy: float | None
    client_loss: float | None
    train_loss: float | None
    relative_deviation: float | None
    bytes_up: int
    bytes_down: int
    mb_up_total: float
    mb_down_total: float
    bytes_up_by_client: dict[str, int]
    bytes_down_by_client: dict[str, int]
    base_store_bytes: int
    clients: int
    dropped: dict[str, str]
    seconds: float
    train_seconds: float | None
    train_busy_seconds: float | None
    client_seconds: float | None
    aggregate_seconds: float | None
    communication_seconds: float | None
    server_eval_seconds: float
    client_dp: dict[str, float | None] = field(default_factory=dict)
    sample_dp: SampleDP | None = None
    generation: dict[str, float | None] = field(default_factory=dict)

    def to_row(self) -> dict:
        """The JSON object of the row, its keys in the file's order."""
        return {
            "round": self.round,
            "strategy": self.strategy,
            "accuracy": self.accuracy,
            "accuracy_source": self.accuracy_source,
            "loss": self.loss,
            "accuracy_by_rank": self.accuracy_by_rank,
            "client_accuracy": self.client_accuracy,
            "client_loss": self.client_loss,
            "train_loss": self.train_loss,
            "relative_deviation": self.relative_deviation,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "mb_up_total": self.mb_up_total,
            "mb_down_total": self.mb_down_total,
            "bytes_up_by_client": self.bytes_up_by_client,
            "bytes_down_by_client": self.bytes_down_by_client,
            "base_store_bytes": self.base_store_bytes,
            "clients": self.clients,
            "dropped": self.dropped,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "train_busy_seconds": self.train_busy_seconds,
            "client_seconds": self.client_seconds,
            "aggregate_seconds": self.aggregate_seconds,
            "communication_seconds": self.communication_seconds,
            "server_eval_seconds": self.server_eval_seconds,
            **self.client_dp,
            **({} if self.sample_dp is None else self.sample_dp.to_row()),
            **self.generation,
        }


def covered_seconds(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """Seconds of ``window`` (start, end) that at least one of ``intervals`` covers, each interval
    clipped to the window: a group's interval counts once, and a client's clock that disagrees
    with the server's cannot stretch it past the window."""
    low, high = window
    covered, reached = 0.0, low
    for start, end in sorted(intervals):
        start, end = max(start, reached), min(end, high)
        if end > start:
            covered += end - start
            reached = end
    return covered


def optional(key: str, value: float | None) -> dict[str, float]:
    """``{key: value}``, or nothing for None."""
    return {} if value is None else {key: value}
