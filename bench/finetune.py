"""Fine-tuning throughput on real Alpaca rows, length-grouped batches against packed ones, projected to Alpaca-52K x 5.

    python bench/finetune.py                   # writes bench/results/finetune.json

Runs `llama_adapter.train` as `llama-adapter train` does with its defaults (batch 4, max_len 512, 5% held out) over
../shared/data/alpaca/alpaca_small.json (2,000 rows drawn from the Stanford Alpaca 52K; LLAMA_ADAPTER_DATA moves the
data folder), once per batching, each with a fresh adapter on the same base:
  grouped   rows of similar length batched together and padded to the longest (the default)
  packed    --packing: whole rows laid end to end in sequences of up to max_len tokens, nothing padded but the end
            of each sequence; --batch-size counts sequences, so a step carries several times more rows
Reported per batching: tokens/s (non-padding tokens over the training steps' time, validation excluded), tokens per
step, the share of padding positions, peak memory, and the time Alpaca-52K x 5 epochs (the paper's run) would take at
that speed: 52,002 rows x 5 x this data's mean tokens per row / tokens/s. Also what plain random batches would pad.
On a GPU (bf16, the LLaMA-7B-shaped random model by default) it adds MFU; on a CPU the peak memory is the process's
peak resident memory so far.
"""

import argparse
import os
import random
import resource
import tempfile
from pathlib import Path

import torch
from common import (
    ALPACA,
    MODELS,
    REPO,
    RESULTS,
    default_model,
    frozen_training_flops,
    load_base,
    peak_flops,
    write_results,
)

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.base import structure
from llama_adapter.data import encoding, reading
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train
from llama_adapter.train.run_log import read_metrics

ALPACA_ROWS, PAPER_EPOCHS = 52002, 5
BATCHINGS = ("grouped", "packed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=default_model())
    parser.add_argument("--data", default=str(ALPACA), help="Alpaca-format rows (default: the 2,000-row Alpaca sample)")
    parser.add_argument("--rows", type=int, help="only the first this many rows of --data (default: all)")
    parser.add_argument("--batching", nargs="+", choices=BATCHINGS, default=list(BATCHINGS))
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--max-steps", type=int, help="optimizer steps per batching (default: one epoch)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "finetune.json"))
    args = parser.parse_args()

    base, tokenizer = load_base(args.model)
    rows = reading.load_rows(args.data)
    rows = rows.select(range(min(args.rows, len(rows)))) if args.rows else rows
    measured = {}
    for batching in args.batching:
        measured[batching] = measure(args, batching == "packed", base, tokenizer, rows)
        print(f"{batching}: {measured[batching]}", flush=True)
    cfg = recipe(args, packing=False, out=".")
    max_len = cfg.max_length(structure.context_length(base))  # what `train` trains at

    examples, _ = encoding.encode_all(tokenizer, reading.split_rows(rows, cfg.val_fraction, cfg.seed)[0], max_len)
    mean_tokens = sum(examples.lengths) / len(examples)
    scored_share = sum(example.response_tokens for example in examples) / sum(examples.lengths)
    for numbers in measured.values():
        minutes = ALPACA_ROWS * PAPER_EPOCHS * mean_tokens / numbers["tokens_per_s"] / 60
        numbers["alpaca52k_x5_projected_minutes"] = minutes
        if peak_flops():  # each row attends over itself alone, packed or not: the attention FLOPs of its own length
            tokens = numbers["train_tokens"]
            flops = frozen_training_flops(base, tokens, mean_tokens, round(tokens * scored_share))
            numbers["mfu"] = flops / numbers["train_time_s"] / peak_flops()
    results = {
        "model": args.model,
        "data": os.path.relpath(args.data, REPO),
        "rows": len(rows),
        "train_rows": len(examples),
        "mean_tokens_per_row": mean_tokens,
        "recipe": {key: getattr(cfg, key) for key in ("batch_size", "grad_accum", "gradient_checkpointing")}
        | {"max_len": max_len, "max_steps": args.max_steps, "lr": cfg.learning_rate("llama-adapter")},
        "batchings": measured,
        "padding_share_random_batches": random_batch_padding(examples, cfg.batch_size, cfg.seed),
        "alpaca52k_x5_projected_minutes": min(m["alpaca52k_x5_projected_minutes"] for m in measured.values()),
    }
    if len(measured) == 2:
        results["packed_over_grouped"] = measured["packed"]["tokens_per_s"] / measured["grouped"]["tokens_per_s"]
    results["targets"] = {}
    if "grouped" in measured:
        results["targets"]["grouped padding_share < 0.10"] = measured["grouped"]["padding_share"] < 0.10
    if args.model == "llama-7b":
        results["targets"] |= {
            "alpaca52k_x5 under 30 minutes": results["alpaca52k_x5_projected_minutes"] < 30,
            "peak memory under 40 GB": max(m["peak_memory_mib"] for m in measured.values()) < 40e9 / 2**20,
        }
    write_results(results, args.out)


def recipe(args, packing: bool, out: str) -> TrainConfig:
    """The default recipe, for one epoch (or --max-steps), with or without packing."""
    return TrainConfig(
        data=args.data,
        out=out,
        epochs=1,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        packing=packing,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def measure(args, packing: bool, base, tokenizer, rows) -> dict:
    """Train a fresh adapter on `rows`; the numbers of its training steps."""
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig()).to(base.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = recipe(args, packing, run_dir)
            summary = train(cfg, model.config, model, rows=rows)
            last = [row for row in read_metrics(Path(run_dir) / "metrics.csv") if row["train_loss"]][-1]
    finally:
        model.unload()
    tokens, seconds = int(last["tokens"]), float(last["elapsed_s"])  # up to the last step: validation excluded
    return {
        "steps": summary["steps"],
        "train_tokens": tokens,
        "train_time_s": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_step": tokens / summary["steps"],
        "padding_share": summary["padding_share"],
        "val_loss_before": summary["val_loss_before"],
        "val_loss_after": summary["val_loss_after"],
        "peak_memory_mib": peak_memory_mib(),
    }


def random_batch_padding(examples: encoding.Examples, batch_size: int, seed: int) -> float:
    """The share of padding positions if the same examples were batched in plain random order."""
    lengths = list(examples.lengths)
    random.Random(seed).shuffle(lengths)
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return 1 - sum(lengths) / sum(max(b) * len(b) for b in batches)


def peak_memory_mib() -> float:
    """Peak allocated CUDA memory, or on a CPU the process's peak resident memory (Linux reports kB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
