#!/usr/bin/env bash
# Prepare .gpu/, what scripts/gpu_check.sh needs on a GPU machine that reaches no network, so that its slot is spent
# measuring, not installing:
#   .gpu/whl/     wheels of the packages the GPU image lacks (CPython 3.12, x86-64), at the versions .venv has
#   .gpu/cache/   the default model's config and tokenizer, without its weights (the benchmarks' models are random)
#   .gpu/data/    the Alpaca sample the fine-tuning benchmark trains on
# About 50 MB. Run it here, then on the GPU machine, with .gpu carried along: bash scripts/gpu_check.sh
# (which installs the wheels into a folder of its own and reads the cache and the data from .gpu/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BUNDLE=.gpu
DATA="${LLAMA_ADAPTER_DATA:-$PWD/../shared/data}"
# The image has torch, transformers, pyarrow, pandas and the rest of their needs; not these.
PACKAGES=(datasets dill multiprocess bitsandbytes open_clip_torch ftfy wcwidth peft)

rm -rf "$BUNDLE"
mkdir -p "$BUNDLE/whl" "$BUNDLE/cache" "$BUNDLE/data/alpaca"
pins=()
for package in "${PACKAGES[@]}"; do
    pins+=("$package==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")")
done
platforms=()
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d "$BUNDLE/whl" "${pins[@]}"

model=$("$PY" -c "from llama_adapter.base import loading; print(loading.default_base_dir())")
mkdir -p "$BUNDLE/cache/$(basename "$model")"
find "$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$BUNDLE/cache/$(basename "$model")/" \;
cp "$DATA/alpaca/alpaca_small.json" "$BUNDLE/data/alpaca/"
du -sh "$BUNDLE"
