"""Fine-tuning wall time: one epoch over real Alpaca rows with the default recipe, projected to Alpaca-52K x 5.

    python bench/finetune.py                   # writes bench/results/finetune.json

Runs `llama_adapter.train` exactly as `llama-adapter train` does with its defaults (batch 4, max_len 512,
length-grouped batches, 5% held out) for one epoch over ../shared/data/alpaca/alpaca_small.json (2,000 rows
drawn from the Stanford Alpaca 52K; LLAMA_ADAPTER_DATA moves the data folder), and reports tokens/s, the share
of padding positions (and what random batches would have padded, for comparison), peak memory, and the time
52,002 rows x 5 epochs (the paper's run) would take at the measured rows/s. On a GPU (bf16, the LLaMA-7B-shaped
random model by default) it adds MFU; on a CPU the peak memory is the process's peak resident memory.
"""

import argparse
import os
import random
import resource
import tempfile

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

from llama_adapter import AdapterConfig, LlamaAdapterModel, data
from llama_adapter.train import TrainConfig, train

ALPACA_ROWS, PAPER_EPOCHS = 52002, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=default_model())
    parser.add_argument("--data", default=str(ALPACA), help="Alpaca-format rows (default: the 2,000-row Alpaca sample)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "finetune.json"))
    args = parser.parse_args()

    base, tokenizer = load_base(args.model)
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig()).to(base.device)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(
            data=args.data,
            out=run_dir,
            epochs=1,
            batch_size=args.batch_size,
            gradient_checkpointing=args.gradient_checkpointing,
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        summary = train(cfg, model.config, model)
    examples, _ = data.encode_all(
        tokenizer, data.split_rows(data.load_rows(cfg.data), cfg.val_fraction, cfg.seed)[0], cfg.max_len
    )

    rows_per_s = len(examples) / summary["wall_time_s"]
    results = {
        "model": args.model,
        "data": os.path.relpath(args.data, REPO),
        "recipe": {
            key: getattr(cfg, key)
            for key in ("epochs", "batch_size", "grad_accum", "max_len", "gradient_checkpointing")
        }
        | {"lr": cfg.learning_rate(model.config.method)},
        "train_rows": len(examples),
        "steps": summary["steps"],
        "train_tokens": summary["train_tokens"],
        "wall_time_s": summary["wall_time_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "padding_share": summary["padding_share"],
        "padding_share_random_batches": random_batch_padding(examples, cfg.batch_size, cfg.seed),
        "val_loss_before": summary["val_loss_before"],
        "val_loss_after": summary["val_loss_after"],
        "peak_memory_mib": peak_memory_mib(),
        "alpaca52k_x5_projected_hours": ALPACA_ROWS * PAPER_EPOCHS / rows_per_s / 3600,
    }
    if peak_flops():
        lengths = [len(e.input_ids) for e in examples]
        scored = sum(sum(label != data.IGNORE_INDEX for label in e.labels) for e in examples)
        flops = frozen_training_flops(base, sum(lengths), sum(lengths) / len(lengths), scored)
        results["mfu"] = flops / summary["wall_time_s"] / peak_flops()
    results["targets"] = {"padding_share < 0.10": results["padding_share"] < 0.10}
    if args.model == "llama-7b":
        results["targets"] |= {
            "alpaca52k_x5 under 60 minutes": results["alpaca52k_x5_projected_hours"] < 1,
            "peak memory under 40 GB": results["peak_memory_mib"] < 40e9 / 2**20,
        }
    write_results(results, args.out)


def random_batch_padding(examples: data.Examples, batch_size: int, seed: int) -> float:
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
