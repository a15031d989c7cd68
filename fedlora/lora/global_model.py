"""The global model as the server knows it: the weights a client of each rank runs with, built into
a plain copy of the pretrained model for server-side evaluation and export.

A rank class's weights are derived by the rule itself: the server makes the payload a client of that
rank would receive and runs the method's pure client step on it, so what is evaluated is what such a
client runs (FedAvg-like rules: its slice of the global factors; FedEx-LoRA, FLoRA, Fed-SB: W_t for
every rank). Personalized methods (FedSA-LoRA) have no global model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedlora.lora.adapter import LoRAFactors, lora_scale
from fedlora.lora.client_state import ClientState
from fedlora.lora.versioning import BaseCache
from fedlora.models.base_model import copy_to
from fedlora.rules import AggregationRule, ClientSpec, GlobalState

PEFT_PREFIX = "base_model.model."


def rank_class_deltas(
    rule: AggregationRule,
    state: GlobalState,
    rank: int,
    alpha: float,
    rslora: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """W - W_0 per module for a client of ``rank`` after its client step on this state (0 for a
    module the rule leaves out at that capacity: LEGEND's layers below the client's depth),
    computed on ``device`` as a client there computes it."""
    top = max((f.inner_rank for f in state.factors.values()), default=rank)
    ranks = rule.client_ranks(rank, state.modules, top)
    if isinstance(ranks, int):
        ranks = dict.fromkeys(state.modules, ranks)
    spec = ClientSpec(
        ranks=dict(ranks),
        scales={m: lora_scale(alpha, r, rslora) for m, r in ranks.items()},
        version=state.version if state.changes is not None else 0,
    )
    local = ClientState(
        adapter={
            module: LoRAFactors(
                torch.zeros(r, state.shapes[module][1], dtype=dtype, device=device),
                torch.zeros(state.shapes[module][0], r, dtype=dtype, device=device),
                spec.scales[module],
            )
            for module, r in spec.ranks.items()
        }
    )
    cache = None
    if state.changes is not None:
        shift = {m: rule.global_delta(state, m).to(device).dense().to(dtype) for m in state.modules}
        cache = BaseCache(version=state.version, shift=shift, device=torch.device(device))
    local = rule.client_step(local, rule.client_payload(state, spec).to(device), cache)
    return {
        module: local.effective_delta(module)
        if module in local.adapter
        else torch.zeros(state.shapes[module], dtype=dtype, device=device)
        for module in state.modules
    }


def plain_model_with(
    pretrained: nn.Module,
    deltas: dict[str, Tensor],
    head: dict[str, Tensor],
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A copy of the pretrained model on ``device`` with W_0 + delta in every adapted module and
    the trained head.

    Names may carry peft's ``base_model.model.`` prefix. GPT-2 ``Conv1D`` weights (d_in x d_out) get
    the delta turned to their orientation.
    """
    model = copy_to(pretrained, device)
    with torch.no_grad():
        for name, delta in deltas.items():
            layer = model.get_submodule(name.removeprefix(PEFT_PREFIX))
            weight = layer.weight
            oriented = (
                delta if weight.shape == delta.shape and isinstance(layer, nn.Linear) else delta.T
            )
            weight.add_(oriented.to(weight))
        parameters = dict(model.named_parameters())
        for name, value in head.items():
            parameters[name.removeprefix(PEFT_PREFIX)].copy_(value)
    return model.eval()
