"""Opacus configures the root logger when imported (``logging.basicConfig`` in
``opacus.utils.module_utils``): every record that reaches the root, Flower's included, is then
printed a second time in Opacus' format. `drop_opacus_root_handler` takes that handler off again,
and leaves any other handler of the root alone."""

from __future__ import annotations

import logging

OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


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
