"""A node's sample-level DP: DP-SGD for a round within its privacy budget, the node's
accountant history kept in its state (`fedlora.privacy`), and the reply of a node whose budget is
spent."""

from __future__ import annotations

from flwr.app import Context, Message
from torch import nn

from clients.client import Client
from clients.node import save_privacy_history, saved_privacy_history
from clients.records import reply_record
from fedlora.errors import ConfigError
from fedlora.privacy.sample_level import BUDGET_SPENT_KEY, DELTA_KEY, EPSILON_KEY, client_plan
from fedlora.training.local import TrainReport, train_private
from fedlora.wire.messages import NUM_EXAMPLES_KEY, Payload, ranks_in


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
