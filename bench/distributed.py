"""One process against two (DDP, and FSDP sharding the base): same adapter? how fast? how much memory each?

    python bench/distributed.py                # writes bench/results/distributed.json

Trains a base (`--model`, see bench/common.py: the embedded SmolLM2-135M-Instruct by default on a CPU) on real
Alpaca rows (the first --rows of ../shared/data/alpaca/alpaca_small.json) for --steps optimizer steps three times,
each a fresh `llama-adapter train` command: in one process, with `--nproc 2` (torchrun, DDP), and with
`--nproc 2 --fsdp`. It reports each run's training throughput (non-padding tokens/s over the whole loop,
validations included), the peak resident memory of its largest process, the memory each process holds for the
model's weights (its shards with FSDP), and how far the two-process adapters and per-step losses are from the
one-process run's. The one-process run uses every core; each of two processes gets half (torchrun's default of
one thread each on two cores). On a machine with GPUs the same command runs one process per GPU (NCCL) instead.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import ALPACA, MODELS, REPO, RESULTS, default_model, load_base, write_results
from safetensors.torch import load_file

from llama_adapter import DEFAULT_BASE
from llama_adapter.train.run_log import read_metrics

RUNS = {"one process": [], "two processes, DDP": ["--nproc", "2"], "two processes, FSDP": ["--nproc", "2", "--fsdp"]}
# Runs the command and prints the peak resident memory (KiB) of the largest process it started.
MEASURE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ALPACA), help="Alpaca-format rows (default: the 2,000-row Alpaca sample)")
    parser.add_argument("--rows", type=int, default=200, help="how many of them to use (5%% held out)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass, all processes together")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--model", choices=MODELS, default=default_model())
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp, "rows.json")
        rows.write_text(json.dumps(json.loads(Path(args.data).read_text())[: args.rows]))
        flags = ["--base", base_folder(args.model, Path(tmp)), "--data", str(rows), "--max-steps", str(args.steps)]
        flags += ["--epochs", "1"]
        flags += ["--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--lr", "2e-3"]
        runs = {name: run(flags + extra, Path(tmp, f"run{i}")) for i, (name, extra) in enumerate(RUNS.items())}

    reference = runs["one process"]
    results = {"model": args.model, "data": os.path.relpath(args.data, REPO), "rows": args.rows, "steps": args.steps}
    results["batch_size"], results["max_len"], results["runs"] = args.batch_size, args.max_len, {}
    for name, outcome in runs.items():
        measured = ("tokens_per_s", "peak_rss_mib", "weights_mib_per_process", "val_loss_after", "wall_time_s")
        entry = {key: outcome[key] for key in measured}
        if outcome is not reference:
            entry["max_abs_adapter_difference"] = max(
                float((outcome["adapter"][key] - reference["adapter"][key]).abs().max()) for key in reference["adapter"]
            )
            entry["max_abs_step_loss_difference"] = max(
                abs(a - b) for a, b in zip(outcome["losses"], reference["losses"], strict=True)
            )
            entry["throughput_vs_one_process"] = outcome["tokens_per_s"] / reference["tokens_per_s"]
            entry["peak_rss_vs_one_process"] = outcome["peak_rss_mib"] / reference["peak_rss_mib"]
        results["runs"][name] = entry
    write_results(results, args.out)


def base_folder(model: str, tmp: Path) -> str:
    """What --base the commands get: the embedded model's name, or a random model saved as a folder."""
    if model == "smollm2":
        return DEFAULT_BASE
    base, tokenizer = load_base(model)
    base.save_pretrained(tmp / model)
    tokenizer.save_pretrained(tmp / model)
    return str(tmp / model)


def run(flags: list[str], out: Path) -> dict:
    """Train into `out`; the summary, the per-step losses, the adapter and the peak memory of the largest process."""
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "llama_adapter.cli", "train", *flags]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    losses = [float(row["train_loss"]) for row in read_metrics(out / "metrics.csv") if row["train_loss"]]
    return summary | {
        "losses": losses,
        "adapter": {key: value.to(torch.float64) for key, value in load_file(out / "adapter.safetensors").items()},
        "peak_rss_mib": int(done.stderr.strip().splitlines()[-1]) / 1024,
        "tokens_per_s": summary["tokens_per_s"],
    }


if __name__ == "__main__":
    main()
