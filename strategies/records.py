"""fedlora's message layout in Flower's records, server side: payloads out, replies in.

A payload becomes a `RecordDict` of one `ArrayRecord` per tensor record (``adapter``, ``head``,
``base_change``; empty ones left out) and the ``config`` `ConfigRecord`. A reply carries the
client's update in the same tensor records, its ranks and scales (``rank.{module}``,
``scale.{module}``, and ``start-rank.{module}`` where it pruned), its partition id and base version
in ``config``, its metrics in ``metrics`` and its probe responses in ``probes``.
Bytes are counted as serialized: the bytes of the arrays' serialized data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from fedlora.lora.probes import PROBE_RECORD
from fedlora.lora.updates import ClientUpdate
from fedlora.wire.messages import (
    ADAPTER_RECORD,
    BASE_CHANGE_RECORD,
    CONFIG_RECORD,
    HEAD_RECORD,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    Payload,
    start_rank_key,
    update_format,
)
from fedlora.wire.npy import npy_fields, npy_tensor


def payload_record(payload: Payload) -> RecordDict:
    """The payload as Flower records: one ArrayRecord per non-empty tensor record, and the config."""
    records: dict[str, ArrayRecord | ConfigRecord] = {
        name: array_record(tensors)
        for name, tensors in (
            (ADAPTER_RECORD, payload.adapter),
            (HEAD_RECORD, payload.head),
            (BASE_CHANGE_RECORD, payload.base_change),
        )
        if tensors
    }
    records[CONFIG_RECORD] = ConfigRecord(dict(payload.config))
    return RecordDict(records)


def serialized_bytes(content: RecordDict) -> int:
    """Bytes of the serialized arrays of a message, its probe responses (a measurement) excluded."""
    return sum(
        len(array.data)
        for name, record in content.array_records.items()
        if name != PROBE_RECORD
        for array in record.values()
    )


def tensors(content: RecordDict, name: str) -> dict[str, Tensor]:
    """An ArrayRecord of the reply as torch tensors (empty when the reply has none)."""
    if name not in content.array_records:
        return {}
    return record_tensors(content.array_records[name])


@dataclass(frozen=True)
class NodeReport:
    """What a node restates in every reply: its partition, ranks and scales, and base version."""

    partition_id: int
    ranks: dict[str, int]
    scales: dict[str, float]
    version: int


def client_update(content: RecordDict, update_kind: type, client_id: str) -> ClientUpdate:
    """A train reply as the rules take it: LoRA factors, FedSA-LoRA's A alone or Fed-SB's R."""
    metrics = content.metric_records[METRICS_RECORD]
    return update_from_tensors(
        tensors(content, ADAPTER_RECORD),
        tensors(content, HEAD_RECORD),
        dict(content.config_records[CONFIG_RECORD]),
        int(metrics[NUM_EXAMPLES_KEY]),
        update_kind,
        client_id,
    )


def update_from_tensors(
    adapter: dict[str, Tensor],
    head: dict[str, Tensor],
    config: dict,
    num_examples: int,
    update_kind: type,
    client_id: str,
) -> ClientUpdate:
    """A client's update from its tensors and its ``rank``/``scale``/``start-rank`` config."""
    modules = update_format(update_kind).from_tensors(adapter, config)
    start_ranks = {
        module: int(config[start_rank_key(module)])
        for module in modules
        if start_rank_key(module) in config
    }
    return ClientUpdate(
        client_id=client_id,
        num_examples=num_examples,
        modules=modules,
        head=head,
        start_ranks=start_ranks,
    )


def probe_responses(content: RecordDict) -> dict[str, Tensor]:
    """The reply's probe responses per module, in float64 (empty when it sent none)."""
    return {module: t.to(torch.float64) for module, t in tensors(content, PROBE_RECORD).items()}


def array_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """``ArrayRecord(tensors)``, made many at a time (`fedlora.wire.npy`)."""
    return ArrayRecord({key: Array(*fields) for key, fields in npy_fields(tensors).items()})


def record_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """``record.to_torch_state_dict()``, read many at a time (`fedlora.wire.npy`)."""
    return {key: npy_tensor(key, array.stype, array.data) for key, array in record.items()}
