"""Opacus, imported on first use and without the root handler it configures.

Only runs with DP use Opacus: `opacus_module` imports one of its modules when a DP function first
needs it, so that the apps' processes of other runs never load it (about 0.7 s to import; 0.3 s
where flwr-datasets has already loaded the SciPy statistics both need).

Opacus configures the root logger when imported (``logging.basicConfig`` in
``opacus.utils.module_utils``): every record that reaches the root, Flower's included, is then
printed a second time in Opacus' format. `drop_opacus_root_handler` takes that handler off again,
and leaves any other handler of the root alone."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def opacus_module(name: str) -> ModuleType:
    """Opacus' module ``name`` (``"opacus.accountants"``, ...), its root handler dropped."""
    module = importlib.import_module(name)
    drop_opacus_root_handler()
    return module


def drop_opacus_root_handler() -> None:
    """Remove the root's stream handlers in Opacus' format (call after importing Opacus)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if (
            isinstance(handler, logging.StreamHandler)
            and formatter
            and formatter._fmt == OPACUS_FORMAT
        ):
            root.removeHandler(handler)
