"""One bad client can neither stop nor poison a federation.

Three nodes reply to the strategies in this process; node `BAD` crafts its reply (or its answer to
the rank query). Each test checks that the strategy does not raise, drops that reply with a named
reason (``dropped``, the log), and that the state is what the honest replies alone make: the same
round aggregated without the bad reply, and, for FedAvg, the padded average worked out here.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch.nn.functional import pad

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.fedsb_init import sketch_gradients
from fedlora.lora.lowrank import LowRank
from fedlora.lora.measurement import worst
from fedlora.lora.probes import PROBE_COUNT, PROBE_RECORD, relative_deviation
from fedlora.lora.versioning import BaseCache
from fedlora.rules import ClientSpec, RoundResult, make_rule
from fedlora.wire.messages import (
    A_SUFFIX,
    ACCURACY_KEY,
    ADAPTER_RECORD,
    B_SUFFIX,
    CONFIG_RECORD,
    FROM_VERSION_KEY,
    GENERATION_KEY,
    HEAD_RECORD,
    LOSS_KEY,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    PARTITION_ID_KEY,
    SB_A_SUFFIX,
    SB_B_SUFFIX,
    SB_INIT_ACTION,
    SB_INIT_RANK_KEY,
    SB_INIT_SEED_KEY,
    SB_R_SUFFIX,
    SECONDS_KEY,
    SKETCH_Y_SUFFIX,
    SKETCH_Z_SUFFIX,
    TRAIN_STARTED_KEY,
    VERSION_KEY,
    rank_key,
    scale_key,
    start_rank_key,
)
from strategies import STRATEGIES
from strategies.client_dp import ClientLevelDP
from strategies.records import serialized_bytes
from strategies.server_app import MetricsLog, run
from tests.support.local_grid import FIRST_NODE_ID, LocalGrid
from tests.support.tiny_runs import TINY_BERT_RUN

ALPHA = 8.0
TOP = 4
SHAPES = {"m1": (6, 5), "m2": (4, 7)}
HEAD_SHAPE = (3, 4)
NODES = {101: (0, 2, 30), 102: (1, 3, 50), 103: (2, 4, 20)}
"""node id: (partition id, rank, training examples)."""
BAD = 102
OPTIONS = {"lorafair": {"steps": 5}}

pytestmark = pytest.mark.usefixtures("task_identity")


def scale(rank: int) -> float:
    return ALPHA / rank


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def initial_arrays(name: str, generator: torch.Generator) -> ArrayRecord:
    """The top-rank adapter (Fed-SB: non-zero fixed factors and R_0) and a head, in float32."""
    tensors = {"head.weight": randn(generator, *HEAD_SHAPE)}
    for m, (d_out, d_in) in SHAPES.items():
        if name == "fedsb":
            tensors[m + SB_A_SUFFIX] = randn(generator, TOP, d_in)
            tensors[m + SB_B_SUFFIX] = randn(generator, d_out, TOP)
            tensors[m + SB_R_SUFFIX] = randn(generator, TOP, TOP)
        else:
            tensors[m + A_SUFFIX] = randn(generator, TOP, d_in)
            tensors[m + B_SUFFIX] = randn(generator, d_out, TOP)
    return ArrayRecord(tensors)


def facts(node_id: int, version: int = 0, scaled: bool = True) -> dict:
    partition, rank, _ = NODES[node_id]
    config = {PARTITION_ID_KEY: partition, VERSION_KEY: version}
    for m in SHAPES:
        config[rank_key(m)] = rank
        if scaled:
            config[scale_key(m)] = scale(rank)
    return config


MISSING = object()
"""In ``bad_facts``: the key is left out."""


class QueryGrid:
    """Answers rank queries with `facts`, node `BAD` with ``bad_facts`` over them."""

    def __init__(self, bad_facts: dict | None = None, scaled: bool = True) -> None:
        self.bad_facts, self.scaled = bad_facts or {}, scaled

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        config = facts(node, scaled=self.scaled)
        if node == BAD:
            config.update(self.bad_facts)
            config = {key: value for key, value in config.items() if value is not MISSING}
        return Message(RecordDict({CONFIG_RECORD: ConfigRecord(config)}), reply_to=message)

    def send_and_receive(self, messages, timeout=None):
        return [self.answer(m) for m in messages]


def honest_content(name: str, message: Message, generator: torch.Generator) -> RecordDict:
    """What an honest node of `NODES` sends back: its update in float32 (FedSA-LoRA: A only, no
    head; FFA-LoRA: B only; Fed-SB: the full R), its facts at the version it was sent, and its
    metrics."""
    node = message.metadata.dst_node_id
    _, rank, examples = NODES[node]
    adapter = {}
    for m, (d_out, d_in) in SHAPES.items():
        if name == "fedsb":
            adapter[m + SB_R_SUFFIX] = randn(generator, TOP, TOP)
            continue
        if name != "ffalora":
            adapter[m + A_SUFFIX] = randn(generator, rank, d_in)
        if name != "fedsa":
            adapter[m + B_SUFFIX] = randn(generator, d_out, rank)
    records = {ADAPTER_RECORD: ArrayRecord(adapter)}
    if name != "fedsa":
        records[HEAD_RECORD] = ArrayRecord({"head.weight": randn(generator, *HEAD_SHAPE)})
    version = int(message.content[CONFIG_RECORD][VERSION_KEY])
    records[CONFIG_RECORD] = ConfigRecord(facts(node, version, scaled=name != "fedsb"))
    records[METRICS_RECORD] = MetricRecord(
        {NUM_EXAMPLES_KEY: examples, LOSS_KEY: 1.0, SECONDS_KEY: 0.5}
    )
    return RecordDict(records)


def strategy_for(name: str, **options):
    return STRATEGIES[name](lora_alpha=ALPHA, probe_seed=0, **OPTIONS.get(name, {}), **options)


def play_round(name: str, tamper=None, leave_out: bool = False, **options):
    """Round 1 of strategy ``name``: node BAD's reply tampered with, or left out; the strategy,
    the replies and what ``aggregate_train`` returned."""
    generator = torch.Generator().manual_seed(0)
    strategy = strategy_for(name, **options)
    grid = QueryGrid(scaled=name != "fedsb")
    messages = strategy.configure_train(1, initial_arrays(name, generator), ConfigRecord(), grid)
    replies = []
    for message in messages:
        content = honest_content(name, message, generator)
        if message.metadata.dst_node_id == BAD:
            if leave_out:
                continue
            if tamper is not None:
                tamper(content)
        replies.append(Message(content, reply_to=message))
    return strategy, replies, strategy.aggregate_train(1, replies)


def state_tensors(strategy) -> dict[str, torch.Tensor]:
    """What the global state holds: the model's change per module (FedSA-LoRA: the shared A) and
    the head."""
    state, rule = strategy.state, strategy.rule
    if rule.personalized:
        named = {m: state.factors[m].V for m in state.modules}
    else:
        named = {m: rule.global_delta(state, m).dense() for m in state.modules}
    return {**named, **state.head}


def assert_dropped(name: str, tamper, reason: str, **options) -> dict:
    """Node BAD dropped for ``reason`` (a regex), the state finite and equal to the round without
    its reply; the round's metrics."""
    strategy, _, (_, metrics) = play_round(name, tamper, **options)
    assert re.search(reason, strategy.dropped[1][BAD]), strategy.dropped[1][BAD]
    reference, *_ = play_round(name, leave_out=True, **options)
    got, expected = state_tensors(strategy), state_tensors(reference)
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.isfinite(got[key]).all()
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    assert metrics["clients"] == 2
    return metrics


