"""fedlora's cache folder (``$FEDLORA_CACHE``, default ``~/.cache/fedlora``): the models built or
converted once (`fedlora.models.model_cache`) and the Python bytecode of hosts that ship none
(`fedlora.bytecode_cache`)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FEDLORA_CACHE"
DEFAULT_CACHE = "~/.cache/fedlora"


def cache_root() -> Path:
    """fedlora's cache folder: ``$FEDLORA_CACHE`` if set, else ``~/.cache/fedlora``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
