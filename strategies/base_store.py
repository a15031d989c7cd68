"""The server's side of the shared base store: each round's change of the global weights, as
factors (or dense where smaller), in ``{store}/round-{t}.safetensors``."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from fedlora.lowrank import LowRank
from fedlora.messages import base_change_file, change_to_tensors


def write_round_change(store: Path, version: int, change: dict[str, LowRank]) -> int:
    """Write round ``version``'s change atomically (readers never see a partial file); its bytes."""
    store.mkdir(parents=True, exist_ok=True)
    path = Path(base_change_file(str(store), version))
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
