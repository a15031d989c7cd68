"""The Flower ClientApp: rank queries, Fed-SB's initialisation query, training and evaluation.

Every message runs in a worker process that keeps the base model per run configuration
(`clients.worker`), so the model is built once per process, not per message; what a node must
remember between rounds lives in its ``context.state`` (`clients.node`). On a train or evaluate
message the client applies its method's client step to what it received, measures its effective
weights on the probe vectors, then trains (on CUDA when present) or evaluates. Every reply
restates the node's partition id, ranks, scales and the global version it holds. Random choices
are seeded by (run seed, partition id, round).

A node's config names it (``partition-id``, ``num-partitions``) and states its capacity, which
overrides the run config's for this node: ``lora-rank``, ``batch-size``, ``device``, and
``data-path``, its own data instead of its partition of the run's dataset.

``app`` reads the run configuration from the context (``flwr run``); `client_app` binds one
instead (``flwr.simulation.run_simulation`` passes an empty run_config).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Context, Message, MessageType, UserConfigValue
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from clients.node import (
    own_base,
    save_own_base,
    save_privacy_history,
    save_ranks_and_version,
    saved_privacy_history,
    saved_ranks,
    saved_version,
)
from clients.node_store import NodeStore
from clients.records import message_config, payload_from_record, reply_record
from clients.steps import LoRAModelStep, SBModelStep, clip_for_client_dp, model_step_for
from clients.worker import Worker, worker_for
from fedlora.base_store import catch_up_from_store
from fedlora.config import RunConfig, without_server_app_keys
from fedlora.data import ClientData, batches
from fedlora.errors import ConfigError
from fedlora.fedsb_init import estimate_gradient, estimate_private_gradient, sketch_gradients
from fedlora.generation_eval import GenerationEvaluation, generation_due
from fedlora.messages import (
    ACCURACY_KEY,
    BASE_STORE_KEY,
    FROM_VERSION_KEY,
    GENERATION_KEY,
    GRADIENT_SUFFIX,
    HANDLER_SECONDS_KEY,
    HELD_ROUND_KEY,
    LOSS_KEY,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    ROUND_KEY,
    SB_INIT_ACTION,
    SB_INIT_MODE_KEY,
    SB_INIT_RANK_KEY,
    SB_INIT_SEED_KEY,
    SECONDS_KEY,
    SKETCH_Y_SUFFIX,
    SKETCH_Z_SUFFIX,
    VERSION_KEY,
    Payload,
    ranks_in,
)
from fedlora.method_config import parse_run_config
from fedlora.privacy import (
    BUDGET_SPENT_KEY,
    DELTA_KEY,
    EPSILON_KEY,
    SPENT_BEFORE_KEY,
    client_plan,
    example_loader,
)
from fedlora.probes import PROBE_RECORD, PROBE_SEED_KEY, probe_responses
from fedlora.rules import make_rule
from fedlora.training import (
    TrainReport,
    client_seed,
    evaluate,
    seeded_rng,
    set_torch_threads,
    to_device,
    train_private,
    train_round,
)
from fedlora.versioning import BaseCache

NODE_RANK_KEY = "lora-rank"
"""Node-config key of a node's own LoRA rank (else the run's rank-profile decides)."""
NUM_PARTITIONS_KEY = "num-partitions"
NODE_RUN_KEYS = ("batch-size", "device")
"""Node-config keys a device sets for itself, over the run config's (its capacity)."""
DATA_PATH_KEY = "data-path"
"""Node-config key of a device's own data (any ``dataset`` spec: ``json:PATH``, a folder...), used
whole, no server share held out, instead of its partition of the run's dataset."""

BoundRunConfig = Mapping[str, UserConfigValue] | None
"""A run config bound to the app (Flower's kebab-case keys), or None to read the context's."""