# ---- crafted replies ------------------------------------------------------------------------------


def set_config(key, value):
    def tamper(content):
        content[CONFIG_RECORD][key] = value

    return tamper


def set_metric(key, value):
    def tamper(content):
        content[METRICS_RECORD][key] = value

    return tamper


def drop_metric(key):
    def tamper(content):
        del content[METRICS_RECORD][key]

    return tamper


def drop_record(name):
    def tamper(content):
        del content[name]

    return tamper


def drop_array(record, key):
    def tamper(content):
        content[record] = ArrayRecord({k: a for k, a in content[record].items() if k != key})

    return tamper


def replace_arrays(record, **arrays):
    """Replace (or add) arrays of a tensor record; a keyword's ``__`` stands for a dot."""

    def tamper(content):
        named = dict(content[record].items())
        for key, value in arrays.items():
            array = value if isinstance(value, Array) else Array.from_torch_tensor(value)
            named[key.replace("__", ".")] = array
        content[record] = ArrayRecord(named)

    return tamper


def poison(record, key, value):
    def tamper(content):
        tensor = content[record][key].numpy().copy()
        tensor[0, 0] = value
        replace_arrays(record, **{key.replace(".", "__"): torch.from_numpy(tensor)})(content)

    return tamper


def at_rank(rank: int, **config):
    """Node BAD's m1 factors rebuilt at ``rank``, with its rank (and scale) restated."""

    def tamper(content):
        d_out, d_in = SHAPES["m1"]
        replace_arrays(
            ADAPTER_RECORD,
            m1__lora_A__weight=torch.ones(rank, d_in),
            m1__lora_B__weight=torch.ones(d_out, rank),
        )(content)
        content[CONFIG_RECORD][rank_key("m1")] = rank
        content[CONFIG_RECORD][scale_key("m1")] = scale(rank)
        for key, value in config.items():
            content[CONFIG_RECORD][key] = value

    return tamper


