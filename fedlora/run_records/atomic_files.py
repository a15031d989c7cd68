"""Files that are either wholly written or not there: write beside the target, flush to disk,
rename over it (a crash leaves the old file or the new one, never half of one)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` by a synced temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, value: object) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def save_tensors_atomic(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """``tensors`` (and string ``metadata``) as a safetensors file, written atomically (each
    tensor copied to the CPU on its own: safetensors refuses tensors that share memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    copies = {key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()}
    save_file(copies, str(temporary), metadata=dict(metadata) if metadata else None)
    with temporary.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_directory(path.parent)


def fresh_directory_beside(target: Path) -> Path:
    """An empty temporary directory next to ``target`` (same file system, so it can be renamed
    onto it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def swap_in_directory(fresh: Path, target: Path) -> None:
    """Put the complete directory ``fresh`` in place of ``target``, whose old files all go (none
    of them can stay beside the new ones). The old one is renamed aside first, so ``target`` is
    at every moment the old directory, absent, or the new one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(fresh, target)
    sync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old)


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries (the renames in it) to disk, where the system allows it."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
