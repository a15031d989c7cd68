"""`fedlora bench aggregate` through the CLI entry point: the JSON schema and the figures' sense."""

import json
import math
from dataclasses import replace

import pytest
import torch

from cli.main import main
from fedlora.bench.aggregate import (
    QUICK,
    UPDATE_KINDS,
    build_workload,
    client_plan,
    client_updates,
    implemented_methods,
)
from fedlora.lora.adapter import LoRAFactors
from fedlora.rules import make_rule

KEYS = {
    "name": str,
    "method": str,
    "clients": int,
    "seconds": float,
    "relative_error": (float, type(None)),
    "bytes_up_per_client": int,
    "bytes_down_per_client": int,
    "naive_seconds": (float, type(None)),
    "modules_timed": int,
    "modules_total": int,
    "scaled": bool,
    "module_sample": str,
    "client_classes": list,
    "exact": bool,
}
EXACT_RULES = {"fedex", "flora", "fedsb", "ffalora"}
NO_DENSE_BASELINE = {"fedsa", "fedsb", "ffalora"}
QUICK_MODULES, QUICK_HIDDEN, QUICK_RANK = 16, 256, 8
QUICK_LAYERS = 4
LEGEND_CLASSES = (2, 4, 8)
"""ceil(r/4), ceil(r/2), r at the quick preset's r = 8."""


def legend_layer_ranks(capacity: int, layers: int, top_rank: int) -> dict[int, int]:
    """LEGEND's rank per adapted layer, written out: the top d = ceil(L c / r) layers, the k-th
    from the top at ceil(c (d - k) / d)."""
    depth = math.ceil(layers * capacity / top_rank)
    return {layers - 1 - k: math.ceil(capacity * (depth - k) / depth) for k in range(depth)}


def bench(tmp_path, *options) -> list[dict]:
    out = tmp_path / "bench.json"
    assert main(["bench", "aggregate", "--device", "cpu", "--json", str(out), *options]) == 0
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return bench(tmp_path_factory.mktemp("quick"), "--quick", "--repeats", "1")


def test_quick_reports_every_implemented_rule_at_both_client_counts(quick):
    measured = {(row["method"], row["clients"]) for row in quick}
    assert measured == {(m, k) for m in implemented_methods() for k in (4, 10)}
    for row in quick:
        for key, kind in KEYS.items():
            assert isinstance(row[key], kind), (row["method"], key, row[key])
        assert row["seconds"] > 0
        assert row["modules_timed"] == row["modules_total"] == QUICK_MODULES
        assert not row["scaled"]


def test_rows_are_named_by_their_rule_and_flexlora_by_its_svd_path(quick):
    """At the quick preset FlexLoRA's stack (clients x r 8, at most 80) is below 4 (8 + 32):
    its default, "auto", takes the exact SVD."""
    for row in quick:
        expected = "flexlora (auto: exact)" if row["method"] == "flexlora" else row["method"]
        assert row["name"] == expected


def test_flexlora_rows_for_each_svd_path(tmp_path):
    """One row per path asked for; at 24 clients (stack 192 > 160) "auto" takes the randomized
    path, at 4 the exact one, and its figures are that path's."""
    rows = bench(
        tmp_path,
        "--quick",
        "--methods",
        "flexlora",
        "--clients",
        "4,24",
        "--repeats",
        "1",
        "--flexlora-svd",
        "auto,exact,randomized",
    )
    assert [(row["name"], row["clients"]) for row in rows] == [
        ("flexlora (auto: exact)", 4),
        ("flexlora (exact)", 4),
        ("flexlora (randomized)", 4),
        ("flexlora (auto: randomized)", 24),
        ("flexlora (exact)", 24),
        ("flexlora (randomized)", 24),
    ]
    assert {row["method"] for row in rows} == {"flexlora"}
    errors = {(row["name"], row["clients"]): row["relative_error"] for row in rows}
    assert errors["flexlora (auto: exact)", 4] == errors["flexlora (exact)", 4]
    assert errors["flexlora (auto: randomized)", 24] == errors["flexlora (randomized)", 24]
    assert errors["flexlora (exact)", 24] <= errors["flexlora (randomized)", 24]


def test_exact_rules_match_the_ideal_update_and_fedavg_does_not(quick):
    for row in quick:
        if row["method"] in EXACT_RULES:
            assert row["exact"] and row["relative_error"] < 1e-5, row
        if row["method"] == "fedavg":
            assert row["relative_error"] > 1e-3
        if row["method"] == "fedsa":
            assert row["relative_error"] is None


def test_naive_baseline_only_where_a_dense_sum_applies(quick):
    for row in quick:
        if row["method"] in NO_DENSE_BASELINE:
            assert row["naive_seconds"] is None and row["speedup_vs_naive"] is None
        else:
            assert row["naive_seconds"] > 0 and row["gemm_seconds"] > 0
            assert row["speedup_vs_naive"] == pytest.approx(row["naive_seconds"] / row["seconds"])