def typed_A(dtype):
    return replace_arrays(ADAPTER_RECORD, m1__lora_A__weight=torch.ones(3, 5).to(dtype))


A1 = "m1" + A_SUFFIX
FORGED = Array(dtype="float32", shape=(3, 5), stype="numpy.ndarray", data=bytes(4_000_000))
"""An array whose metadata says 3 x 5 floats but which holds 4 MB."""

CASES = {
    "nan in A": (poison(ADAPTER_RECORD, A1, math.nan), r"non-finite values in \['m1.lora_A"),
    "inf in B": (poison(ADAPTER_RECORD, "m2" + B_SUFFIX, math.inf), r"non-finite.*m2.lora_B"),
    "nan in head": (poison(HEAD_RECORD, "head.weight", math.nan), r"non-finite.*head.weight"),
    "zero examples": (set_metric(NUM_EXAMPLES_KEY, 0), r"num-examples = 0 outside"),
    "negative examples": (set_metric(NUM_EXAMPLES_KEY, -4), r"num-examples = -4 outside"),
    "nan examples": (set_metric(NUM_EXAMPLES_KEY, math.nan), r"num-examples = nan is not an int"),
    "fractional examples": (set_metric(NUM_EXAMPLES_KEY, 2.7), r"num-examples = 2.7 is not an"),
    "10^18 examples": (set_metric(NUM_EXAMPLES_KEY, 10**18), r"num-examples = 10+ outside"),
    "rank above the global rank": (at_rank(5), r"rank.m1 = 5 outside \[1, 4\]"),
    "rank above the rank sent": (at_rank(4), r"rank.m1 = 4, the node was sent rank 3"),
    "rank below the rank sent": (at_rank(2), r"rank.m1 = 2, the node was sent rank 3"),
    "start rank 100": (
        set_config(start_rank_key("m1"), 100),
        r"start-rank.m1 = 100, the node was sent rank 3",
    ),
    "a start rank it did not have": (
        at_rank(2, **{start_rank_key("m1"): 4}),
        r"start-rank.m1 = 4, the node was sent rank 3",
    ),
    "extra head key": (
        replace_arrays(HEAD_RECORD, head__bias=torch.zeros(3)),
        r"unexpected keys \['head.bias'\]",
    ),
    "missing adapter": (drop_record(ADAPTER_RECORD), r"record 'adapter' is missing"),
    "missing lora_B": (drop_array(ADAPTER_RECORD, "m2" + B_SUFFIX), r"missing keys \['m2.lora_B"),
    "wrong shape": (
        replace_arrays(ADAPTER_RECORD, m1__lora_A__weight=torch.ones(3, 6)),
        r"shape \(3, 6\), expected \(3, 5\)",
    ),
    "missing head": (drop_record(HEAD_RECORD), r"record 'head' is missing"),
    "missing metrics": (drop_record(METRICS_RECORD), r"record 'metrics' is missing"),
    "missing config": (drop_record(CONFIG_RECORD), r"record 'config' is missing"),
    "unexpected record": (
        lambda content: content.__setitem__("extra", ArrayRecord({"x": torch.ones(2)})),
        r"unexpected records \['extra'\]",
    ),
    "a 12 MB tensor": (
        replace_arrays(ADAPTER_RECORD, m1__lora_A__weight=torch.ones(3, 1_000_000)),
        r"shape \(3, 1000000\), expected \(3, 5\)",
    ),
    "4 MB behind a small shape": (
        replace_arrays(ADAPTER_RECORD, m1__lora_A__weight=FORGED),
        r"4000000 bytes, at most \d+ expected",
    ),
    "negative scale": (set_config(scale_key("m1"), -2.0), r"scale.m1 = -2.0, the run's scale"),
    "nan scale": (set_config(scale_key("m2"), math.nan), r"scale.m2 = nan"),
    "inf scale": (set_config(scale_key("m1"), math.inf), r"scale.m1 = inf"),
    "another alpha's scale": (set_config(scale_key("m1"), 16 / 3), r"scale for rank 3 is 2.66"),
    "missing loss": (drop_metric(LOSS_KEY), r"metric 'loss' is missing"),
    "missing seconds": (drop_metric(SECONDS_KEY), r"metric 'seconds' is missing"),
    "nan loss": (set_metric(LOSS_KEY, math.nan), r"metric 'loss' = nan is not a finite"),
    "inf start": (
        set_metric(TRAIN_STARTED_KEY, math.inf),
        r"metric 'train-started-at' = inf is not a finite",
    ),
    "version 999": (set_config(VERSION_KEY, 999), r"version = 999 outside \[0, 0\]"),
    "version -1": (set_config(VERSION_KEY, -1), r"version = -1 outside"),
    "float64 tensor": (typed_A(torch.float64), r"dtype float64, accepted"),
    "int64 tensor": (typed_A(torch.int64), r"dtype int64, accepted"),
    "bool tensor": (typed_A(torch.bool), r"dtype bool, accepted"),
    "another node's partition": (
        set_config(PARTITION_ID_KEY, 0),
        r"claims partition id 0, the node is partition 1",
    ),
    "partition id as text": (set_config(PARTITION_ID_KEY, "1"), r"partition-id = '1' is not"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_train_reply_is_dropped_by_name_and_the_round_goes_on(case, caplog):
    tamper, reason = CASES[case]
    assert_dropped("fedavg", tamper, reason)
    assert re.search(f"Dropping the reply of node {BAD}: .*{reason}", caplog.text)


def test_fedavg_without_the_bad_reply_is_the_padded_average_of_the_others():
    """An independent expectation of the dropped round: sum over nodes 101, 103 of p_i
    pad(sqrt(s_i) B_i) and p_i pad(sqrt(s_i) A_i), p re-weighted over those two."""
    strategy, replies, _ = play_round("fedavg", set_config(scale_key("m1"), math.nan))
    honest = [r for r in replies if r.metadata.src_node_id != BAD]
    total = sum(NODES[r.metadata.src_node_id][2] for r in honest)
    for m in SHAPES:
        U = V = 0
        for r in honest:
            _, rank, examples = NODES[r.metadata.src_node_id]
            A = r.content[ADAPTER_RECORD][m + A_SUFFIX].numpy()
            B = r.content[ADAPTER_RECORD][m + B_SUFFIX].numpy()
            p, root = examples / total, math.sqrt(scale(rank))
            U = U + p * pad(root * torch.from_numpy(B), (0, TOP - rank))
            V = V + p * pad(root * torch.from_numpy(A), (0, 0, 0, TOP - rank))
        assert torch.allclose(strategy.state.factors[m].U, U, atol=1e-6)
        assert torch.allclose(strategy.state.factors[m].V, V, atol=1e-6)


def test_a_claimed_partition_does_not_merge_byte_counts():
    strategy, replies, (_, metrics) = play_round("fedavg", set_config(PARTITION_ID_KEY, 0))
    first = next(r for r in replies if r.metadata.src_node_id == 101)
    assert metrics["bytes_up.0"] == serialized_bytes(first.content)
    assert "bytes_up.1" not in metrics
    assert strategy.nodes[BAD].partition_id == 1


def test_a_float16_update_is_accepted_as_its_float32_values():
    def halve(content):
        named = {k: torch.from_numpy(a.numpy()).half() for k, a in content[ADAPTER_RECORD].items()}
        content[ADAPTER_RECORD] = ArrayRecord(named)

    def rounded(content):
        named = {
            k: torch.from_numpy(a.numpy()).half().float()
            for k, a in content[ADAPTER_RECORD].items()
        }
        content[ADAPTER_RECORD] = ArrayRecord(named)

    half, _, (_, metrics) = play_round("fedavg", halve)
    single, *_ = play_round("fedavg", rounded)
    assert 1 not in half.dropped and metrics["clients"] == 3
    for key, tensor in state_tensors(half).items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state_tensors(single)[key])


LORA_STRATEGIES = ["fedavg", "fedex", "flora", "lorafair", "flexlora", "hetlora"]


@pytest.mark.parametrize("name", LORA_STRATEGIES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -2.0])
def test_a_scale_not_the_runs_is_dropped_by_every_lora_strategy(name, value):
    assert_dropped(name, set_config(scale_key("m1"), value), r"scale.m1 = ")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_non_finite_updates_are_dropped_by_every_strategy(name):
    key = "m1" + {"fedsb": SB_R_SUFFIX, "ffalora": B_SUFFIX}.get(name, A_SUFFIX)
    assert_dropped(name, poison(ADAPTER_RECORD, key, math.inf), r"non-finite values")


