#!/usr/bin/env bash
# Unit tests against another transformers release in the range pyproject.toml allows (default: the oldest, 5.0.0).
# Needs .venv from setup.sh: the new venv sees its packages and installs only transformers (and what it needs) on top.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-5.0.0}"
venv=".venv-transformers-$version"
python3 -m venv "$venv"
site() { "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
site .venv > "$(site "$venv")/llama_adapter_base.pth"
"$venv/bin/python" -m pip install --quiet "transformers==$version"
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider
