"""A Flower strategy around one `fedlora` aggregation rule: per-node payloads, rank discovery,
versioned base, byte accounting and the end-to-end exactness probes.

Versioned base (FedEx-LoRA, FLoRA). With ``base_store`` (a directory every client can read: the
run directory in simulation, a shared file system on a cluster) the server writes each round's
change of the global weights there as factors (``round-{t}.safetensors``) and the payloads carry
none; a client's worker keeps one drifted base per process and catches it up from the files, since
the server cannot know which worker will run a node's message. Without a store (deployment), each
payload carries the changes since the version the node restated in its last reply, and the node
keeps its base in its own state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import ClassVar

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from torch import Tensor

from fedlora.config import RunConfig
from fedlora.lora.adapter import lora_scale
from fedlora.lora.lowrank import stack
from fedlora.lora.measurement import worst
from fedlora.lora.probes import PROBE_SEED_KEY, probe_responses, relative_deviation
from fedlora.method_config import robustness_of, server_optimizer_of
from fedlora.privacy.client_level import CLIP_KEY, check_client_dp_rule
from fedlora.privacy.sample_level import BUDGET_SPENT_KEY, EPSILON_KEY, SPENT_BEFORE_KEY
from fedlora.rules import AggregationRule, ClientSpec, GlobalState, RoundResult, rule_class
from fedlora.wire.base_store import write_round_change
from fedlora.wire.messages import (
    A_SUFFIX,
    ACCURACY_KEY,
    B_SUFFIX,
    BASE_STORE_KEY,
    CONFIG_RECORD,
    GENERATION_KEY,
    HANDLER_SECONDS_KEY,
    HELD_ROUND_KEY,
    LOSS_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SECONDS_KEY,
    TRAIN_STARTED_KEY,
    adapter_from_tensors,
    change_to_tensors,
    rank_key,
    scale_key,
)
from strategies.client_dp import ClientLevelDP
from strategies.initial_arrays import lora_initial_arrays
from strategies.records import (
    NodeReport,
    array_record,
    payload_record,
    record_tensors,
    serialized_bytes,
)
from strategies.records import probe_responses as reply_probes
from strategies.reply_checks import RejectedReply, ReplyChecks
from strategies.round_metrics import EvaluateMetrics, SampleDP, TrainMetrics, covered_seconds

BINDINGS: dict[type[AggregationRule], type[LoRAStrategy]] = {}
"""Each rule's strategy, filled in as the bindings are defined."""


def strategy_class(name: str) -> type[LoRAStrategy]:
    """The strategy of the method registered as ``name`` in `fedlora.rules.RULES`."""
    rule = rule_class(name)
    if rule not in BINDINGS:
        raise TypeError(
            f"strategy {name!r} has no binding: subclass LoRAStrategy with rule_class = "
            f"{rule.__name__}"
        )
    return BINDINGS[rule]


