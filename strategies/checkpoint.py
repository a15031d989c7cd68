"""The server's checkpoint: ``RUN_DIR/checkpoints/round-{t}/`` holds ``tensors.safetensors``
(the rule's global state, the expected probe responses) and ``checkpoint.json`` (a format
version, the round, the strategy's metadata and the metrics rows so far); no pickle. Each is written
into a fresh directory renamed into place, so a checkpoint directory is complete or absent; the
newest `KEEP` are kept.

No global RNG state is saved because the strategy draws from none: node sampling, the probes and
FLoRA's and FlexLoRA's draws are seeded by the run seed and the round, client-level DP's noise by
its secret seed and the round (in the strategy's metadata).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from fedlora.run_records.atomic_files import (
    fresh_directory_beside,
    save_tensors_atomic,
    swap_in_directory,
    write_json_atomic,
)
from strategies.base import LoRAStrategy

CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "tensors.safetensors"
METADATA_FILE = "checkpoint.json"
FORMAT_VERSION = 1
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read."""


@dataclass
class Checkpoint:
    """What `write_checkpoint` wrote after round ``server_round``."""

    server_round: int
    tensors: dict[str, Tensor]
    strategy: dict
    rows: list[dict]

    def restore(self, strategy: LoRAStrategy) -> None:
        """Put the strategy back where it was after the round."""
        strategy.load_state_dict(self.tensors, self.strategy)


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"round-{server_round:05d}"


def write_checkpoint(
    run_dir: Path, server_round: int, strategy: LoRAStrategy, rows: list[dict]
) -> Path:
    """Checkpoint the strategy after ``server_round`` with the metrics rows so far."""
    tensors, metadata = strategy.state_dict()
    directory = checkpoint_dir(run_dir, server_round)
    fresh = fresh_directory_beside(directory)
    save_tensors_atomic(fresh / TENSORS_FILE, tensors)
    write_json_atomic(
        fresh / METADATA_FILE,
        {
            "format": FORMAT_VERSION,
            "round": server_round,
            "strategy": metadata,
            "rows": rows,
        },
    )
    swap_in_directory(fresh, directory)
    for old in checkpoint_rounds(run_dir)[:-KEEP]:
        shutil.rmtree(checkpoint_dir(run_dir, old))
    return directory


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds of the complete checkpoints in ``run_dir``, oldest first."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(int(path.name.removeprefix("round-")) for path in root.glob("round-*"))


def read_checkpoint(run_dir: Path, server_round: int | None = None) -> Checkpoint:
    """The checkpoint of ``server_round`` (default: the newest)."""
    rounds = checkpoint_rounds(run_dir)
    if not rounds:
        raise CheckpointError(f"{run_dir} holds no checkpoint to resume from")
    server_round = rounds[-1] if server_round is None else server_round
    directory = checkpoint_dir(run_dir, server_round)
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
        tensors = load_file(str(directory / TENSORS_FILE))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the checkpoint {directory}: {error}") from error
    if metadata.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {metadata.get('format')!r}, this fedlora reads "
            f"{FORMAT_VERSION}"
        )
    return Checkpoint(
        server_round=int(metadata["round"]),
        tensors=tensors,
        strategy=metadata["strategy"],
        rows=metadata["rows"],
    )