def test_fedsb_takes_only_the_full_r_and_fedsa_only_a():
    """Declared per rule: Fed-SB's R is r x r at the global r whatever the capacity; FedSA-LoRA
    uploads A alone, so a B (or a head) is refused."""
    capacity_sized = replace_arrays(ADAPTER_RECORD, m1__sb_R__weight=torch.ones(3, 3))
    assert_dropped("fedsb", capacity_sized, r"shape \(3, 3\), expected \(4, 4\)")
    with_b = replace_arrays(ADAPTER_RECORD, m1__lora_B__weight=torch.ones(6, 3))
    assert_dropped("fedsa", with_b, r"unexpected keys \['m1.lora_B.weight'\]")
    with_head = lambda content: content.__setitem__(
        HEAD_RECORD, ArrayRecord({"head.weight": torch.ones(*HEAD_SHAPE)})
    )
    assert_dropped("fedsa", with_head, r"unexpected record 'head'")
    with_a = replace_arrays(ADAPTER_RECORD, m1__lora_A__weight=torch.ones(3, 5))
    assert_dropped("ffalora", with_a, r"unexpected keys \['m1.lora_A.weight'\]")


def test_a_nan_scale_is_dropped_under_client_level_dp():
    dp = {"client_dp": ClientLevelDP(1.0, 0.0, noise_seed=0)}
    assert_dropped("fedavg", set_config(scale_key("m1"), math.nan), r"scale.m1 = nan", **dp)


