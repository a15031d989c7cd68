"""A method's client step on a live model, and the update the client sends back.

`LoRAModelStep` runs the methods on peft LoRA models (FedAvg, FedEx-LoRA, FLoRA, FedSA-LoRA,
LoRA-FAIR, FlexLoRA, HetLoRA), `clients.fedsb.SBModelStep` Fed-SB on LoRA-SB layers. Each applies the rule's pure
``client_step`` to what the node holds and writes the result into a model of the worker, reports
how the model's weights moved (for the exactness probes), and builds the reply after training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from flwr.app import Context, Message
from torch import Tensor, nn

from clients.node import keep_tensors, kept_tensors
from clients.worker import Worker
from fedlora.lora.client_state import ClientState
from fedlora.lora.probes import lora_probe_responses
from fedlora.lora.versioning import BaseCache
from fedlora.models.peft_io import (
    DEFAULT_ADAPTER,
    apply_client_state,
    lora_layers,
    read_adapter,
    read_head,
)
from fedlora.privacy.client_level import CLIP_KEY, UPDATE_NORM_KEY, clip_reply
from fedlora.rules import AggregationRule
from fedlora.wire.messages import (
    A_SUFFIX,
    ADAPTER_RECORD,
    B_SUFFIX,
    HEAD_RECORD,
    Payload,
    Scalar,
    adapter_config,
    ranks_in,
    scale_key,
    start_rank_key,
    to_wire,
    update_format,
)

if TYPE_CHECKING:
    from clients.client import Client

Arrays = dict[str, dict[str, Tensor]]
"""Tensor records of a reply by record name."""
QueryAnswer = Callable[["Client", Message, Context], Message]
"""A model step's answer to a query of its own (``query.{action}``), as the client it runs as."""


class LoRAModelStep:
    """The methods that run on peft LoRA models."""

    queries: ClassVar[dict[str, QueryAnswer]] = {}
    """The queries the method's nodes answer besides the rank query, by action."""

    def __init__(self, worker: Worker, rule: AggregationRule) -> None:
        self.worker, self.rule = worker, rule

    def rank_config(self, ranks: Mapping[str, int] | int) -> dict[str, Scalar]:
        """``rank.{module}`` and ``scale.{module}`` of a model with these ranks; a capacity class
        (one rank) becomes the ranks the rule gives it (`AggregationRule.client_ranks`: LEGEND's
        depth and rank distribution)."""
        if isinstance(ranks, int):
            modules = sorted(self.worker.lora_model(ranks).pristine.adapter)
            ranks = self.rule.client_ranks(ranks, modules, self.worker.config.max_rank)
        return adapter_config(self.worker.lora_model(ranks).pristine.adapter)

    def receive(self, payload: Payload, context: Context, cache: BaseCache | None) -> nn.Module:
        """Apply the client step to what the node holds and write it into a model of its ranks."""
        built = self.worker.lora_model(ranks_in(payload.config))
        device = self.worker.device
        local = with_kept(built.pristine, kept_tensors(context, device))
        received = payload.to(device)
        apply_client_state(built.model, self.rule.client_step(local, received, cache))
        for layer in lora_layers(built.model).values():
            layer.lora_A[DEFAULT_ADAPTER].weight.requires_grad_(self.rule.trains_A)
        return built.model

    def probe_responses(self, model: nn.Module, seed: int) -> dict[str, Tensor]:
        return lora_probe_responses(model, seed)

    def reply(self, model: nn.Module, payload: Payload, context: Context) -> tuple[Arrays, dict]:
        """The trained update as the rule's ``client_reply`` makes it (HetLoRA: pruned; FedSA-LoRA:
        A only, keeping B and the head on the node; FFA-LoRA: B only, A is frozen) and its
        ranks."""
        run = self.worker.config
        trained = read_adapter(model)
        update = self.rule.client_reply(trained, run.lora_alpha, run.rslora)
        tensors, config = update_format(self.rule.update_kind).to_tensors(update)
        for module, received in ranks_in(payload.config).items():
            if update[module].rank != received:
                config[start_rank_key(module)] = received
        if self.rule.personalized:
            kept = {module + B_SUFFIX: f.B for module, f in trained.items()}
            keep_tensors(context, {**kept, **read_head(model)})
            return {ADAPTER_RECORD: tensors}, config
        head = {key: to_wire(t) for key, t in read_head(model).items()}
        return {ADAPTER_RECORD: tensors, HEAD_RECORD: head}, config


def with_kept(pristine: ClientState, kept: Mapping[str, Tensor]) -> ClientState:
    """The model's state as built, with the B and head the node kept (FedSA-LoRA)."""
    if not kept:
        return pristine
    adapter = {
        module: replace(factors, B=kept[module + B_SUFFIX])
        for module, factors in pristine.adapter.items()
    }
    head = {key: kept[key] for key in pristine.head}
    return replace(pristine, adapter=adapter, head=head)


def clip_for_client_dp(
    arrays: Arrays, payload: Payload, rank_config: Mapping[str, Scalar], scale_power: float = 0.5
) -> tuple[Arrays, dict[str, float]]:
    """Client-level DP: the reply's adapter and head with their change from the payload clipped,
    as one vector in the client's own shapes and folded (LoRA factors times s_i ** the rule's
    ``dp_scale_power``: sqrt(s_i), FFA-LoRA's s_i), to the
    payload's ``dp-client-clip`` (`fedlora.privacy.client_level.clip_reply`); and the change's norm before
    clipping. Unchanged, with no metric, when the payload asks for no clipping."""
    if CLIP_KEY not in payload.config:
        return arrays, {}
    received = {ADAPTER_RECORD: payload.adapter, HEAD_RECORD: payload.head}
    sent, before, folds = {}, {}, {}
    for name in (ADAPTER_RECORD, HEAD_RECORD):
        for key, tensor in arrays.get(name, {}).items():
            sent[(name, key)], before[(name, key)] = tensor, received[name][key]
            if key.endswith((A_SUFFIX, B_SUFFIX)):
                module = key.removesuffix(A_SUFFIX).removesuffix(B_SUFFIX)
                folds[(name, key)] = float(rank_config[scale_key(module)]) ** scale_power
    clipped, norm = clip_reply(sent, before, folds, float(payload.config[CLIP_KEY]))
    out = {name: dict(named) for name, named in arrays.items()}
    for (name, key), tensor in clipped.items():
        out[name][key] = tensor
    return out, {UPDATE_NORM_KEY: norm}
