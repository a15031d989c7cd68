"""Fixtures shared by the unit, integration and end-to-end tests."""

from __future__ import annotations

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