def test_bytes_are_the_tensors_on_the_wire(quick):
    """FedAvg: r (d_in + d_out) floats each way per module; FedSA: r d_in; FFA-LoRA: r d_out up;
    FedEx: more down."""
    lora_floats = QUICK_MODULES * QUICK_RANK * 2 * QUICK_HIDDEN
    rows = {(row["method"], row["clients"]): row for row in quick}
    for clients in (4, 10):
        fedavg, fedsa, fedex = (rows[m, clients] for m in ("fedavg", "fedsa", "fedex"))
        assert fedavg["bytes_up_per_client"] == fedavg["bytes_down_per_client"] == 4 * lora_floats
        assert fedsa["bytes_up_per_client"] == fedsa["bytes_down_per_client"] == 2 * lora_floats
        assert fedex["bytes_down_per_client"] > fedavg["bytes_down_per_client"]
        assert rows["ffalora", clients]["bytes_up_per_client"] == 2 * lora_floats
    for row in quick:
        assert row["bytes_up_per_client"] > 0 and row["bytes_down_per_client"] > 0


def test_legend_is_measured_on_its_own_subset_workload(quick):
    """Its largest client (class r) sends and receives A and B of every module at LEGEND's ranks:
    4 projections x (8 + 6 + 4 + 2) over the layers, below FedAvg's 4 x 4 x 8."""
    largest = legend_layer_ranks(QUICK_RANK, QUICK_LAYERS, QUICK_RANK)
    assert largest == {3: 8, 2: 6, 1: 4, 0: 2}
    legend_bytes = 4 * 4 * sum(largest.values()) * 2 * QUICK_HIDDEN
    rows = {(row["method"], row["clients"]): row for row in quick}
    for clients in (4, 10):
        legend, fedavg = rows["legend", clients], rows["fedavg", clients]
        assert legend["bytes_up_per_client"] == legend["bytes_down_per_client"] == legend_bytes
        assert fedavg["bytes_up_per_client"] == 4 * QUICK_MODULES * QUICK_RANK * 2 * QUICK_HIDDEN
        assert legend["client_classes"] == list(LEGEND_CLASSES)
        assert legend["module_sample"] == fedavg["module_sample"] == "all"
        assert fedavg["client_classes"] == [QUICK_RANK]
        assert legend["relative_error"] != fedavg["relative_error"]
        assert legend["naive_seconds"] > 0


def test_every_legend_client_trains_exactly_the_layers_of_its_class():
    config = replace(QUICK, clients=(7,))
    plan = client_plan(make_rule("legend"), config, 7)
    updates = client_updates(build_workload(config, 7, plan), UPDATE_KINDS[LoRAFactors])
    for client, update in enumerate(updates):
        capacity = LEGEND_CLASSES[client % 3]
        expected = {
            f"model.layers.{layer}.self_attn.{projection}": rank
            for layer, rank in legend_layer_ranks(capacity, QUICK_LAYERS, QUICK_RANK).items()
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        trained = {module: factors.rank for module, factors in update.modules.items()}
        assert trained == expected
        for module, factors in update.modules.items():
            assert factors.A.shape == (expected[module], QUICK_HIDDEN)
            assert factors.scale == pytest.approx(2 * QUICK_RANK / expected[module])


def test_legend_samples_modules_over_the_depth_and_the_others_the_first_ones():
    config = replace(QUICK, layers=8, sample_modules=2, client_ranks=(4,))
    legend = client_plan(make_rule("legend"), config, 3)
    fedavg = client_plan(make_rule("fedavg"), config, 3)
    assert legend.sample == "spread" and fedavg.sample == "first"
    assert legend.modules == ["model.layers.3.self_attn.o_proj", "model.layers.7.self_attn.o_proj"]
    assert fedavg.modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    # class 4 of r 8 over 8 layers: depth 4, layers 7..4 at ranks 4, 3, 2, 1
    assert legend.ranks == [{"model.layers.7.self_attn.o_proj": 4}] * 3
    assert fedavg.ranks == [dict.fromkeys(fedavg.modules, 4)] * 3


def test_a_module_sample_is_scaled_to_all_modules(tmp_path):
    rows = bench(
        tmp_path, "--quick", "--methods", "fedavg,fedsa", "--clients", "3", "--sample-modules", "2"
    )
    assert [row["method"] for row in rows] == ["fedavg", "fedsa"]
    for row in rows:
        assert row["scaled"] and row["modules_timed"] == 2 and row["modules_total"] == QUICK_MODULES
    assert rows[0]["bytes_up_per_client"] == 4 * QUICK_MODULES * QUICK_RANK * 2 * QUICK_HIDDEN


def test_bad_options_are_refused_with_exit_status_2(tmp_path, capsys):
    assert main(["bench", "aggregate", "--quick", "--rank", "8", "--ranks", "4,16"]) == 2
    assert "client ranks" in capsys.readouterr().err
    assert main(["bench", "aggregate", "--quick", "--methods", "nosuchrule"]) == 2
    assert main(["bench", "aggregate", "--quick", "--device", "gpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert main(["bench", "aggregate", "--quick", "--flexlora-svd", "auto,qr"]) == 2
    assert "FlexLoRA SVD paths ['qr']" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_rule_aggregates_and_measures_its_deviation_on_cuda(tmp_path):
    """The server's state on the GPU: the reconstruction's pure clients are built there too."""
    out = tmp_path / "bench.json"
    assert main(["bench", "aggregate", "--quick", "--device", "cuda", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {row["method"] for row in rows} == set(implemented_methods())
    for row in rows:
        assert row["relative_error"] is None or math.isfinite(row["relative_error"]), row