def test_fewer_valid_replies_than_min_train_nodes_make_no_update():
    """Two of three replies bad, min_train_nodes 3: no update, the run's state unchanged."""

    def two_bad(content):
        content[CONFIG_RECORD][scale_key("m1")] = math.nan

    generator = torch.Generator().manual_seed(0)
    strategy = strategy_for("fedavg", min_train_nodes=3)
    messages = strategy.configure_train(
        1, initial_arrays("fedavg", generator), ConfigRecord(), QueryGrid()
    )
    before = state_tensors(strategy)
    replies = []
    for message in messages:
        content = honest_content("fedavg", message, generator)
        if message.metadata.dst_node_id != 101:
            two_bad(content)
        replies.append(Message(content, reply_to=message))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["clients"] == 0
    assert sorted(strategy.dropped[1]) == [102, 103]
    assert strategy.state.version == 0
    assert all(torch.equal(t, before[k]) for k, t in state_tensors(strategy).items())


def test_a_reported_version_is_never_used_unless_known():
    """After node BAD restated version 999 in round 1, round 2 still builds its payload from the
    version it last restated validly (0)."""
    strategy, *_ = play_round("fedex", set_config(VERSION_KEY, 999), base_store=None)
    messages = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), QueryGrid())
    bad = next(m for m in messages if m.metadata.dst_node_id == BAD)
    assert strategy.nodes[BAD].version == 0
    assert bad.content[CONFIG_RECORD][FROM_VERSION_KEY] == 0


