"""What a node keeps between messages in its ``context.state`` (which survives rounds in
simulation and deployment alike): its current ranks and the global version it last received; the
tensors that never leave it (FedSA-LoRA's B and head, Fed-SB's fixed factors), keyed as on the
wire; when base changes travel in messages, its own drifted base; and, with sample-level DP, its
privacy accountant's history, so that the steps of every round it trained in add up."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context
from torch import Tensor

from clients.records import array_record, record_tensors
from fedlora.lora.versioning import BaseCache
from fedlora.privacy.accounting import History, history_from_values, history_to_values
from fedlora.wire.messages import VERSION_KEY, rank_key, ranks_in
from fedlora.wire.npy import moved_together

RANKS_AND_VERSION_RECORD = "fedlora.node"
KEPT_RECORD = "fedlora.kept"
BASE_RECORD = "fedlora.base"
BASE_VERSION_RECORD = "fedlora.base-version"
PRIVACY_RECORD = "fedlora.privacy"


def saved_ranks(context: Context) -> dict[str, int]:
    """The ranks the node last ran with (empty before its first payload)."""
    return ranks_in(context.state.config_records.get(RANKS_AND_VERSION_RECORD, {}))


def saved_version(context: Context) -> int:
    """The global version the node last received (0 before its first payload)."""
    return int(context.state.config_records.get(RANKS_AND_VERSION_RECORD, {}).get(VERSION_KEY, 0))


def save_ranks_and_version(context: Context, ranks: Mapping[str, int], version: int) -> None:
    ranks_config = {rank_key(module): rank for module, rank in ranks.items()}
    context.state[RANKS_AND_VERSION_RECORD] = ConfigRecord({**ranks_config, VERSION_KEY: version})


def kept_tensors(context: Context, device: torch.device) -> dict[str, Tensor]:
    """The tensors the node keeps, on ``device``."""
    if KEPT_RECORD not in context.state.array_records:
        return {}
    return moved_together(record_tensors(context.state.array_records[KEPT_RECORD]), device)


def keep_tensors(context: Context, tensors: Mapping[str, Tensor]) -> None:
    """Replace the tensors kept on the node."""
    context.state[KEPT_RECORD] = array_record(tensors)


def own_base(context: Context, device: torch.device) -> BaseCache:
    """The node's own drifted base (when changes travel in messages) on ``device``; version 0 at
    first."""
    if BASE_RECORD not in context.state.array_records:
        return BaseCache(device=device)
    shift = moved_together(record_tensors(context.state.array_records[BASE_RECORD]), device)
    version = int(context.state.config_records[BASE_VERSION_RECORD][VERSION_KEY])
    return BaseCache(version=version, shift=shift, device=device)


def save_own_base(context: Context, cache: BaseCache) -> None:
    context.state[BASE_RECORD] = array_record(cache.shift)
    context.state[BASE_VERSION_RECORD] = ConfigRecord({VERSION_KEY: cache.version})


def saved_privacy_history(context: Context, accountant: str) -> History:
    """The node's privacy accountant history (empty before its first private step)."""
    values = dict(context.state.config_records.get(PRIVACY_RECORD, {}))
    return history_from_values(values, accountant)


def save_privacy_history(context: Context, history: History, accountant: str) -> None:
    context.state[PRIVACY_RECORD] = ConfigRecord(history_to_values(history, accountant))
