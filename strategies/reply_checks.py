"""Every reply checked on its own, before anything in it can change the server's state.

A node restates its report in every reply (partition id, ranks, scales, base version); a train
reply adds its update and metrics, an evaluate reply its metrics, both the probe responses. Each
check that fails raises `RejectedReply` whose message is the reason; the strategy then drops that
one reply (or, for a rank query, leaves the node out), names the node and the reason, and goes on
with the others.

- Identity: the node id is the message's source node (what Flower authenticates); it is bound to
  the partition id it first answered with, and a reply claiming another partition (or a
  partition bound to another node) is refused.
- Ranks: integers from 1 to the run's top rank for exactly the global modules (a non-empty
  subset of them where the rule `allows_module_subsets`, in a configuration the rule allows:
  `AggregationRule.rank_refusal`); a train reply's
  at most what the server sent that node, any start rank exactly what it sent.
- Scales: the server's, alpha / r (alpha / sqrt(r) with rsLoRA) for the node's rank; a reply that
  restates another is refused (rules whose clients run at scale 1 declare ``scaled = False``).
- Versions: from 0 to the server's.
- Example counts: integers from 1 (train) or 0 (evaluate) to ``max_examples``.
- Metrics a step reads (``loss``, ``seconds``, ``accuracy``...): present, numbers, finite.
- Tensors: exactly the keys and shapes the rule declares for the node's ranks
  (`AggregationRule.reply_shapes`) and the server's head; float32 or float16 (or the server's own
  dtype), no bigger when serialized than that shape needs, finite; cast to the server's dtype.
  Probe responses (measurements, NaN allowed) one (d_out x `PROBE_COUNT`) array per module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import RecordDict
from torch import Tensor

from fedlora.lora.adapter import lora_scale
from fedlora.lora.probes import PROBE_COUNT, PROBE_RECORD
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import AggregationRule, ClientSpec, GlobalState
from fedlora.wire.messages import (
    ACCURACY_KEY,
    ADAPTER_RECORD,
    CONFIG_RECORD,
    GENERATION_KEY,
    HANDLER_SECONDS_KEY,
    HEAD_RECORD,
    LOSS_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SECONDS_KEY,
    TRAIN_STARTED_KEY,
    VERSION_KEY,
    rank_key,
    rank_modules,
    scale_key,
    start_rank_key,
)
from strategies.records import NodeReport, record_tensors, update_from_tensors

WIRE_DTYPES = ("float32", "float16")
"""The dtypes an update's tensors may travel in (besides the server's own)."""
PROBE_DTYPES = ("float32", "float64")
NPY_HEADER_BYTES = 1024
"""What a serialized array may take beyond its data (numpy's header)."""
TRAIN_METRICS = (LOSS_KEY, SECONDS_KEY)
EVALUATE_METRICS = (LOSS_KEY, ACCURACY_KEY)
OPTIONAL_METRICS = (HANDLER_SECONDS_KEY, TRAIN_STARTED_KEY, GENERATION_KEY)
SCALE_TOLERANCE = 1e-6
"""Relative tolerance of a restated scale against the server's."""


class RejectedReply(Exception):
    """A reply that fails a check; its message is the reason."""


@dataclass
class ReplyChecks:
    """The checks of one strategy's replies, and the node-to-partition binding they keep.

    Parameters
    ----------
    rule : AggregationRule
        Declares the update's tensors (``reply_shapes``) and whether it runs at a scale.
    lora_alpha, rslora : float, bool
        The run's scale: alpha / r, or alpha / sqrt(r) with rsLoRA.
    max_examples : int
        The largest example count a reply may report.
    top_ranks : dict[str, int]
        The run's top rank per module (empty until the initial adapter is read: ranks are then
        only checked to be positive).
    server_dtype : torch.dtype
        The dtype the server's state is in; accepted tensors are cast to it.
    """

    rule: AggregationRule
    lora_alpha: float
    rslora: bool
    max_examples: int
    top_ranks: dict[str, int] = field(default_factory=dict)
    server_dtype: torch.dtype = torch.float32
    partitions: dict[int, int] = field(default_factory=dict)
    """Node id -> the partition id it is bound to."""

    # ---- what every reply restates ---------------------------------------------------------------

    def node_report(self, node_id: int, content: RecordDict, latest_version: int) -> NodeReport:
        """The node's restated partition id, ranks, server-side scales and base version."""
        config = record(content.config_records, CONFIG_RECORD)
        partition_id = integer(config, PARTITION_ID_KEY, low=0)
        self.check_identity(node_id, partition_id)
        version = integer(config, VERSION_KEY, low=0, high=latest_version)
        ranks = self._ranks(config)
        scales = self._scales(config, ranks) if self.rule.scaled else {}
        return NodeReport(partition_id=partition_id, ranks=ranks, scales=scales, version=version)

    def bind(self, node_id: int, partition_id: int) -> None:
        """Bind a node to the partition its first accepted reply named."""
        self.partitions.setdefault(node_id, partition_id)

    def check_identity(self, node_id: int, partition_id: int) -> None:
        """The node's partition is the one it is bound to; an unbound node's, nobody's yet."""
        bound = self.partitions.get(node_id)
        if bound is not None and bound != partition_id:
            raise RejectedReply(
                f"claims partition id {partition_id}, the node is partition {bound}"
            )
        if bound is None:
            owners = [other for other, p in self.partitions.items() if p == partition_id]
            if owners:
                raise RejectedReply(
                    f"claims partition id {partition_id}, which is node {owners[0]}'s"
                )

    def _ranks(self, config: Mapping) -> dict[str, int]:
        modules = rank_modules(config)
        adapted = sorted(self.top_ranks)
        if self.top_ranks and self.rule.allows_module_subsets:
            if not modules or not set(modules) <= set(adapted):
                raise RejectedReply(
                    f"ranks for modules {modules}, not a non-empty subset of the run's {adapted}"
                )
        elif self.top_ranks and modules != adapted:
            raise RejectedReply(f"ranks for modules {modules}, the run adapts {adapted}")
        ranks = {
            module: integer(config, rank_key(module), low=1, high=self.top_ranks.get(module))
            for module in modules
        }
        if self.top_ranks:
            reason = self.rule.rank_refusal(ranks, adapted, max(self.top_ranks.values()))
            if reason is not None:
                raise RejectedReply(f"ranks {ranks}: {reason}")
        return ranks

    def _scales(self, config: Mapping, ranks: Mapping[str, int]) -> dict[str, float]:
        scales = {}
        for module, rank in ranks.items():
            expected = lora_scale(self.lora_alpha, rank, self.rslora)
            restated = config.get(scale_key(module))
            if not is_number(restated) or not math.isclose(
                restated, expected, rel_tol=SCALE_TOLERANCE
            ):
                raise RejectedReply(
                    f"{scale_key(module)} = {restated!r}, the run's scale for rank {rank} "
                    f"is {expected}"
                )
            scales[module] = expected
        return scales

    # ---- train replies ---------------------------------------------------------------------------

    def update(
        self,
        content: RecordDict,
        node: NodeReport,
        sent: ClientSpec,
        state: GlobalState,
        client_id: str,
    ) -> ClientUpdate:
        """The reply's update, with the server's scales and its tensors in the server's dtype."""
        metrics = record(content.metric_records, METRICS_RECORD)
        num_examples = integer(metrics, NUM_EXAMPLES_KEY, low=1, high=self.max_examples)
        finite_metrics(metrics, TRAIN_METRICS)
        check_records(content, {ADAPTER_RECORD, HEAD_RECORD, PROBE_RECORD})
        config = record(content.config_records, CONFIG_RECORD)
        start_ranks = self._start_ranks(config, node, sent)
        head_shapes = {name: tuple(t.shape) for name, t in state.head.items()}
        adapter = self._tensors(content, ADAPTER_RECORD, self.rule.reply_shapes(state, node.ranks))
        head = self._tensors(content, HEAD_RECORD, head_shapes)
        self.probes(content, state)
        layout = {
            **{rank_key(module): rank for module, rank in node.ranks.items()},
            **{scale_key(module): scale for module, scale in node.scales.items()},
            **{start_rank_key(module): rank for module, rank in start_ranks.items()},
        }
        try:
            return update_from_tensors(
                adapter, head, layout, num_examples, self.rule.update_kind, client_id
            )
        except ValueError as error:  # the rule's own layout checks (InvalidUpdateError, ...)
            raise RejectedReply(str(error)) from None

    @staticmethod
    def _start_ranks(config: Mapping, node: NodeReport, sent: ClientSpec) -> dict[str, int]:
        """The ranks the node says it started from: those it was sent; its ranks at most those."""
        start_ranks = {}
        if set(node.ranks) != set(sent.ranks):
            raise RejectedReply(
                f"ranks for modules {sorted(node.ranks)}, the node was sent {sorted(sent.ranks)}"
            )
        for module, rank in node.ranks.items():
            received = sent.ranks[module]
            key = start_rank_key(module)
            if key in config:
                start_ranks[module] = received
                if not is_number(config[key]) or config[key] != received:
                    raise RejectedReply(
                        f"{key} = {config[key]!r}, the node was sent rank {received}"
                    )
            if rank > received or (rank < received and key not in config):
                raise RejectedReply(
                    f"{rank_key(module)} = {rank}, the node was sent rank {received}"
                )
        return start_ranks

    def _tensors(
        self,
        content: RecordDict,
        name: str,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: tuple[str, ...] = WIRE_DTYPES,
        finite: bool = True,
    ) -> dict[str, Tensor]:
        """A tensor record with exactly these keys and shapes, its dtype and size checked on the
        serialized arrays before they are read; cast to the server's dtype."""
        if not shapes:
            if name in content.array_records:
                raise RejectedReply(f"unexpected record {name!r}")
            return {}
        if name not in content.array_records:
            raise RejectedReply(f"record {name!r} is missing")
        arrays = content.array_records[name]
        if set(arrays) != set(shapes):
            missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
            raise RejectedReply(f"record {name!r}: missing keys {missing}, unexpected keys {extra}")
        allowed = {*dtypes, str(self.server_dtype).removeprefix("torch.")}
        for key, array in arrays.items():
            where = f"{name}/{key}"
            if array.dtype not in allowed:
                raise RejectedReply(f"{where}: dtype {array.dtype}, accepted {sorted(allowed)}")
            if tuple(array.shape) != tuple(shapes[key]):
                raise RejectedReply(
                    f"{where}: shape {tuple(array.shape)}, expected {tuple(shapes[key])}"
                )
            limit = math.prod(shapes[key]) * np.dtype(array.dtype).itemsize + NPY_HEADER_BYTES
            if len(array.data) > limit:
                raise RejectedReply(f"{where}: {len(array.data)} bytes, at most {limit} expected")
        try:
            tensors = record_tensors(arrays)
        except Exception as error:  # noqa: BLE001 - any unreadable array is the reply's fault
            raise RejectedReply(f"record {name!r} cannot be read: {error}") from None
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(shapes[key]) or not tensor.is_floating_point():
                raise RejectedReply(f"{name}/{key}: its data is not what its metadata says")
        if finite:
            flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
            if not bool(flags.all()):
                bad = sorted(k for k, t in tensors.items() if not torch.isfinite(t).all())
                raise RejectedReply(f"record {name!r}: non-finite values in {bad}")
        return {key: tensor.to(self.server_dtype) for key, tensor in tensors.items()}

    # ---- Fed-SB's initialisation -----------------------------------------------------------------

    def estimate(
        self, content: RecordDict, name: str, shapes: Mapping[str, tuple[int, ...]]
    ) -> tuple[int, dict[str, Tensor]]:
        """A gradient estimate's example count and its tensors (record ``name``, these shapes)."""
        metrics = record(content.metric_records, METRICS_RECORD)
        num_examples = integer(metrics, NUM_EXAMPLES_KEY, low=1, high=self.max_examples)
        check_records(content, {name})
        return num_examples, self._tensors(content, name, shapes)

    # ---- evaluate replies and probes -------------------------------------------------------------

    def evaluation(self, content: RecordDict, state: GlobalState) -> None:
        """An evaluate reply's example count, loss and accuracy, a generation score (optional,
        in [0, 1]), and its probe responses."""
        metrics = record(content.metric_records, METRICS_RECORD)
        integer(metrics, NUM_EXAMPLES_KEY, low=0, high=self.max_examples)
        finite_metrics(metrics, EVALUATE_METRICS)
        if GENERATION_KEY in metrics and not 0 <= metrics[GENERATION_KEY] <= 1:
            raise RejectedReply(
                f"metric {GENERATION_KEY!r} = {metrics[GENERATION_KEY]} not in [0, 1]"
            )
        check_records(content, {PROBE_RECORD})
        self.probes(content, state)

    def probes(self, content: RecordDict, state: GlobalState) -> None:
        """Probe responses, when sent: one (d_out x PROBE_COUNT) array per module (NaN allowed:
        a measurement that shows a broken model)."""
        if PROBE_RECORD not in content.array_records:
            return
        shapes = {module: (d_out, PROBE_COUNT) for module, (d_out, _) in state.shapes.items()}
        if self.rule.allows_module_subsets:  # a node measures the modules it adapts
            sent = set(content.array_records[PROBE_RECORD])
            shapes = {module: shape for module, shape in shapes.items() if module in sent} or shapes
        self._tensors(content, PROBE_RECORD, shapes, PROBE_DTYPES, finite=False)


# ---- typed fields ---------------------------------------------------------------------------------


def record(records: Mapping, name: str) -> Mapping:
    if name not in records:
        raise RejectedReply(f"record {name!r} is missing")
    return records[name]


def check_records(content: RecordDict, allowed_arrays: set[str]) -> None:
    """No tensor record other than those the reply may carry."""
    unexpected = sorted(set(content.array_records) - allowed_arrays)
    if unexpected:
        raise RejectedReply(f"unexpected records {unexpected}")


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(values: Mapping, key: str, low: int, high: int | None = None) -> int:
    """An integer field (not a float, not a bool) in [low, high]."""
    if key not in values:
        raise RejectedReply(f"{key} is missing")
    value = values[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise RejectedReply(f"{key} = {value!r} is not an integer")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise RejectedReply(f"{key} = {value} outside {bound}")
    return value


def finite_metrics(metrics: Mapping, required: tuple[str, ...]) -> None:
    """The required metrics present, and every one read (required or optional) a finite number."""
    for key in required:
        if key not in metrics:
            raise RejectedReply(f"metric {key!r} is missing")
    for key in (*required, *OPTIONAL_METRICS):
        if key in metrics and not (is_number(metrics[key]) and math.isfinite(metrics[key])):
            raise RejectedReply(f"metric {key!r} = {metrics[key]!r} is not a finite number")
