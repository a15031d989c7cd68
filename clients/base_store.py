"""The client's side of the shared base store: a worker's drifted base caught up from the
per-round changes the server writes (``{store}/round-{t}.safetensors``)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from fedlora.messages import base_change_file, change_from_tensors
from fedlora.versioning import BaseCache


def catch_up_from_store(cache: BaseCache, store: str, version: int) -> None:
    """Add the changes of rounds cache.version+1..version, one file per round. A cache ahead of
    ``version`` held rounds that a resumed run discarded and writes again: it is rebuilt from
    the store's files."""
    if cache.version > version:
        cache.version, cache.shift = 0, {}
    for round_version in range(cache.version + 1, version + 1):
        path = Path(base_change_file(store, round_version))
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the base store must be readable by every client (set the "
                "ServerApp's base-changes = 'messages' when it is not)"
            )
        cache.catch_up(change_from_tensors(load_file(str(path))), round_version - 1, round_version)
