"""A run directory is owned by its run: the manifest and status the ServerApp writes, the export
swapped in whole with the tokenizer and label names, a failed run marked and not exported, and a
new run refused a directory that holds another's (the in-process grid, no Ray)."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from clients.app import client_app
from fedlora.errors import ConfigError
from simulations.recipe_files import RECIPES_DIR
from simulations.run_dir import RunDirTaken, claim_run_dir
from strategies.run_record import (
    FINISHED,
    MANIFEST_FILE,
    PACKAGES,
    read_manifest,
    read_status,
    without_secrets,
)
from strategies.server_app import FLWR_RUNS_DIR, run, run_directory
from tests.support.local_grid import LocalGrid
from tests.support.tiny_runs import TINY_BERT_RUN

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

TINY_RUN = {
    **TINY_BERT_RUN,
    "lora-rank": 2,
    "rank-profile": "",
    "num-server-rounds": 1,
}
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def run_in_process(run_dir, strategy, app=None, **keys):
    config = {**TINY_RUN, "strategy": strategy, **keys}
    grid = LocalGrid(app or client_app(config), num_nodes=2)
    return run(grid, {**config, "run-dir": str(run_dir)}, flower_run_id=77)


def test_a_finished_run_has_its_manifest_status_and_an_export_with_label_names(tmp_path):
    stale = tmp_path / "export" / "model.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's merged model")
    run_in_process(tmp_path, "fedavg")
    assert read_status(tmp_path) == FINISHED
    manifest = read_manifest(tmp_path)
    assert set(manifest["packages"]) == set(PACKAGES)
    assert manifest["packages"]["torch"] and manifest["packages"]["flwr"]
    assert manifest["device"] == "cpu"
    (start,) = manifest["runs"]
    assert start["flower_run_id"] == 77 and start["started"] and start["command"]
    exported = {path.name for path in (tmp_path / "export").iterdir()}
    assert "adapter_model.safetensors" in exported and "model.safetensors" not in exported
    labels = json.loads((tmp_path / "export" / "labels.json").read_text())
    assert labels["id2label"] == {str(i): name for i, name in enumerate(BBC_TOPICS)}
    assert labels["label2id"] == {name: i for i, name in enumerate(BBC_TOPICS)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_merged_export_carries_the_label_names_in_its_config(tmp_path):
    run_in_process(tmp_path, "fedex")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(BBC_TOPICS)}
    assert config["label2id"] == {name: i for i, name in enumerate(BBC_TOPICS)}


def failing_client_app(message, context):
    raise RuntimeError("the node's disk is full")


def test_a_run_without_any_aggregated_update_is_failed_and_not_exported(tmp_path):
    run_in_process(tmp_path, "fedavg", app=failing_client_app)
    assert read_status(tmp_path).startswith("failed: no round aggregated an update")
    assert not (tmp_path / "export").exists()


class BrokenGrid(LocalGrid):
    def send_and_receive(self, messages, timeout=None):
        raise ConnectionError("the SuperLink went away")


def test_a_server_error_marks_the_run_failed_with_its_reason(tmp_path):
    config = {**TINY_RUN, "strategy": "fedavg", "run-dir": str(tmp_path)}
    with pytest.raises(ConnectionError):
        run(BrokenGrid(client_app(config), num_nodes=2), config)
    assert read_status(tmp_path) == "failed: ConnectionError: the SuperLink went away"
    assert not (tmp_path / "export").exists()


def test_a_run_without_run_dir_gets_a_directory_of_its_own():
    assert run_directory("", 12345) == FLWR_RUNS_DIR / "12345"
    assert run_directory("", None).parent == FLWR_RUNS_DIR
    assert run_directory("elsewhere", 12345).name == "elsewhere"


# ---- claiming a run directory ---------------------------------------------------------------------


def test_a_non_empty_run_directory_is_refused_without_overwrite(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text("{}")
    with pytest.raises(RunDirTaken, match=f"{tmp_path}.*--overwrite.*--resume {tmp_path}"):
        claim_run_dir(tmp_path)
    assert issubclass(RunDirTaken, ConfigError)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"stale")
    claim_run_dir(tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_empties_only_a_run_s_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirTaken, match="holds files but no run"):
        claim_run_dir(tmp_path, overwrite=True)
    assert (tmp_path / "thesis.tex").exists()


def test_absent_and_empty_directories_are_claimed(tmp_path):
    claim_run_dir(tmp_path / "new" / "run")
    claim_run_dir(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir()


def test_the_cli_refuses_a_taken_directory_with_status_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["simulate", str(RECIPES_DIR / "tiny.toml"), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path) in error and "--overwrite" in error and "--resume" in error
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_resume_takes_only_a_run_directory_with_a_checkpoint(tmp_path, capsys):
    tiny = str(RECIPES_DIR / "tiny.toml")
    assert main(["simulate", tiny, "--resume", str(tmp_path)]) == 2
    assert "give no recipe" in capsys.readouterr().err
    assert main(["simulate"]) == 2
    assert "--resume RUN_DIR" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text((RECIPES_DIR / "tiny.toml").read_text())
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no checkpoint" in capsys.readouterr().err


def test_the_manifest_keeps_no_runtime_token():
    argv = [
        "flwr-serverapp",
        "--token",
        "c0ffee",
        "--runtime-api-address",
        "127.0.0.1:1",
        "--token=abc",
    ]
    assert without_secrets(argv) == [
        "flwr-serverapp",
        "--token",
        "***",
        "--runtime-api-address",
        "127.0.0.1:1",
        "--token=***",
    ]
