#!/usr/bin/env bash
# The whole GPU check of issue 21 in one command, for a short slot on one H100 or H200: about 8 minutes.
#
#   bash scripts/gpu_check.sh                  # on a CUDA GPU: bench/results/gpu_<device>.json and .md
#   bash scripts/gpu_check.sh --out-dir DIR    # the same, written into DIR
#   bash scripts/gpu_check.sh --dry-run        # no GPU needed: the same steps on the tiny model on the CPU, with
#                                              # tiny budgets, into a temporary folder (or --out-dir), in about a minute
#   PYTHON=python3.12 bash scripts/gpu_check.sh    # another interpreter (default: .venv/bin/python, python3, python)
#
# On a GPU machine that reaches no network, first run `bash scripts/gpu_bundle.sh` here and carry the .gpu/ folder it
# makes along: this script then installs its wheels into a folder of its own (on PYTHONPATH), and reads the default
# model's tokenizer and the Alpaca rows from it.
#   --data FILE    the Alpaca rows to fine-tune on (default: alpaca/alpaca_small.json in $LLAMA_ADAPTER_DATA, else
#                  in ../shared/data, as bench/common.py finds them)
#
# Steps, each under `timeout` and all within one budget of STEPS_BUDGET_S seconds, so a slow step leaves less time to
# the ones after it, never more than the whole:
#   pytest         pytest -m cuda tests/test_cuda.py (the file named: collecting every module would need gradio and
#                  Playwright, which a GPU machine may lack), junit XML kept for the counts
#   train_step     bench/train_step.py --profile --compile: floor / ours / PEFT / ours with torch.compile'd layers,
#                  tokens/s, MFU, peak memory, top operators
#   finetune       bench/finetune.py: packed against length-grouped tokens/s on Alpaca rows, the Alpaca-52K x 5
#                  projection
#   generation     bench/generation.py: tokens/s at batch 1 and 8, ours against the base and PEFT
#   quantize       bench/quantize.py: peak memory (and speed) of bf16, int8 and nf4 training
# The benchmarks run on `--model llama-7b` (LLaMA-7B's shape, random bf16 weights made on the GPU). A step that fails
# or runs out of time is recorded with the end of its stderr, and the next one runs; bench/gpu_check.py then combines
# what there is into one results file and a markdown summary, and this script exits 0: a partial result is a result.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
OUT_DIR=
DATA_FILE=
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --out-dir) OUT_DIR=${2:?--out-dir needs a folder}; shift ;;
        --data) DATA_FILE=${2:?--data needs a file}; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
