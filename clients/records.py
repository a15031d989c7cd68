"""fedlora's message layout in Flower's records, client side: payloads in, replies out."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
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
from fedlora.wire.npy import npy_fields, npy_tensor


def tensors(content: RecordDict, name: str) -> dict[str, Tensor]:
    """An ArrayRecord of the message as torch tensors (empty when it has none)."""
    if name not in content.array_records:
        return {}
    return record_tensors(content.array_records[name])


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
        name: array_record(named) for name, named in arrays.items() if named
    }
    records[CONFIG_RECORD] = ConfigRecord(dict(config))
    records[METRICS_RECORD] = MetricRecord(dict(metrics))
    return RecordDict(records)


def array_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """``ArrayRecord(tensors)``, made many at a time (`fedlora.wire.npy`)."""
    return ArrayRecord({key: Array(*fields) for key, fields in npy_fields(tensors).items()})


def record_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """``record.to_torch_state_dict()``, read many at a time (`fedlora.wire.npy`)."""
    return {key: npy_tensor(key, array.stype, array.data) for key, array in record.items()}