def test_a_second_reply_from_one_node_is_dropped():
    strategy, replies, (_, metrics) = play_round("fedavg")
    duplicate = next(r for r in replies if r.metadata.src_node_id == BAD)
    _, again = strategy.aggregate_train(1, [duplicate])
    assert metrics["clients"] == 3 and again["clients"] == 0
    assert re.search(r"no train message awaits its reply", strategy.dropped[1][BAD])


# ---- rank queries ---------------------------------------------------------------------------------

QUERY_CASES = {
    "rank 1000": ({rank_key("m1"): 1000, scale_key("m1"): scale(1000)}, r"rank.m1 = 1000 outside"),
    "an honest device above the top rank": (
        {**{rank_key(m): 8 for m in SHAPES}, **{scale_key(m): scale(8) for m in SHAPES}},
        r"rank.m1 = 8 outside \[1, 4\]",
    ),
    "rank 0": ({rank_key("m2"): 0}, r"rank.m2 = 0 outside"),
    "a module the run does not adapt": ({rank_key("m3"): 2}, r"modules \['m1', 'm2', 'm3'\]"),
    "version 999": ({VERSION_KEY: 999}, r"version = 999 outside"),
    "version -1": ({VERSION_KEY: -1}, r"version = -1 outside"),
    "another node's partition": ({PARTITION_ID_KEY: 0}, r"partition id 0, which is node 101's"),
    "no partition id": ({PARTITION_ID_KEY: MISSING}, r"partition-id is missing"),
}


@pytest.mark.parametrize("case", QUERY_CASES)
def test_a_bad_rank_answer_leaves_the_node_out_not_the_run(case):
    bad_facts, reason = QUERY_CASES[case]
    strategy = strategy_for("fedavg")
    generator = torch.Generator().manual_seed(0)
    grid = QueryGrid(bad_facts)
    messages = strategy.configure_train(
        1, initial_arrays("fedavg", generator), ConfigRecord(), grid
    )
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 103]
    assert re.search(reason, strategy.dropped[1][BAD]), strategy.dropped[1][BAD]
    assert BAD not in strategy.nodes


# ---- Fed-SB's initialisation ----------------------------------------------------------------------


class SketchGrid(QueryGrid):
    """Answers rank queries (capacities) and Fed-SB's initialisation query with sketches of
    rank-1 gradients; node BAD's sketch is tampered with."""

    def __init__(self, gradients: dict, tamper) -> None:
        super().__init__(scaled=False)
        self.gradients, self.tamper = gradients, tamper

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            if message.metadata.message_type == "query":
                replies.append(self.answer(message))
                continue
            node = message.metadata.dst_node_id
            request = message.content[CONFIG_RECORD]
            sketches = sketch_gradients(
                self.gradients[node],
                int(request[SB_INIT_RANK_KEY]),
                seed=int(request[SB_INIT_SEED_KEY]),
            )
            tensors = {}
            for m, sketch in sketches.items():
                tensors[m + SKETCH_Y_SUFFIX], tensors[m + SKETCH_Z_SUFFIX] = sketch.Y, sketch.Z
            content = RecordDict(
                {
                    SB_INIT_ACTION: ArrayRecord(tensors),
                    CONFIG_RECORD: ConfigRecord(facts(node, scaled=False)),
                    METRICS_RECORD: MetricRecord({NUM_EXAMPLES_KEY: NODES[node][2]}),
                }
            )
            if node == BAD:
                self.tamper(content)
            replies.append(Message(content, reply_to=message))
        return replies


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (poison(SB_INIT_ACTION, "m1" + SKETCH_Y_SUFFIX, math.nan), r"non-finite.*m1.sketch_Y"),
        (set_metric(NUM_EXAMPLES_KEY, math.nan), r"num-examples = nan is not an integer"),
        (drop_array(SB_INIT_ACTION, "m2" + SKETCH_Z_SUFFIX), r"missing keys \['m2.sketch_Z"),
    ],
    ids=["nan sketch", "nan examples", "missing sketch"],
)
def test_a_bad_gradient_estimate_is_dropped_from_fedsb_start(tamper, reason):
    """The start is the one of the two honest estimates: with rank-1 gradients their mean has
    rank 2 <= r, so the sketched first step is exact, B R_0 A = -eta sum_i p_i G_i."""
    generator = torch.Generator().manual_seed(3)
    gradients = {
        node: {
            m: randn(generator, d_out, 1) @ randn(generator, 1, d_in)
            for m, (d_out, d_in) in SHAPES.items()
        }
        for node in NODES
    }
    placeholders = {}
    for m, (d_out, d_in) in SHAPES.items():
        placeholders[m + SB_A_SUFFIX] = torch.zeros(TOP, d_in)
        placeholders[m + SB_B_SUFFIX] = torch.zeros(d_out, TOP)
    eta = 0.5
    strategy = strategy_for("fedsb", eta=eta)
    grid = SketchGrid(gradients, tamper)
    strategy.configure_train(1, ArrayRecord(placeholders), ConfigRecord(), grid)
    assert re.search(reason, strategy.dropped[1][BAD]), strategy.dropped[1][BAD]
    honest = [node for node in NODES if node != BAD]
    total = sum(NODES[node][2] for node in honest)
    for m in SHAPES:
        expected = -eta * sum(NODES[n][2] / total * gradients[n][m] for n in honest)
        start = strategy.rule.global_delta(strategy.state, m)
        assert torch.allclose(start.U @ start.V, expected, atol=1e-5)


