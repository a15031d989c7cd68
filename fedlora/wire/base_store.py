"""The shared base store of the methods that change the base (FedEx-LoRA, FLoRA): each round's
change of the global weights as factors (or dense where smaller, `fedlora.wire.messages`) in
``{store}/round-{t}.safetensors``, written by the server and read by the clients' workers."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedlora.lora.lowrank import LowRank
from fedlora.lora.versioning import BaseCache
from fedlora.wire.messages import change_from_tensors, change_to_tensors


def base_change_file(store: str | Path, version: int) -> Path:
    """The file of round ``version``'s base change in a store (a directory)."""
    return Path(store) / f"round-{version}.safetensors"


def write_round_change(store: Path, version: int, change: dict[str, LowRank]) -> int:
    """Write round ``version``'s change atomically (readers never see a partial file); its bytes."""
    store.mkdir(parents=True, exist_ok=True)
    path = base_change_file(store, version)
    partial = path.with_suffix(".partial")
    tensors = {key: t.contiguous() for key, t in change_to_tensors(change).items()}
    save_file(tensors, str(partial))
    os.replace(partial, path)
    return path.stat().st_size


def discard_changes_after(store: Path, version: int) -> None:
    """Remove the changes of rounds after ``version`` (a resumed run writes them again)."""
    for path in store.glob("round-*.safetensors"):
        if int(path.stem.removeprefix("round-")) > version:
            path.unlink()


def catch_up_from_store(cache: BaseCache, store: str, version: int) -> None:
    """Add the changes of rounds cache.version+1..version to a worker's drifted base, one file
    per round, read onto the cache's device. A cache ahead of ``version`` held rounds that a
    resumed run discarded and writes again: it is rebuilt from the store's files."""
    if cache.version > version:
        cache.version, cache.shift = 0, {}
    for round_version in range(cache.version + 1, version + 1):
        path = base_change_file(store, round_version)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the base store must be readable by every client (set the "
                "ServerApp's base-changes = 'messages' when it is not)"
            )
        device = "cpu" if cache.device is None else str(cache.device)
        tensors = load_file(str(path), device=device)  # factors multiplied where the cache is
        cache.catch_up(change_from_tensors(tensors), round_version - 1, round_version)