class LoRAStrategy(Strategy):
    """Federated LoRA with one aggregation rule, a payload shaped for each node's ranks.

    Before a node's first message the strategy asks it (a QUERY message) for its partition id,
    ranks and scales; every reply restates them (HetLoRA clients prune their ranks). Every reply
    is checked on its own before it can change the state (`strategies.reply_checks`): one
    carrying an error or failing a check is dropped, with a warning naming the node and the
    reason (kept in ``dropped``), and the round goes on with the others, ordered by partition id.
    With fewer than ``min_train_nodes`` valid updates the round makes no update.

    Parameters
    ----------
    rule : AggregationRule, optional
        The method. Subclasses bind theirs (``rule_class``) and pass ``**rule_options`` to it.
    lora_alpha : float (default: 16.0)
        peft's ``lora_alpha``: the initial adapter's scale is alpha / r (alpha / sqrt(r) with
        ``rslora``).
    rslora : bool (default: False)
        Whether the initial adapter uses rsLoRA's scale.
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training (at least ``min_train_nodes``).
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes sampled for evaluation (at least ``min_evaluate_nodes``); 0 skips it.
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before sampling.
    probe_seed : int (default: 0)
        Seed of the probe vectors clients measure their weights with (the run seed).
    base_store : str or Path, optional
        Directory where each round's base change is written for the clients (see the module's
        docstring); None sends the changes in the messages.
    query_timeout : float (default: 600.0)
        Seconds to wait for the answers to rank queries.
    client_dp : ClientLevelDP, optional
        Client-level DP (FedAvg, FedSA-LoRA, Fed-SB only): clients clip their updates, the
        aggregate is the noised uniform mean of `strategies.client_dp`, no probes are asked for.
    max_examples_per_client : int (default: 10_000_000)
        The largest example count a reply may report (a reply above it is dropped): it bounds
        the weight one client can take.

    Attributes
    ----------
    state : GlobalState or None
        The rule's global state (None before the first round).
    nodes : dict[int, NodeReport]
        What each node restated last, by node id.
    train_metrics, evaluate_metrics : dict[int, TrainMetrics], dict[int, EvaluateMetrics]
        The aggregated metrics of each round.
    dropped : dict[int, dict[int, str]]
        Per round, the nodes whose replies (or rank answers) were dropped, with the reason.
    """

    rule_class: ClassVar[type[AggregationRule] | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        """A subclass that sets ``rule_class`` is that rule's binding (`strategy_class`)."""
        super().__init_subclass__(**kwargs)
        if "rule_class" in cls.__dict__:
            BINDINGS[cls.rule_class] = cls

    @classmethod
    def options_from(cls, config: RunConfig) -> dict:
        """The method's options read from the run config: its rule's, its robustness and, where
        the rule takes one, its server optimizer."""
        options = {**cls.rule_class.options_from(config), "robustness": robustness_of(config)}
        if cls.rule_class.takes_server_optimizer:
            options["server_optimizer"] = server_optimizer_of(config)
        return options

    @classmethod
    def initial_arrays(cls, config: RunConfig) -> ArrayRecord:
        """The global arrays the run starts from: peft's adapter at the top rank and the head."""
        return lora_initial_arrays(config)

    def __init__(
        self,
        rule: AggregationRule | None = None,
        *,
        lora_alpha: float = 16.0,
        rslora: bool = False,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        probe_seed: int = 0,
        base_store: str | Path | None = None,
        query_timeout: float = 600.0,
        client_dp: ClientLevelDP | None = None,
        max_examples_per_client: int = 10_000_000,
        **rule_options,
    ) -> None:
        if rule is None:
            if self.rule_class is None:
                raise TypeError("LoRAStrategy needs a rule")
            rule = self.rule_class(**rule_options)
        elif rule_options:
            raise TypeError(f"options {sorted(rule_options)} are for strategies that bind a rule")
        if client_dp is not None:
            check_client_dp_rule(rule.name)
        self.rule = rule
        self.client_dp = client_dp
        self.lora_alpha = lora_alpha
        self.rslora = rslora
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.probe_seed = probe_seed
        self.base_store = None if base_store is None else Path(base_store)
        self.query_timeout = query_timeout
        self.state: GlobalState | None = None
        self.nodes: dict[int, NodeReport] = {}
        self.setup_bytes_up = 0
        self.train_metrics: dict[int, TrainMetrics] = {}
        self.evaluate_metrics: dict[int, EvaluateMetrics] = {}
        self.checks = ReplyChecks(rule, lora_alpha, rslora, max_examples_per_client)
        self.dropped: dict[int, dict[int, str]] = {}
        self.private_partitions: set[int] = set()
        self._round = 0
        self._sent_specs: dict[str, dict[int, ClientSpec]] = {}
        self._expected_probes: dict[str, Tensor] | None = None
        self._bytes_down_by_partition: dict[str, dict[int, int]] = {}
        self._sent_at: dict[str, float] = {}
        self._sent: dict[str, list[Metadata]] = {}
        """Per kind of exchange, the metadata of the messages last sent (Flower's grid gives each
        its message id when it pushes it): an error reply names the message it answers."""

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> Rule: %s (exact: %s)", self.rule.name, self.rule.exact)
        log(
            INFO,
            "\t├──> Sampling: fraction train (%.2f) | evaluate (%.2f)",
            self.fraction_train,
            self.fraction_evaluate,
        )
        log(
            INFO,
            "\t│\t└──Minimum nodes: train (%d) | evaluate (%d) | available (%d)",
            self.min_train_nodes,
            self.min_evaluate_nodes,
            self.min_available_nodes,
        )
        if self.client_dp is not None:
            self.client_dp.summary()
        where = self.base_store if self.base_store else "in the messages"
        log(INFO, "\t└──> Base changes: %s", where)

    # ---- training --------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node, its payload shaped for the node's ranks.

        ``arrays`` is read once, in the first round: the initial adapter at the top rank (peft's
        ``{module}.lora_A.weight``/``lora_B.weight``) and the head (every other key). Later
        rounds use the strategy's own state.
        """
        self._round = server_round
        if self.state is None:
            self.state = self.initial_state(arrays, grid)
            self._expected_probes = self._probes_of_state(self.state)
        node_ids = self._sample(
            grid, self.fraction_train, self.min_train_nodes, "configure_train", server_round
        )
        messages = self._messages(node_ids, MessageType.TRAIN, server_round, config, grid)
        if self.client_dp is not None:
            num_nodes = len(list(grid.get_node_ids()))
            self.client_dp.sampled(server_round, len(messages), num_nodes)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the updates with the rule; return W_t - W_0 and the round's metrics.

        The returned ArrayRecord holds, per module, the global model's weight change as factors
        (``{module}.U``/``{module}.V``, or ``{module}.dense`` where smaller) and the head; None
        for personalized methods (FedSA-LoRA).
        """
        now, received_at = time.perf_counter(), time.time()
        self._round = server_round
        exchange_seconds = now - self._sent_at.get(MessageType.TRAIN, now)
        updates, parsed, stopped = [], [], []
        for message, report in self._valid_replies(replies, "aggregate_train"):
            node_id = message.metadata.src_node_id
            try:
                sent = self._sent_spec(node_id, MessageType.TRAIN)
                if content_metrics(message).get(BUDGET_SPENT_KEY):
                    log(
                        INFO,
                        "Partition %d stopped: its privacy budget is spent",
                        report.partition_id,
                    )
                    stopped.append(message)
                else:
                    update = self.checks.update(
                        message.content, report, sent, self.state, str(report.partition_id)
                    )
                    updates.append(update)
                    parsed.append(message)
            except RejectedReply as error:
                self._drop(node_id, str(error))
                continue
            self._accept(node_id, report)
        sample_dp = sample_dp_metrics(stopped + parsed, self.nodes)
        self.private_partitions.update(
            self.nodes[m.metadata.src_node_id].partition_id
            for m in stopped + parsed
            if EPSILON_KEY in content_metrics(m)
        )
        if len(updates) < self.min_train_nodes:
            log(
                WARNING,
                "Round %d: %d valid updates, fewer than min_train_nodes (%d): no update",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            self.train_metrics[server_round] = TrainMetrics(sample_dp=sample_dp)
            return None, self.train_metrics[server_round].to_record()
        deviation = self._probe_deviation(parsed)
        previous = self.state
        start = time.perf_counter()
        privacy = {}
        if self.client_dp is None:
            result = self.rule.aggregate(previous, updates)
        else:
            result, privacy = self.client_dp.aggregate(
                self.rule, previous, updates, parsed, server_round
            )
        aggregate_seconds = time.perf_counter() - start
        self.state = result.state
        self._expected_probes = self._ideal_probes(previous, result)
        metrics = TrainMetrics(
            clients=len(updates),
            loss=weighted_mean(parsed, LOSS_KEY),
            num_examples=sum(update.num_examples for update in updates),
            aggregate_seconds=aggregate_seconds,
            bytes_up_by_client=self._bytes_up_by_partition(parsed),
            bytes_down_by_client={
                str(pid): size
                for pid, size in self._bytes_down_by_partition.get(MessageType.TRAIN, {}).items()
            },
            bytes_down=self._bytes_down(MessageType.TRAIN),
            base_store_bytes=self._store_round_change(),
            setup_bytes_up=self._take_setup_bytes(),
            client_dp=privacy,
            sample_dp=sample_dp,
            relative_deviation=deviation,
        )
        self._time(metrics, parsed, (received_at - exchange_seconds, received_at))
        self.train_metrics[server_round] = metrics
        return self._global_arrays(), metrics.to_record()

    # ---- evaluation ------------------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node; the client applies its step, then evaluates."""
        self._round = server_round
        if self.fraction_evaluate == 0.0 or self.state is None:
            return []
        node_ids = self._sample(
            grid,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
            "configure_evaluate",
            server_round,
        )
        return self._messages(node_ids, MessageType.EVALUATE, server_round, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted loss and accuracy of the clients, and the measured deviation."""
        self._round = server_round
        valid = []
        for message, report in self._valid_replies(replies, "aggregate_evaluate"):
            node_id = message.metadata.src_node_id
            try:
                self._sent_spec(node_id, MessageType.EVALUATE)
                self.checks.evaluation(message.content, self.state)
            except RejectedReply as error:
                self._drop(node_id, str(error))
                continue
            self._accept(node_id, report)
            valid.append(message)
        if not valid:
            return None
        generation = None
        if all(GENERATION_KEY in m.content[METRICS_RECORD] for m in valid):
            generation = weighted_mean(valid, GENERATION_KEY)
        self.evaluate_metrics[server_round] = EvaluateMetrics(
            loss=weighted_mean(valid, LOSS_KEY),
            accuracy=weighted_mean(valid, ACCURACY_KEY),
            num_examples=sum(int(m.content[METRICS_RECORD][NUM_EXAMPLES_KEY]) for m in valid),
            bytes_down=self._bytes_down(MessageType.EVALUATE),
            relative_deviation=self._probe_deviation(valid),
            generation=generation,
        )
        return self.evaluate_metrics[server_round].to_record()

    # ---- state -----------------------------------------------------------------------------------

    def initial_state(self, arrays: ArrayRecord, grid: Grid) -> GlobalState:
        """The rule's round-0 state from the initial adapter and head in ``arrays``."""
        named = record_tensors(arrays)
        factors = {k: t for k, t in named.items() if k.endswith((A_SUFFIX, B_SUFFIX))}
        head = {k: t for k, t in named.items() if k not in factors}
        config = {}
        for key, A in factors.items():
            if key.endswith(A_SUFFIX):
                module, rank = key.removesuffix(A_SUFFIX), A.shape[0]
                config[rank_key(module)] = rank
                config[scale_key(module)] = lora_scale(self.lora_alpha, rank, self.rslora)
        adapter = adapter_from_tensors(factors, config)
        self.expect_replies({m: f.rank for m, f in adapter.items()}, next(iter(factors.values())))
        return self.rule.init_state(adapter, head)

    def expect_replies(self, top_ranks: dict[str, int], example: Tensor) -> None:
        """Set the run's top rank per module and the server's dtype (that of ``example``) for
        the checks of the replies."""
        self.checks.top_ranks = dict(top_ranks)
        self.checks.server_dtype = example.dtype

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """What the strategy needs to go on after its last round, as named tensors and a JSON-able
        part: the rule's global state, the probe responses the next round is measured against,
        the checks' top ranks and dtype, the nodes' last restated ranks, scales and versions (by partition id: node
        ids change with a new Flower run), the partitions seen spending sample-level DP budget
        and client-level DP's accountant."""
        state_tensors, state_json = self.state.state_dict()
        tensors = {f"state/{key}": t for key, t in state_tensors.items()}
        probes = self._expected_probes
        if probes is not None:
            tensors.update({f"probes/{module}": t for module, t in probes.items()})
        json_state = {
            "round": self._round,
            "state": state_json,
            "probes": probes is not None,
            "top_ranks": dict(self.checks.top_ranks),
            "server_dtype": str(self.checks.server_dtype).removeprefix("torch."),
            "setup_bytes_up": self.setup_bytes_up,
            "private_partitions": sorted(self.private_partitions),
            "nodes": {
                str(node.partition_id): {
                    "ranks": node.ranks,
                    "scales": node.scales,
                    "version": node.version,
                }
                for node in self.nodes.values()
            },
            "client_dp": None if self.client_dp is None else self.client_dp.state_dict(),
        }
        return tensors, json_state

    def load_state_dict(self, tensors: dict[str, Tensor], json_state: dict) -> None:
        """Go on from what `state_dict` returned; the nodes are asked for their ranks again."""
        groups: dict[str, dict[str, Tensor]] = {"state": {}, "probes": {}}
        for key, tensor in tensors.items():
            group, name = key.split("/", 1)
            groups[group][name] = tensor
        self._round = int(json_state["round"])
        self.state = GlobalState.from_state_dict(groups["state"], json_state["state"])
        self._expected_probes = groups["probes"] if json_state["probes"] else None
        self.expect_replies(json_state["top_ranks"], torch.empty(0, dtype=dtype_named(json_state)))
        self.setup_bytes_up = int(json_state["setup_bytes_up"])
        self.private_partitions = set(json_state["private_partitions"])
        if (json_state["client_dp"] is None) != (self.client_dp is None):
            raise ValueError("client-level DP must be on in both the checkpoint and the run")
        if self.client_dp is not None:
            self.client_dp.load_state_dict(json_state["client_dp"])

    def _global_arrays(self) -> ArrayRecord | None:
        if self.rule.personalized:
            return None
        delta = {
            module: self.rule.global_delta(self.state, module) for module in self.state.modules
        }
        return array_record({**change_to_tensors(delta), **self.state.head})

    def _store_round_change(self) -> int | None:
        """Write the round's base change to the store (drifting-base rules); its size in bytes."""
        if self.base_store is None or self.state.changes is None:
            return None
        change = self.state.changes.latest
        return write_round_change(self.base_store, self.state.version, change)

    def _take_setup_bytes(self) -> int | None:
        """Bytes uploaded before the first round (Fed-SB's initialisation), reported once."""
        if not self.setup_bytes_up:
            return None
        taken, self.setup_bytes_up = self.setup_bytes_up, 0
        return taken

    # ---- nodes and messages ----------------------------------------------------------------------

    def _sample(
        self, grid: Grid, fraction: float, minimum: int, caller: str, server_round: int
    ) -> list[int]:
        """Flower's sampling rule (wait for the minimum, then a fraction), seeded by the run seed
        and the round over the nodes in partition order, so that simulation and deployment (whose
        node ids differ) sample the same partitions. A node that never answered its rank query
        (e.g. it died) is left out."""
        sample_size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        held_round = server_round - 1 if caller == "configure_train" else server_round
        self._learn_nodes(all_nodes, grid, held_round)
        known = [node_id for node_id in all_nodes if node_id in self.nodes]
        ordered = sorted(known, key=lambda node_id: self.nodes[node_id].partition_id)
        node_ids = random.Random(self.probe_seed * 1_000_003 + server_round).sample(
            ordered, min(sample_size, len(ordered))
        )
        log(INFO, "%s: Sampled %s nodes (out of %s)", caller, len(node_ids), len(all_nodes))
        return node_ids

    def _messages(
        self, node_ids: list[int], kind: str, server_round: int, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self._learn_nodes(
            node_ids, grid, server_round - 1 if kind == MessageType.TRAIN else server_round
        )
        common = {**config, ROUND_KEY: server_round}
        if self.client_dp is None:
            common[PROBE_SEED_KEY] = self.probe_seed
        elif kind == MessageType.TRAIN:
            common[CLIP_KEY] = self.client_dp.clip
        if self.base_store is not None:
            common[BASE_STORE_KEY] = str(self.base_store)
        messages, specs = [], {}
        for node_id in node_ids:
            if node_id not in self.nodes:
                continue
            specs[node_id] = self._spec(self.nodes[node_id])
            payload = self.rule.client_payload(self.state, specs[node_id])
            payload.config = {**common, **payload.config}
            if (
                kind == MessageType.TRAIN
                and self.nodes[node_id].partition_id in self.private_partitions
            ):
                payload.config[SPENT_BEFORE_KEY] = 1
            messages.append(
                Message(payload_record(payload), dst_node_id=node_id, message_type=kind)
            )
        self._bytes_down_by_partition[kind] = dict(
            sorted(
                (self.nodes[m.metadata.dst_node_id].partition_id, serialized_bytes(m.content))
                for m in messages
            )
        )
        self._sent_specs[kind] = specs
        self._sent_at[kind] = time.perf_counter()
        return self._sending(kind, messages)

    def _sent_spec(self, node_id: int, kind: str) -> ClientSpec:
        """What the node was sent in this exchange (taken once: a second reply is refused)."""
        spec = self._sent_specs.get(kind, {}).pop(node_id, None)
        if spec is None:
            raise RejectedReply(f"no {kind} message awaits its reply (not sent, or answered)")
        return spec

    def _bytes_down(self, kind: str) -> int:
        """Serialized bytes of the last payloads of this kind, all nodes together."""
        return sum(self._bytes_down_by_partition.get(kind, {}).values())

    def _bytes_up_by_partition(self, replies: list[Message]) -> dict[str, int]:
        """The train replies' serialized bytes, by partition id."""
        return {
            str(self.nodes[m.metadata.src_node_id].partition_id): serialized_bytes(m.content)
            for m in replies
        }

    @staticmethod
    def _time(metrics: TrainMetrics, replies: list[Message], exchange: tuple[float, float]) -> None:
        """Seconds of the train exchange: the slowest client's local training
        (``train_seconds``) and whole handling of its message (``client_seconds``), what the
        exchange took beyond that handling (``communication_seconds``: transport, serialization,
        the start of the client's process or the wait for a free simulation worker), and the
        seconds in which some client was training (``train_busy_seconds``: the union of the
        reported training intervals, each clipped to the exchange: its start and end on the
        server's wall clock)."""
        reported = [m.content[METRICS_RECORD] for m in replies]
        handling = max(float(m.get(HANDLER_SECONDS_KEY, m[SECONDS_KEY])) for m in reported)
        metrics.train_seconds = max(float(m[SECONDS_KEY]) for m in reported)
        metrics.client_seconds = handling
        metrics.communication_seconds = max(exchange[1] - exchange[0] - handling, 0.0)
        intervals = [
            (float(m[TRAIN_STARTED_KEY]), float(m[TRAIN_STARTED_KEY]) + float(m[SECONDS_KEY]))
            for m in reported
            if TRAIN_STARTED_KEY in m
        ]
        if intervals:
            metrics.train_busy_seconds = covered_seconds(intervals, exchange)

    def _spec(self, node: NodeReport) -> ClientSpec:
        """The node's ranks and scales, and the base version its payload starts from: the
        current one when clients catch up from the store, else the one the node holds."""
        store_serves_base = self.base_store is not None and self.state.changes is not None
        version = self.state.version if store_serves_base else node.version
        return ClientSpec(
            ranks=node.ranks, scales=node.scales, version=version, client=str(node.partition_id)
        )

    def _learn_nodes(self, node_ids: list[int], grid: Grid, held_round: int) -> None:
        """Ask the nodes not seen yet for their partition id, ranks and scales, as of
        ``held_round`` (a node resuming from its store loads that round's state)."""
        unseen = [node_id for node_id in node_ids if node_id not in self.nodes]
        if not unseen:
            return
        queries = [
            Message(
                RecordDict({CONFIG_RECORD: ConfigRecord({HELD_ROUND_KEY: held_round})}),
                dst_node_id=node_id,
                message_type=MessageType.QUERY,
            )
            for node_id in unseen
        ]
        answers = grid.send_and_receive(self._sending("query", queries), timeout=self.query_timeout)
        self._accept_answers(answers, "query")

    def _accept_answers(self, answers: Iterable[Message], caller: str) -> list[Message]:
        """The valid answers to a query, their nodes recorded; of two new nodes that claim one
        partition, the first (by node id) keeps it."""
        accepted = []
        for message, report in self._valid_replies(answers, caller):
            node_id = message.metadata.src_node_id
            try:
                self.checks.check_identity(node_id, report.partition_id)
            except RejectedReply as error:
                self._drop(node_id, str(error))
                continue
            self._accept(node_id, report)
            accepted.append(message)
        return accepted

    def _valid_replies(
        self, replies: Iterable[Message], caller: str
    ) -> list[tuple[Message, NodeReport]]:
        """Replies without errors whose node restated a valid report, with that report, by
        partition id; the others are dropped. Nothing is recorded yet (`_accept`). A node whose
        message failed is asked for its ranks again before its next message: it may have
        restarted, with its store's state or none (a base version the server did not expect)."""
        valid, failures = [], 0
        latest_version = 0 if self.state is None else self.state.version
        for message in replies:
            node_id = message.metadata.src_node_id
            if message.has_error():
                failures += 1
                node_id = self._addressee(message)
                partition_id = self.checks.partitions.get(node_id)
                node = "" if partition_id is None else f" of partition {partition_id}"
                self._drop(node_id, f"error reply{node}: {message.error.reason}")
                self.nodes.pop(node_id, None)
                continue
            try:
                report = self.checks.node_report(node_id, message.content, latest_version)
            except RejectedReply as error:
                failures += 1
                self._drop(node_id, str(error))
                continue
            valid.append((message, report))
        log(INFO, "%s: Received %s results and %s failures", caller, len(valid), failures)
        return sorted(valid, key=lambda pair: (pair[1].partition_id, pair[0].metadata.src_node_id))

    def _sending(self, kind: str, messages: list[Message]) -> list[Message]:
        """Keep the metadata of the messages of this exchange (see `_addressee`)."""
        self._sent[kind] = [message.metadata for message in messages]
        return messages

    def _addressee(self, reply: Message) -> int:
        """The node an error reply stands for: the one the message it answers was sent to.

        Flower's SuperLink answers for a node that stopped sending heartbeats itself ("Node
        Unavailable"), with the SuperLink's own node id as the source; the message id it replies
        to names the node. A reply to no message sent here keeps its source."""
        answered = reply.metadata.reply_to_message_id
        if answered:
            for sent in self._sent.values():
                for metadata in sent:
                    if metadata.message_id == answered:
                        return metadata.dst_node_id
        return reply.metadata.src_node_id

    def _accept(self, node_id: int, report: NodeReport) -> None:
        """Record what an accepted reply restated; its first binds the node to its partition."""
        self.nodes[node_id] = report
        self.checks.bind(node_id, report.partition_id)

    def _drop(self, node_id: int, reason: str) -> None:
        """Log a dropped reply, naming the node and the reason, and keep it for the round."""
        log(WARNING, "\t> Dropping the reply of node %d: %s", node_id, reason)
        dropped = self.dropped.setdefault(self._round, {})
        dropped[node_id] = f"{dropped[node_id]}; {reason}" if node_id in dropped else reason

    # ---- exactness probes ------------------------------------------------------------------------

    def _probes_of_state(self, state: GlobalState) -> dict[str, Tensor] | None:
        """The probe responses of the global model W - W_0 (None for personalized rules)."""
        if self.rule.personalized:
            return None
        deltas = {module: self.rule.global_delta(state, module) for module in state.modules}
        return probe_responses(deltas, self.probe_seed)

    def _ideal_probes(self, previous: GlobalState, result: RoundResult) -> dict[str, Tensor] | None:
        """Probe responses of the ideal model: the previous global model plus dW*."""
        if result.ideal_update is None:
            return None
        deltas = {
            module: stack([self.rule.global_delta(previous, module), result.ideal_update[module]])
            for module in previous.modules
        }
        return probe_responses(deltas, self.probe_seed)

    def _probe_deviation(self, replies: list[Message]) -> float | None:
        """The worst relative difference between a client's measured probe responses and the
        server's ideal ones; None when nothing was measured or there is no ideal."""
        if self._expected_probes is None:
            return None
        measured = [reply_probes(m.content) for m in replies]
        measured = [responses for responses in measured if responses]
        if not measured:
            return None
        expected = self._expected_probes
        return worst(
            relative_deviation(responses, {m: expected[m] for m in responses if m in expected})
            if self.rule.allows_module_subsets
            else relative_deviation(responses, expected)
            for responses in measured
        )


def sample_dp_metrics(replies: list[Message], nodes: dict[int, NodeReport]) -> SampleDP | None:
    """Sample-level DP: each replying client's epsilon and how many clients stopped with their
    budget spent; None when no reply reports an epsilon."""
    epsilons, stopped = {}, 0
    for message in replies:
        metrics = message.content[METRICS_RECORD]
        if EPSILON_KEY in metrics:
            partition_id = nodes[message.metadata.src_node_id].partition_id
            epsilons[str(partition_id)] = float(metrics[EPSILON_KEY])
            stopped += int(metrics.get(BUDGET_SPENT_KEY, 0))
    return SampleDP(epsilons, stopped) if epsilons else None


def dtype_named(json_state: dict) -> torch.dtype:
    """The server's dtype a checkpoint names (``float32``, ``float64``)."""
    dtype = getattr(torch, json_state["server_dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"checkpoint: {json_state['server_dtype']!r} is not a torch dtype")
    return dtype


def content_metrics(message: Message) -> MetricRecord:
    """The reply's metrics record (empty when it has none)."""
    return message.content.metric_records.get(METRICS_RECORD, MetricRecord())


def weighted_mean(replies: list[Message], key: str) -> float:
    """The example-weighted mean of a reply metric."""
    metrics = [m.content[METRICS_RECORD] for m in replies]
    total = sum(int(m[NUM_EXAMPLES_KEY]) for m in metrics)
    if total == 0:
        return 0.0
    return sum(float(m[key]) * int(m[NUM_EXAMPLES_KEY]) for m in metrics) / total