@dataclass
class Client:
    """One message's view: the run config, the worker, the method and the node's identity."""

    config: RunConfig
    worker: Worker
    model_step: LoRAModelStep | SBModelStep
    partition_id: int
    num_partitions: int
    node_rank: int | None
    local_data: bool

    @classmethod
    def for_message(cls, context: Context, run_config: BoundRunConfig) -> Client:
        """The client a message runs as: the run config parsed (the ServerApp's own keys left
        out), torch's threads set, this process's worker for it."""
        values = dict(context.run_config if run_config is None else run_config)
        config = node_run_config(
            parse_run_config(without_server_app_keys(values)),
            context.node_config,
        )
        set_torch_threads(config)
        worker = worker_for(config)
        node_rank = context.node_config.get(NODE_RANK_KEY)
        return cls(
            config=config,
            worker=worker,
            model_step=model_step_for(worker, make_rule(config.strategy)),
            partition_id=int(context.node_config[PARTITION_ID_KEY]),
            num_partitions=int(context.node_config[NUM_PARTITIONS_KEY]),
            node_rank=None if node_rank is None else int(node_rank),
            local_data=DATA_PATH_KEY in context.node_config,
        )

    def initial_rank(self) -> int:
        return self.config.rank_for(self.partition_id, self.num_partitions, self.node_rank)

    def seed(self, server_round: int) -> int:
        return client_seed(self.config.seed, self.partition_id, server_round)

    def identity(self, context: Context) -> dict[str, int]:
        return {PARTITION_ID_KEY: self.partition_id, VERSION_KEY: saved_version(context)}

    def data(self) -> ClientData:
        """The node's train and test splits: its local data, else its partition."""
        if self.local_data:
            return self.worker.data(0, 1)
        return self.worker.data(self.partition_id, self.num_partitions)


def node_run_config(config: RunConfig, node_config: Mapping[str, UserConfigValue]) -> RunConfig:
    """The run config as this node runs it: its own ``batch-size`` and ``device`` (`NODE_RUN_KEYS`)
    and its ``data-path``, whose examples are all its own (one IID partition, no server share)."""
    values = {key: node_config[key] for key in NODE_RUN_KEYS if key in node_config}
    if DATA_PATH_KEY in node_config:
        values.update(
            {
                "dataset": node_config[DATA_PATH_KEY],
                "partitioner": "iid",
                "server-eval-fraction": 0.0,
            }
        )
    if not values:
        return config
    try:
        overrides = RunConfig.from_flower(values)
    except ConfigError as error:
        raise ConfigError(f"node config: {error}") from None
    names = [key.replace("-", "_") for key in values]
    return dataclasses.replace(config, **{name: getattr(overrides, name) for name in names})


def client_app(run_config: BoundRunConfig = None) -> ClientApp:
    """A ClientApp; ``run_config`` (Flower's kebab-case keys) replaces the context's when given."""
    app = ClientApp()

    @app.query()
    def on_query(message: Message, context: Context) -> Message:
        return with_node_store(answer_query, message, context, run_config)

    @app.query(SB_INIT_ACTION)
    def on_sb_init(message: Message, context: Context) -> Message:
        return with_node_store(answer_sb_init, message, context, run_config)

    @app.train()
    def on_train(message: Message, context: Context) -> Message:
        return with_node_store(answer_train, message, context, run_config)

    @app.evaluate()
    def on_evaluate(message: Message, context: Context) -> Message:
        return with_node_store(answer_evaluate, message, context, run_config)

    return app


def with_node_store(answer, message: Message, context: Context, run_config: BoundRunConfig):
    """``answer`` the message with the node's state brought from its store first (a fresh or
    stale state) and saved to it after (train and evaluate messages as of their round, Fed-SB's
    initialisation as of round 0); as is without a store (`clients.node_store`)."""
    values = context.run_config if run_config is None else run_config
    keep = int(values.get("checkpoint-every", 1)) + 2
    store = NodeStore.of(context, values, keep)
    if store is None:
        return answer(message, context, run_config)
    kind, config = message.metadata.message_type, message_config(message.content)
    server_round = config.get(ROUND_KEY)
    if kind == f"{MessageType.QUERY}.{SB_INIT_ACTION}":
        server_round = 0
    if kind in (MessageType.TRAIN, MessageType.EVALUATE):
        if server_round is None:  # not the server's message: no state of a round to keep
            return answer(message, context, run_config)
        newest = int(server_round) - (kind == MessageType.TRAIN)
    else:
        newest = config.get(HELD_ROUND_KEY)
    store.before(context, None if newest is None else int(newest))
    reply = answer(message, context, run_config)
    if server_round is not None:
        store.after(context, int(server_round))
    return reply


app = client_app()


def answer_query(message: Message, context: Context, run_config: BoundRunConfig) -> Message:
    """The node's partition id, ranks (and scales) and the version it holds."""
    client = Client.for_message(context, run_config)
    rank_config = client.model_step.rank_config(saved_ranks(context) or client.initial_rank())
    return Message(
        reply_record({}, {**rank_config, **client.identity(context)}, {}), reply_to=message
    )


