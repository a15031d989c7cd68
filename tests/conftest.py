"""Fixtures shared by the unit, integration and end-to-end tests."""

from __future__ import annotations

import json

import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests.support.models import torch_threads


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """Flower sends no usage telemetry from a test."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built in this process need a task identity (run, task and node ids)."""
    for attribute in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models only lose from threads on shared cores."""
    with torch_threads(1):
        yield


@pytest.fixture
def words_spec(tmp_path):
    """120 short labelled texts: the label is which of four topic words the text holds."""
    topics = ["football", "election", "guitar", "software"]
    rows = [{"text": f"news {i} about {topics[i % 4]} today", "label": i % 4} for i in range(120)]
    path = tmp_path / "words.json"
    path.write_text(json.dumps(rows))
    return f"json:{path}"
