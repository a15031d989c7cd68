"""`fedlora bench aggregate` through the CLI entry point: the JSON schema and the figures' sense."""

import json

import pytest

from cli.main import main
from fedlora.bench.aggregate import implemented_methods

KEYS = {
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
    "exact": bool,
}
EXACT_RULES = {"fedex", "flora", "fedsb", "ffalora"}
NO_DENSE_BASELINE = {"fedsa", "fedsb", "ffalora"}
QUICK_MODULES, QUICK_HIDDEN, QUICK_RANK = 16, 256, 8


def bench(tmp_path, *options) -> list[dict]:
    out = tmp_path / "bench.json"
    assert main(["bench", "aggregate", "--device", "cpu", "--json", str(out), *options]) == 0
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return bench(tmp_path_factory.mktemp("quick"), "--quick")


def test_quick_reports_every_implemented_rule_at_both_client_counts(quick):
    measured = {(row["method"], row["clients"]) for row in quick}
    assert measured == {(m, k) for m in implemented_methods() for k in (4, 10)}
    for row in quick:
        for key, kind in KEYS.items():
            assert isinstance(row[key], kind), (row["method"], key, row[key])
        assert row["seconds"] > 0
        assert row["modules_timed"] == row["modules_total"] == QUICK_MODULES
        assert not row["scaled"]


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