def answer_train(message: Message, context: Context, run_config: BoundRunConfig) -> Message:
    """Apply the client step, probe, train locally, reply with the update."""
    received = time.perf_counter()
    client, payload, model, probes, data = apply_payload(message, context, run_config)
    config, worker = client.config, client.worker
    server_round = int(payload.config.get(ROUND_KEY, 0))
    seed = client.seed(server_round)
    if config.dp_sample:
        spent_before = bool(payload.config.get(SPENT_BEFORE_KEY))
        report, privacy = train_privately(
            client, model, data, seed, server_round, context, spent_before
        )
        if report is None:
            return budget_spent_reply(message, context, client, payload, privacy, len(data.train))
    else:
        report = train_round(
            model, data.train, worker.base.tokenizer, config, worker.device, seed, server_round
        )
        privacy = {}
    arrays, rank_config = client.model_step.reply(model, payload, context)
    arrays, clipping = clip_for_client_dp(
        arrays, payload, rank_config, client.model_step.rule.dp_scale_power
    )
    save_ranks_and_version(context, ranks_in(rank_config), saved_version(context))
    metrics = {
        NUM_EXAMPLES_KEY: len(data.train),
        LOSS_KEY: report.loss,
        SECONDS_KEY: report.seconds,
        HANDLER_SECONDS_KEY: time.perf_counter() - received,
        **clipping,
        **privacy,
    }
    content = reply_record(
        {**arrays, PROBE_RECORD: probes}, {**rank_config, **client.identity(context)}, metrics
    )
    return Message(content, reply_to=message)


def train_privately(
    client: Client,
    model: nn.Module,
    data,
    seed: int,
    server_round: int,
    context: Context,
    spent_before: bool,
) -> tuple[TrainReport | None, dict[str, float]]:
    """DP-SGD for the round, unless it would take the node past ``max-epsilon`` (then no
    report); and the privacy metrics: epsilon (after the round, or so far), delta, and whether
    the budget stopped the node. The node's accountant history grows by the round's steps. A
    node the server saw spend budget before (``spent_before``) whose history is missing (a lost
    node store) refuses to train rather than count its budget from 0 again."""
    config, worker = client.config, client.worker
    plan = client_plan(config, len(data.train))
    history = saved_privacy_history(context, config.dp_accountant)
    if spent_before and not history:
        raise ConfigError(
            f"partition {client.partition_id} spent privacy budget before, but its accountant "
            "history is missing (its node store is lost?): refusing to train from epsilon 0"
        )
    if not plan.allows(history, config.local_steps):
        spent = {EPSILON_KEY: plan.epsilon(history), DELTA_KEY: plan.delta, BUDGET_SPENT_KEY: 1}
        return None, spent
    report, history = train_private(
        model,
        data.train,
        worker.base.tokenizer,
        config,
        plan,
        history,
        worker.device,
        seed,
        server_round,
    )
    save_privacy_history(context, history, config.dp_accountant)
    return report, {EPSILON_KEY: plan.epsilon(history), DELTA_KEY: plan.delta, BUDGET_SPENT_KEY: 0}


def budget_spent_reply(
    message: Message,
    context: Context,
    client: Client,
    payload: Payload,
    privacy: dict[str, float],
    num_examples: int,
) -> Message:
    """A reply without an update: the node stopped training, its privacy budget spent."""
    rank_config = client.model_step.rank_config(ranks_in(payload.config))
    metrics = {NUM_EXAMPLES_KEY: num_examples, **privacy}
    content = reply_record({}, {**rank_config, **client.identity(context)}, metrics)
    return Message(content, reply_to=message)


def answer_evaluate(message: Message, context: Context, run_config: BoundRunConfig) -> Message:
    """Apply the client step, probe, evaluate on the node's held-out data (with
    ``client-generation``, by generation too in the rounds that ``generation-every`` names)."""
    client, payload, model, probes, data = apply_payload(message, context, run_config)
    config, worker = client.config, client.worker
    report = evaluate(model, data.test, worker.base.tokenizer, config, worker.device)
    metrics = {
        NUM_EXAMPLES_KEY: report.num_examples,
        LOSS_KEY: report.loss,
        ACCURACY_KEY: report.accuracy,
    }
    server_round = int(payload.config.get(ROUND_KEY, 0))
    if config.client_generation and generation_due(config, server_round) and len(data.test):
        generation = GenerationEvaluation(config, data.test, worker.base.tokenizer)
        metrics[GENERATION_KEY] = generation(model).value
    rank_config = client.model_step.rank_config(ranks_in(payload.config))
    content = reply_record(
        {PROBE_RECORD: probes}, {**rank_config, **client.identity(context)}, metrics
    )
    return Message(content, reply_to=message)


