"""Fed-SB on a node: its model step on LoRA-SB layers (fixed B and A kept on the node, R from the
server), and its answer to the federated LoRA-SB start's query (``query.sb_init``): the node's
gradient estimate on its own data, sketched or dense, by DP-SGD under sample-level DP."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from flwr.app import Context, Message
from torch import Tensor, nn

from clients.node import keep_tensors, kept_tensors, save_privacy_history, saved_privacy_history
from clients.records import message_config, reply_record
from clients.steps import Arrays, QueryAnswer
from clients.worker import Worker
from fedlora.data.encoding import batches
from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors, SBCore
from fedlora.lora.client_state import ClientState
from fedlora.lora.fedsb_init import estimate_gradient, estimate_private_gradient, sketch_gradients
from fedlora.lora.lowrank import LowRank
from fedlora.lora.probes import probe_responses, sb_weight_changes
from fedlora.lora.versioning import BaseCache
from fedlora.models.base_model import copy_to, sb_head_parameters
from fedlora.models.peft_io import ModelMismatchError
from fedlora.models.sb_layer import load_cores, load_fixed_factors, read_cores, sb_layers
from fedlora.privacy.sample_level import client_plan, example_loader
from fedlora.rules import AggregationRule
from fedlora.training.local import seeded_rng, to_device
from fedlora.wire.messages import (
    ADAPTER_RECORD,
    GRADIENT_SUFFIX,
    HEAD_RECORD,
    NUM_EXAMPLES_KEY,
    SB_A_SUFFIX,
    SB_B_SUFFIX,
    SB_INIT_ACTION,
    SB_INIT_MODE_KEY,
    SB_INIT_RANK_KEY,
    SB_INIT_SEED_KEY,
    SKETCH_Y_SUFFIX,
    SKETCH_Z_SUFFIX,
    Payload,
    Scalar,
    modules_with_suffix,
    rank_key,
    ranks_in,
    to_wire,
    update_format,
)

if TYPE_CHECKING:
    from clients.client import Client


def answer_sb_init(client: Client, message: Message, context: Context) -> Message:
    """The node's gradient estimate for Fed-SB's LoRA-SB start: sketches or the dense G."""
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
        pack=config.pack_sequences,
    )
    model = worker.base.model
    if worker.device.type != "cpu":
        model = copy_to(model, worker.device)

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


class SBModelStep:
    """Fed-SB on LoRA-SB layers: fixed B and A (kept on the node), R from the server."""

    queries: ClassVar[dict[str, QueryAnswer]] = {SB_INIT_ACTION: answer_sb_init}

    def __init__(self, worker: Worker, rule: AggregationRule) -> None:
        self.worker, self.rule = worker, rule

    def rank_config(self, capacities: Mapping[str, int] | int) -> dict[str, Scalar]:
        """``rank.{module}``: the capacity (leading block of R) the node trains per layer."""
        layers = sb_layers(self.worker.sb_model(capacities))
        return {rank_key(module): layer.capacity for module, layer in layers.items()}

    def receive(self, payload: Payload, context: Context, cache: BaseCache | None) -> nn.Module:
        """Load the fixed factors (sent once, then kept on the node), R_t and the head."""
        model = self.worker.sb_model(ranks_in(payload.config))
        device = self.worker.device
        kept = kept_tensors(context, device)
        local = ClientState(
            adapter={
                module: LoRAFactors(
                    A=kept[module + SB_A_SUFFIX], B=kept[module + SB_B_SUFFIX], scale=1.0
                )
                for module in modules_with_suffix(kept, SB_A_SUFFIX)
            }
        )
        stepped = self.rule.client_step(local, payload.to(device))
        load_fixed_factors(model, {m: LowRank(f.B, f.A) for m, f in stepped.adapter.items()})
        load_cores(model, stepped.cores)
        write_sb_head(model, stepped.head)
        if modules_with_suffix(payload.adapter, SB_A_SUFFIX):
            keep_tensors(
                context,
                {
                    **{m + SB_A_SUFFIX: f.A for m, f in stepped.adapter.items()},
                    **{m + SB_B_SUFFIX: f.B for m, f in stepped.adapter.items()},
                },
            )
        return model

    def probe_responses(self, model: nn.Module, seed: int) -> dict[str, Tensor]:
        return probe_responses(sb_weight_changes(model), seed)

    def reply(self, model: nn.Module, payload: Payload, context: Context) -> tuple[Arrays, dict]:
        """Each layer's full R (R_global + its trained block) and capacity, and the head."""
        layers = sb_layers(model)
        cores = {m: SBCore(R=R, rank=layers[m].capacity) for m, R in read_cores(model).items()}
        tensors, config = update_format(self.rule.update_kind).to_tensors(cores)
        head = {key: to_wire(p.detach()) for key, p in sb_head_parameters(model).items()}
        return {ADAPTER_RECORD: tensors, HEAD_RECORD: head}, config


@torch.no_grad()
def write_sb_head(model: nn.Module, head: Mapping[str, Tensor]) -> None:
    """Copy the head into a Fed-SB model's trained full parameters; the names must match."""
    parameters = sb_head_parameters(model)
    if set(head) != set(parameters):
        raise ModelMismatchError(
            f"head {sorted(head)} does not match the model's trained parameters "
            f"{sorted(parameters)}"
        )
    for key, tensor in head.items():
        parameters[key].copy_(tensor)