# ---- a whole run ----------------------------------------------------------------------------------


class HostileGrid(QueryGrid):
    """Honest nodes, but node BAD replies to every train message with a NaN scale."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(1)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            if message.metadata.message_type == "query":
                replies.append(self.answer(message))
                continue
            content = honest_content("fedavg", message, self.generator)
            if message.metadata.dst_node_id == BAD:
                content[CONFIG_RECORD][scale_key("m1")] = math.nan
            replies.append(Message(content, reply_to=message))
        return replies


def test_a_run_with_a_hostile_node_completes_and_logs_what_it_dropped(tmp_path):
    generator = torch.Generator().manual_seed(0)
    strategy = strategy_for("fedavg", fraction_evaluate=0.0)
    log = MetricsLog(
        tmp_path / "metrics.jsonl", strategy, lambda rule, state, server_round: None, RunConfig()
    )
    strategy.start(
        HostileGrid(),
        initial_arrays("fedavg", generator),
        num_rounds=2,
        evaluate_fn=log.end_of_round,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["clients"] == 2
        assert re.search(r"scale.m1 = nan", row["dropped"][str(BAD)])
    assert strategy.state.version == 2


# ---- measurements ---------------------------------------------------------------------------------


def test_worst_keeps_nan_wherever_it_is():
    assert math.isnan(worst([math.nan, 1.0])) and math.isnan(worst([1.0, math.nan]))
    assert worst([0.5, 2.0]) == 2.0 and worst([]) == 0.0


def test_a_nan_probe_response_reports_nan():
    expected = {"m": torch.ones(3, PROBE_COUNT, dtype=torch.float64)}
    nan = {"m": torch.full((3, PROBE_COUNT), math.nan, dtype=torch.float64)}
    assert math.isnan(relative_deviation(nan, expected))
    assert relative_deviation(expected, expected) == 0.0


def test_a_nan_global_update_reports_nan():
    ideal = LowRank(torch.ones(3, 1), torch.ones(1, 2))
    broken = LowRank(torch.full((3, 1), math.nan), torch.ones(1, 2))
    result = RoundResult(None, {"m": broken}, {"m": ideal}, {"m": 1.0})
    assert math.isnan(result.relative_deviation())


@pytest.mark.parametrize("nan_first", [True, False])
def test_the_strategy_reports_a_nan_deviation_in_either_order(nan_first):
    strategy, *_ = play_round("fedex")
    evaluation = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), QueryGrid())
    contents = []
    for message in evaluation:
        node = message.metadata.dst_node_id
        expected = strategy._expected_probes
        probes = {m: t.clone() for m, t in expected.items()}
        if node == BAD:
            probes["m1"][0, 0] = math.nan
        content = RecordDict(
            {
                PROBE_RECORD: ArrayRecord(probes),
                CONFIG_RECORD: ConfigRecord(facts(node, version=1)),
                METRICS_RECORD: MetricRecord(
                    {NUM_EXAMPLES_KEY: 10, LOSS_KEY: 1.0, ACCURACY_KEY: 0.5}
                ),
            }
        )
        contents.append(Message(content, reply_to=message))
    contents.sort(key=lambda m: (m.metadata.src_node_id != BAD) == nan_first)
    metrics = strategy.aggregate_evaluate(1, contents)
    assert math.isnan(metrics["relative_deviation"])


def test_an_evaluate_reply_with_a_nan_loss_is_dropped():
    strategy, *_ = play_round("fedavg")
    evaluation = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), QueryGrid())
    replies = []
    for message in evaluation:
        node = message.metadata.dst_node_id
        loss = math.nan if node == BAD else 1.0
        metrics = {NUM_EXAMPLES_KEY: 10, LOSS_KEY: loss, ACCURACY_KEY: 0.5}
        content = RecordDict(
            {
                CONFIG_RECORD: ConfigRecord(facts(node, version=1)),
                METRICS_RECORD: MetricRecord(metrics),
            }
        )
        replies.append(Message(content, reply_to=message))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["loss"] == 1.0 and metrics["num_examples"] == 20
    assert re.search(r"metric 'loss' = nan", strategy.dropped[1][BAD])


def test_an_evaluate_reply_with_a_generation_score_above_one_is_dropped():
    strategy, *_ = play_round("fedavg")
    evaluation = strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), QueryGrid())
    replies = []
    for message in evaluation:
        node = message.metadata.dst_node_id
        metrics = {NUM_EXAMPLES_KEY: 10, LOSS_KEY: 1.0, ACCURACY_KEY: 0.5}
        metrics[GENERATION_KEY] = 7.0 if node == BAD else 0.25
        content = RecordDict(
            {
                CONFIG_RECORD: ConfigRecord(facts(node, version=1)),
                METRICS_RECORD: MetricRecord(metrics),
            }
        )
        replies.append(Message(content, reply_to=message))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics[GENERATION_KEY] == 0.25 and metrics["num_examples"] == 20
    assert re.search(r"metric 'generation' = 7.0 not in \[0, 1\]", strategy.dropped[1][BAD])


# ---- FLoRA's client step --------------------------------------------------------------------------


def test_flora_refuses_to_step_from_an_empty_client_state():
    rule = make_rule("flora")
    initial = {
        m: LoRAFactors(torch.ones(2, d_in), torch.zeros(d_out, 2), 4.0)
        for m, (d_out, d_in) in SHAPES.items()
    }
    state = rule.init_state(initial)
    payload = rule.client_payload(
        state, ClientSpec(dict.fromkeys(SHAPES, 2), dict.fromkeys(SHAPES, 4.0))
    )
    with pytest.raises(InvalidUpdateError, match=r"no adapter for modules \['m1', 'm2'\]"):
        rule.client_step(ClientState(), payload, BaseCache())


# ---- the real ClientApp in this process -----------------------------------------------------------

DEVICE_RUN = {
    **TINY_BERT_RUN,
    "fraction-evaluate": 0.34,
    "min-evaluate-nodes": 1,
    "num-server-rounds": 2,
}


@pytest.mark.parametrize("strategy", ["fedavg", "hetlora", "fedsb"])
def test_a_device_configured_above_the_top_rank_is_left_out_and_the_run_goes_on(strategy, tmp_path):
    """Node FIRST_NODE_ID + 1 sets ``lora-rank`` 16 over a run whose top rank is 4: its rank
    answers are refused (a Fed-SB node refuses the capacity itself: an error reply), it is
    asked again when sampled, the others train both rounds, and every honest reply of the
    real ClientApp passes the checks."""
    config = {**DEVICE_RUN, "strategy": strategy}
    grid = LocalGrid(client_app(config), num_nodes=3)
    device = FIRST_NODE_ID + 1
    grid.contexts[device].node_config["lora-rank"] = 16
    run(grid, {**config, "run-dir": str(tmp_path), "base-changes": "messages"})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["clients"] for row in rows] == [2, 2]
    for row in rows:  # asked again each round: the device may have been reconfigured
        assert list(row["dropped"]) == [str(device)]
        assert re.search(r"16 outside \[?1(, |\.\.)4", row["dropped"][str(device)])