def apply_payload(message: Message, context: Context, run_config: BoundRunConfig):
    """The node's client, the payload, the model after the method's client step, the probe
    responses measured on it, and the node's data: what training and evaluation both start from."""
    client = Client.for_message(context, run_config)
    payload = payload_from_record(message.content)
    model = receive(client, payload, context)
    probes = measured_probes(client, model, payload)
    return (
        client,
        payload,
        model,
        probes,
        client.data(),
    )


def answer_sb_init(message: Message, context: Context, run_config: BoundRunConfig) -> Message:
    """The node's gradient estimate for Fed-SB's LoRA-SB start: sketches or the dense G."""
    client = Client.for_message(context, run_config)
    request = message_config(message.content)
    config, worker = client.config, client.worker
    data = client.data()
    estimates = batches(
        data.train,
        worker.base.tokenizer,
        config.max_length,
        config.batch_size,
        client.seed(0),
        config.local_steps,
        config.task,
    )
    model = worker.base.model
    if worker.device.type != "cpu":
        model = copy.deepcopy(model).to(worker.device)

    def loss(model: nn.Module, batch) -> Tensor:
        return model(**to_device(batch, worker.device)).loss

    if config.dp_sample:
        gradients = private_sb_estimate(client, model, data, context)
    else:
        gradients = estimate_gradient(model, loss, estimates, config.target_module_names)
    if request[SB_INIT_MODE_KEY] == "sign":
        tensors = {module + GRADIENT_SUFFIX: g for module, g in gradients.items()}
    else:
        sketches = sketch_gradients(
            gradients, int(request[SB_INIT_RANK_KEY]), seed=int(request[SB_INIT_SEED_KEY])
        )
        tensors = {}
        for module, sketch in sketches.items():
            tensors[module + SKETCH_Y_SUFFIX] = sketch.Y
            tensors[module + SKETCH_Z_SUFFIX] = sketch.Z
    rank_config = client.model_step.rank_config(client.initial_rank())
    content = reply_record(
        {SB_INIT_ACTION: tensors},
        {**rank_config, **client.identity(context)},
        {NUM_EXAMPLES_KEY: len(data.train)},
    )
    return Message(content, reply_to=message)


def private_sb_estimate(client: Client, model: nn.Module, data, context: Context) -> dict:
    """Fed-SB's gradient estimate by DP-SGD (``local-steps`` batches), counted in the node's
    budget; refused when it alone would pass ``max-epsilon``."""
    config, worker = client.config, client.worker
    plan = client_plan(config, len(data.train))
    history = saved_privacy_history(context, config.dp_accountant)
    if not plan.allows(history, config.local_steps):
        raise ConfigError(
            f"max-epsilon = {config.max_epsilon}: Fed-SB's initialisation alone takes partition "
            f"{client.partition_id} to epsilon {plan.epsilon_after(history, config.local_steps)}"
        )
    seed = client.seed(0)
    loader = example_loader(data.train, worker.base.tokenizer, config, seed)
    with seeded_rng(seed, worker.device):
        gradients, history = estimate_private_gradient(
            model,
            loader,
            config.target_module_names,
            config.local_steps,
            plan,
            history,
            config.task,
            worker.device,
        )
    save_privacy_history(context, history, config.dp_accountant)
    return gradients


def receive(client: Client, payload: Payload, context: Context) -> nn.Module:
    """The method's client step on the node's model; the node remembers its ranks and version."""
    cache = base_cache(client, payload, context)
    model = client.model_step.receive(payload, context, cache)
    if cache is not None and not payload.config.get(BASE_STORE_KEY):
        save_own_base(context, cache)
    save_ranks_and_version(context, ranks_in(payload.config), int(payload.config[VERSION_KEY]))
    return model


def base_cache(client: Client, payload: Payload, context: Context) -> BaseCache | None:
    """The drifted base the payload's changes start from (drifting-base methods only): the
    worker's, caught up from the store, or the node's own when changes travel in messages."""
    if FROM_VERSION_KEY not in payload.config:
        return None
    store = payload.config.get(BASE_STORE_KEY)
    if not store:
        return own_base(context)
    cache = client.worker.store_cache(str(store))
    catch_up_from_store(cache, str(store), int(payload.config[FROM_VERSION_KEY]))
    return cache


def measured_probes(client: Client, model: nn.Module, payload: Payload) -> dict:
    """(W_eff - W_0) X per module, when the server asks for probes."""
    if PROBE_SEED_KEY not in payload.config:
        return {}
    changes = client.model_step.weight_changes(model)
    return probe_responses(changes, int(payload.config[PROBE_SEED_KEY]))
