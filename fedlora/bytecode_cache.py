"""Python bytecode in fedlora's cache on hosts whose installed torch carries none.

Python compiles each module it imports from source unless it finds the module's bytecode
(``.pyc``). pip writes bytecode for what it installs, but an image may ship torch without it and
keep Python from writing it (``PYTHONDONTWRITEBYTECODE=1``, common in containers): then every
process of a run (the command, each Ray worker, each deployed ClientApp's process) compiles torch,
transformers and peft anew, about 11 s of CPU for the ClientApp's imports on a 2-core machine
instead of 4 s. There `use_bytecode_cache` sends the bytecode of the process that calls it, and of
the processes it starts, to ``$FEDLORA_CACHE/bytecode`` (Python's ``PYTHONPYCACHEPREFIX``): the
first process writes it there, nothing is written beside the sources, and later processes read it.
The command line, the ClientApp and the ServerApp call it as their packages load, before torch.
``FEDLORA_BYTECODE_CACHE=off`` leaves Python as it is; so does a ``PYTHONPYCACHEPREFIX`` of the
user's own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from fedlora.cache_folder import cache_root

SWITCH_ENV = "FEDLORA_BYTECODE_CACHE"
PREFIX_ENV = "PYTHONPYCACHEPREFIX"
NO_WRITE_ENV = "PYTHONDONTWRITEBYTECODE"
PROBE_PACKAGE = "torch"
"""The package whose bytecode decides: the largest that every process of a run imports."""


def lacks_bytecode(package: str) -> bool:
    """Whether the installed ``package`` has no bytecode for this Python beside its sources."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return False
    return not Path(importlib.util.cache_from_source(spec.origin)).exists()


def use_bytecode_cache(package: str = PROBE_PACKAGE) -> Path | None:
    """Where ``package`` lacks bytecode, this process and those it starts write and read theirs
    in fedlora's cache; that folder, or None where Python is left as it is (bytecode beside the
    sources, a bytecode folder set already, or ``FEDLORA_BYTECODE_CACHE=off``)."""
    if os.environ.get(SWITCH_ENV) == "off" or sys.pycache_prefix is not None:
        return None
    if not lacks_bytecode(package):
        return None
    folder = cache_root() / "bytecode"
    sys.pycache_prefix = str(folder)
    sys.dont_write_bytecode = False
    os.environ[PREFIX_ENV] = str(folder)
    os.environ.pop(NO_WRITE_ENV, None)
    return folder
