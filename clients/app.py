"""The Flower ClientApp: rank queries, a method's own queries (Fed-SB's start), training and
evaluation.

Every message runs in a worker process that keeps the base model per run configuration
(`clients.worker`), so the model is built once per process, not per message; what a node must
remember between rounds lives in its ``context.state`` (`clients.node`). On a train or evaluate
message the client applies its method's client step to what it received, measures its effective
weights on the probe vectors, then trains (on CUDA when present) or evaluates. Every reply
restates the node's partition id, ranks, scales and the global version it holds. Random choices
are seeded by (run seed, partition id, round).

The client a message runs as, with its node config, is `clients.client.Client`.

``app`` reads the run configuration from the context (``flwr run``); `client_app` binds one
instead (``flwr.simulation.run_simulation`` passes an empty run_config).
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from torch import nn

from clients.client import MODEL_STEPS, BoundRunConfig, Client
from clients.node import own_base, save_own_base, save_ranks_and_version, saved_ranks, saved_version
from clients.node_store import NodeStore
from clients.private_training import budget_spent_reply, train_privately
from clients.records import message_config, payload_from_record, reply_record
from clients.steps import QueryAnswer, clip_for_client_dp
from fedlora.lora.probes import PROBE_RECORD, PROBE_SEED_KEY
from fedlora.lora.versioning import BaseCache
from fedlora.privacy.sample_level import SPENT_BEFORE_KEY
from fedlora.process_exit import freeze_heap_at_exit
from fedlora.training.generation_eval import GenerationEvaluation, generation_due
from fedlora.training.local import evaluate, train_round
from fedlora.wire.base_store import catch_up_from_store
from fedlora.wire.messages import (
    ACCURACY_KEY,
    BASE_STORE_KEY,
    FROM_VERSION_KEY,
    GENERATION_KEY,
    HANDLER_SECONDS_KEY,
    HELD_ROUND_KEY,
    LOSS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SECONDS_KEY,
    TRAIN_STARTED_KEY,
    VERSION_KEY,
    Payload,
    ranks_in,
)


def client_app(run_config: BoundRunConfig = None) -> ClientApp:
    """A ClientApp; ``run_config`` (Flower's kebab-case keys) replaces the context's when given."""
    app = ClientApp()

    @app.query()
    def on_query(message: Message, context: Context) -> Message:
        return with_node_store(answer_query, message, context, run_config)

    @app.train()
    def on_train(message: Message, context: Context) -> Message:
        return with_node_store(answer_train, message, context, run_config)

    @app.evaluate()
    def on_evaluate(message: Message, context: Context) -> Message:
        return with_node_store(answer_evaluate, message, context, run_config)

    for step in MODEL_STEPS:
        for action, answer in step.queries.items():
            answer_queries(app, action, answer, run_config)
    return app


def answer_queries(
    app: ClientApp, action: str, answer: QueryAnswer, run_config: BoundRunConfig
) -> None:
    """Answer the ``query.{action}`` messages of a method's own (Fed-SB's start) with ``answer``,
    as the message's client."""

    def answer_as_client(message: Message, context: Context, run_config: BoundRunConfig):
        return answer(Client.for_message(context, run_config), message, context)

    @app.query(action)
    def on_query(message: Message, context: Context) -> Message:
        return with_node_store(answer_as_client, message, context, run_config)


def with_node_store(answer, message: Message, context: Context, run_config: BoundRunConfig):
    """``answer`` the message with the node's state brought from its store first (a fresh or
    stale state) and saved to it after (train and evaluate messages as of their round, a method's
    own query, as Fed-SB's initialisation, as of round 0); as is without a store
    (`clients.node_store`)."""
    values = context.run_config if run_config is None else run_config
    keep = int(values.get("checkpoint-every", 1)) + 2
    store = NodeStore.of(context, values, keep)
    if store is None:
        return answer(message, context, run_config)
    kind, config = message.metadata.message_type, message_config(message.content)
    server_round = config.get(ROUND_KEY)
    if kind.startswith(f"{MessageType.QUERY}."):
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


freeze_heap_at_exit()  # a deployed ClientApp's process ends after its one message
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
        TRAIN_STARTED_KEY: report.started_at,
        HANDLER_SECONDS_KEY: time.perf_counter() - received,
        **clipping,
        **privacy,
    }
    content = reply_record(
        {**arrays, PROBE_RECORD: probes}, {**rank_config, **client.identity(context)}, metrics
    )
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
        return own_base(context, client.worker.device)
    cache = client.worker.store_cache(str(store))
    catch_up_from_store(cache, str(store), int(payload.config[FROM_VERSION_KEY]))
    return cache


def measured_probes(client: Client, model: nn.Module, payload: Payload) -> dict:
    """(W_eff - W_0) X per module, when the server asks for probes."""
    if PROBE_SEED_KEY not in payload.config:
        return {}
    return client.model_step.probe_responses(model, int(payload.config[PROBE_SEED_KEY]))
