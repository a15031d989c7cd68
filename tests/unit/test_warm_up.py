"""The Ray workers' warm-up: the setup hook that `simulations.ray_start` names is `clients.warm_up`'s
(`tests/e2e/test_ray_start.py` runs it in Ray's workers); a module it cannot import is logged,
not raised (a hook that raises ends Ray's worker)."""

from __future__ import annotations

import logging
import sys

from clients.warm_up import warm_up
from simulations.ray_start import WARM_UP_HOOK


def test_the_hook_named_to_ray_is_the_warm_up():
    module, _, name = WARM_UP_HOOK.rpartition(".")
    assert getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name) is warm_up


def test_a_module_it_cannot_import_is_logged_not_raised(caplog):
    with caplog.at_level(logging.ERROR, logger="clients.warm_up"):
        warm_up("clients.no_such_module")

    assert "could not import clients.no_such_module" in caplog.text
    assert "ModuleNotFoundError" in caplog.text