elif command -v python3 >/dev/null; then PY=python3  # on some GPU images the one with torch, where python is not
else PY=python
fi
if ((!DRY_RUN)) && [[ -d .gpu ]]; then  # scripts/gpu_bundle.sh's folder: what this machine lacks
    if compgen -G ".gpu/whl/*.whl" >/dev/null; then
        SITE=$(mktemp -d -t gpu-check-site.XXXXXX)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/whl/*.whl
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export LLAMA_ADAPTER_CACHE=$REPO/.gpu/cache LLAMA_ADAPTER_DATA=$REPO/.gpu/data
fi
DATA_FILE=${DATA_FILE:-${LLAMA_ADAPTER_DATA:-$REPO/../shared/data}/alpaca/alpaca_small.json}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # llama_adapter from this checkout, installed or not
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing here needs the hub: no waiting on a network that isn't there

if [[ ! -f $DATA_FILE ]]; then
    echo "gpu_check.sh: no Alpaca rows at $DATA_FILE: set LLAMA_ADAPTER_DATA to the data folder, or give --data FILE" >&2
    exit 2
fi

STEPS_BUDGET_S=465  # all steps together; with start-up and the combiner, under 8 minutes
if ((DRY_RUN)); then
    export CUDA_VISIBLE_DEVICES="" LLAMA_ADAPTER_TEST_DEVICE=cpu  # the CPU, even where there is a GPU
    export OMP_NUM_THREADS=1  # the steps run side by side (see launch): one thread each, none spinning idle
    DEVICE="dry run (CPU)"
    MODEL=tiny
    TRAIN_STEP=(--batch-size 2 --seq-len 16 --repeats 2 --memory-runs 1)
    FINETUNE=(--rows 40 --max-steps 2)
    GENERATION=(--prompt-len 8 --new-tokens 4 --repeats 2)
    QUANTIZE=(--steps 2 --batch-size 4 --gen-tokens 4)
    OUT_DIR=${OUT_DIR:-$(mktemp -d -t gpu-check-dry-run.XXXXXX)}
else
    if ! DEVICE=$("$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())'); then
        echo "gpu_check.sh: $PY sees no CUDA device; on a machine without one, run it with --dry-run" >&2
        exit 2
    fi
    MODEL=llama-7b
    TRAIN_STEP=(--repeats 5)                   # the default batch: 8 x 256 tokens
    FINETUNE=(--rows 2000 --max-steps 100)     # 100 optimizer steps of each batching, batch 4, max_len 512
    GENERATION=(--new-tokens 64 --repeats 3)   # after 256-token prompts
    QUANTIZE=(--steps 5 --gen-tokens 8)        # batch 8, max_len 256; LLaMA-7B's arithmetic is CPU work, left out
    OUT_DIR=${OUT_DIR:-$REPO/bench/results}
fi
SCRATCH=$(mktemp -d -t gpu-check.XXXXXX)
mkdir -p "$OUT_DIR"
echo "gpu_check.sh: $DEVICE, $MODEL, $PY; step outputs in $SCRATCH" >&2

STARTED=$SECONDS
DEADLINE=$((STARTED + STEPS_BUDGET_S))

# run_step NAME LIMIT_S COMMAND...: COMMAND under `timeout` (LIMIT_S, or what is left of the budget if less), its
# stdout, stderr, exit status and times kept in $SCRATCH for bench/gpu_check.py. Never fails itself.
run_step() {
    local name=$1 limit=$2 rc=0 start
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((limit <= left)) || limit=$left
    printf '%s\n' "$*" >"$SCRATCH/$name.command"
    if ((limit < 10)); then
        printf 'rc=skipped\nlimit_s=%s\n' "$limit" >"$SCRATCH/$name.status"
        echo "== $name: skipped, ${left}s of the budget left" >&2
        return 0
    fi
    echo "== $name (at most ${limit}s): $*" >&2
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$SCRATCH/$name.out" 2>"$SCRATCH/$name.err" || rc=$?
    printf 'rc=%s\nlimit_s=%s\nstart=%s\nend=%s\n' "$rc" "$limit" "$start" "$(date +%s.%N)" >"$SCRATCH/$name.status"
    echo "== $name: exit status $rc" >&2
}

# launch NAME LIMIT_S COMMAND...: run_step, one step after another on a GPU, whose timings must not overlap; in a
# dry run all at once, since there the timings mean nothing and each step spends most of its time importing torch.
launch() {
    if ((DRY_RUN)); then run_step "$@" & else run_step "$@"; fi
}

launch pytest 60 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider --junitxml="$SCRATCH/pytest.xml"
launch train_step 150 "$PY" bench/train_step.py --model "$MODEL" "${TRAIN_STEP[@]}" --profile --compile \
    --out "$SCRATCH/train_step.json"
launch finetune 120 "$PY" bench/finetune.py --model "$MODEL" --data "$DATA_FILE" --batching grouped packed \
    "${FINETUNE[@]}" --out "$SCRATCH/finetune.json"
launch generation 75 "$PY" bench/generation.py --model "$MODEL" --batch-sizes 1 8 "${GENERATION[@]}" \
    --out "$SCRATCH/generation.json"
launch quantize 150 "$PY" bench/quantize.py --model "$MODEL" --data "$DATA_FILE" "${QUANTIZE[@]}" \
    --no-llama-7b-arithmetic --out "$SCRATCH/quantize.json"
wait

COMBINE=(--scratch "$SCRATCH" --out-dir "$OUT_DIR" --device "$DEVICE" --model "$MODEL" --wall-s $((SECONDS - STARTED)))
if ((DRY_RUN)); then COMBINE+=(--dry-run); fi
"$PY" bench/gpu_check.py "${COMBINE[@]}"
