"""fedlora's message layout in Flower's records, client side: payloads in, replies out."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedlora.wire.messages import (
    ADAPTER_RECORD,
    BASE_CHANGE_RECORD,
    CONFIG_RECORD,
    HEAD_RECORD,
    METRICS_RECORD,
    Payload,
    Scalar,
)


def tensors(content: RecordDict, name: str) -> dict[str, Tensor]:
    """An ArrayRecord of the message as torch tensors (empty when it has none)."""
    if name not in content.array_records:
        return {}
    return dict(content.array_records[name].to_torch_state_dict())


def message_config(content: RecordDict) -> dict[str, Scalar]:
    if CONFIG_RECORD not in content.config_records:
        return {}
    return dict(content.config_records[CONFIG_RECORD])


def payload_from_record(content: RecordDict) -> Payload:
    """The server's payload from its message."""
    return Payload(
        adapter=tensors(content, ADAPTER_RECORD),
        head=tensors(content, HEAD_RECORD),
        base_change=tensors(content, BASE_CHANGE_RECORD),
        config=message_config(content),
    )


def reply_record(
    arrays: Mapping[str, Mapping[str, Tensor]],
    config: Mapping[str, Scalar],
    metrics: Mapping[str, int | float],
) -> RecordDict:
    """A reply: one ArrayRecord per non-empty tensor record, the config and the metrics."""
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {
        name: ArrayRecord({key: t.detach().contiguous() for key, t in named.items()})
        for name, named in arrays.items()
        if named
    }
    records[CONFIG_RECORD] = ConfigRecord(dict(config))
    records[METRICS_RECORD] = MetricRecord(dict(metrics))
    return RecordDict(records)
