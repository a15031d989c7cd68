"""Property-based fuzzing of the reply checks: node BAD's train reply mutated at random (config
and metric values of any type, records and keys dropped, arrays of any dtype, shape and content,
arrays whose bytes disagree with their metadata). The strategy never raises; a dropped reply
leaves the state exactly as the round without it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.lora.probes import PROBE_RECORD
from fedlora.wire.messages import (
    ADAPTER_RECORD,
    CONFIG_RECORD,
    HEAD_RECORD,
    LOSS_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SECONDS_KEY,
    VERSION_KEY,
    rank_key,
    scale_key,
    start_rank_key,
)
from strategies import STRATEGIES
from tests.integration.test_hostile_replies import BAD, play_round, state_tensors

pytestmark = pytest.mark.usefixtures("task_identity")

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
NUMBERS = st.one_of(INT64, st.integers(-2, 8), st.floats(allow_nan=True, allow_infinity=True))
CONFIG_VALUES = st.one_of(
    NUMBERS, st.booleans(), st.text(max_size=6), st.binary(max_size=6), st.lists(INT64, max_size=2)
)
CONFIG_KEYS = st.one_of(
    st.sampled_from(
        [
            PARTITION_ID_KEY,
            VERSION_KEY,
            rank_key("m1"),
            rank_key("m2"),
            scale_key("m1"),
            scale_key("m2"),
            start_rank_key("m1"),
        ]
    ),
    st.text(max_size=6),
)
METRIC_KEYS = st.one_of(
    st.sampled_from([NUM_EXAMPLES_KEY, LOSS_KEY, SECONDS_KEY]), st.text(max_size=6)
)
RECORDS = st.sampled_from([ADAPTER_RECORD, HEAD_RECORD, PROBE_RECORD, "extra"])
ARRAY_KEYS = st.sampled_from(
    [
        "m1.lora_A.weight",
        "m1.lora_B.weight",
        "m2.lora_A.weight",
        "m1.sb_R.weight",
        "m1",
        "head.weight",
        "x",
    ]
)
DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.uint8, np.bool_])
SHAPES = st.lists(st.integers(0, 7), max_size=3).map(tuple)
FILL = st.sampled_from([0.0, 1.0, -3.5, 1e30, np.nan, np.inf])


@st.composite
def arrays(draw) -> Array:
    shape, dtype = draw(SHAPES), draw(DTYPES)
    if draw(st.booleans()):
        data = draw(st.binary(max_size=64))
        return Array(dtype=np.dtype(dtype).name, shape=shape, stype="numpy.ndarray", data=data)
    with np.errstate(all="ignore"):
        return Array(np.full(shape, draw(FILL)).astype(dtype))


MUTATIONS = st.one_of(
    st.tuples(st.just("config"), CONFIG_KEYS, CONFIG_VALUES),
    st.tuples(st.just("metric"), METRIC_KEYS, NUMBERS),
    st.tuples(
        st.just("drop-record"),
        st.sampled_from([CONFIG_RECORD, METRICS_RECORD, ADAPTER_RECORD, HEAD_RECORD]),
    ),
    st.tuples(
        st.just("drop-key"),
        st.sampled_from([CONFIG_RECORD, METRICS_RECORD]),
        st.one_of(CONFIG_KEYS, METRIC_KEYS),
    ),
    st.tuples(st.just("array"), RECORDS, ARRAY_KEYS, arrays()),
)


def mutate(content, mutation) -> None:
    """Apply one mutation; one that Flower's own records refuse to hold is skipped."""
    kind, *args = mutation
    try:
        if kind in ("config", "metric"):
            record, (key, value) = (CONFIG_RECORD if kind == "config" else METRICS_RECORD), args
            if record in content:
                content[record][key] = value
        elif kind == "drop-record" and args[0] in content:
            del content[args[0]]
        elif kind == "drop-key" and args[0] in content:
            content[args[0]].pop(args[1], None)
        elif kind == "array":
            record, key, array = args
            named = dict(content[record].items()) if record in content else {}
            named[key] = array
            content[record] = ArrayRecord(named)
    except (TypeError, ValueError):
        pass


@functools.cache
def reference(name: str) -> dict[str, torch.Tensor]:
    strategy, *_ = play_round(name, leave_out=True)
    return state_tensors(strategy)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_a_mutated_reply_never_raises_and_a_dropped_one_changes_nothing(name, mutations):
    strategy, _, _ = play_round(name, lambda content: [mutate(content, m) for m in mutations])
    got = state_tensors(strategy)
    if BAD in strategy.dropped.get(1, {}):
        expected = reference(name)
        assert got.keys() == expected.keys()
        for key in got:
            assert torch.equal(got[key], expected[key]), key
    for tensor in got.values():
        assert torch.isfinite(tensor).all()
