"""The adapter family side by side: each method trained with the same budget on LLM-Adapters' math_data.json.

    python bench/methods.py                    # writes bench/results/methods.json and prints the Markdown table

For each `--method` in turn, on a fresh copy of the base: train `--steps` optimizer steps of `--batch-size` rows
of math_data.json (3,260 rows with rationales, 2% held out), then measure trainable parameters, checkpoint size,
training tokens/s, greedy generation tokens/s (batch 1, exactly `--gen-tokens` new tokens, as a ratio to the
base model alone measured in the same run; LoRA folded into the base, as `chat`, `eval` and `demo` serve it),
the response loss on `--alpaca-rows` real Alpaca rows (the base model's own loss is the first row), and accuracy
on the six math test sets (the first `--math-limit` questions of each; `--math-limit 0` for all 4,076).
Each method's learning rate is LLM-Adapters' (3e-4 for LoRA and the bottleneck adapters), LLaMA-Adapter's
(9e-3) and 3e-2 for prefix tuning's few parameters; `--lr METHOD=VALUE` changes one.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import MODELS, REPO, RESULTS, load_base, synchronize, write_results

from llama_adapter import AdapterConfig, LlamaAdapterModel, data, llm_adapters
from llama_adapter.config import METHOD_FIELDS
from llama_adapter.evaluation import evaluate_math
from llama_adapter.train import TrainConfig, evaluate, train

SHARED = Path(os.environ.get("LLAMA_ADAPTER_DATA", REPO.parent / "shared" / "data"))
LEARNING_RATES = {"llama-adapter": 9e-3, "lora": 3e-4, "series": 3e-4, "parallel": 3e-4, "prefix": 3e-2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_FIELDS), default=list(METHOD_FIELDS))
    parser.add_argument("--data", default=str(SHARED / "llm-adapters"), help="LLM-Adapters folder")
    parser.add_argument("--alpaca", default=str(SHARED / "alpaca" / "alpaca_small.json"))
    parser.add_argument("--alpaca-rows", type=int, default=200, help="Alpaca rows the validation loss is over")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method (the same budget)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--lr", nargs="*", default=[], metavar="METHOD=VALUE")
    parser.add_argument("--math-limit", type=int, default=100, help="questions per math test set; 0 = all")
    parser.add_argument("--math-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="math answers' length limit")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(RESULTS / "methods.json"))
    args = parser.parse_args()
    rates = LEARNING_RATES | {m: float(v) for m, v in (item.split("=", 1) for item in args.lr)}

    questions = llm_adapters.load_questions(args.data, llm_adapters.MATH_DATASETS, args.math_limit or None)
    base, tokenizer = load_base(args.model)
    alpaca, _ = data.encode_all(tokenizer, data.load_rows(args.alpaca)[: args.alpaca_rows], args.max_len)
    plain = LlamaAdapterModel(base, tokenizer, AdapterConfig())  # zero gates: the base model itself
    rows = [
        {
            "method": "base model",
            "alpaca_val_loss": round(evaluate(plain, alpaca, args.batch_size, tokenizer.pad_token_id), 4),
            "generation_tokens_per_s": round(generation_speed(plain, args.gen_tokens), 1),
        }
    ]
    rows[0] |= math_accuracy(plain, questions, args)
    base_speed = rows[0]["generation_tokens_per_s"]
    if torch.cuda.is_available():  # so that the first method's tokens/s does not pay for CUDA's warm-up
        with tempfile.TemporaryDirectory() as run:
            train(training_config(args, run, 5, LEARNING_RATES["llama-adapter"]), plain.config, plain)
    del plain, base
    for method in args.methods:
        base, _ = load_base(args.model)  # LoRA and prefix tuning change their base: each method gets a fresh one
        model = LlamaAdapterModel(base, tokenizer, AdapterConfig(method=method)).to(base.device)
        with tempfile.TemporaryDirectory() as run:
            summary = train(training_config(args, run, args.steps, rates[method]), model.config, model)
            checkpoint_kib = (Path(run) / "adapter.safetensors").stat().st_size / 1024
        if method == "lora":
            model.method.merge()
        speed = generation_speed(model, args.gen_tokens)
        rows.append(
            {
                "method": method,
                "lr": rates[method],
                "trainable_parameters": model.num_trainable_parameters(),
                "checkpoint_kib": round(checkpoint_kib, 1),
                "train_tokens_per_s": round(summary["tokens_per_s"], 1),
                "generation_tokens_per_s": round(speed, 1),
                "generation_vs_base": round(speed / base_speed, 3),
                "math_val_loss": [round(summary["val_loss_before"], 4), round(summary["val_loss_after"], 4)],
                "alpaca_val_loss": round(evaluate(model, alpaca, args.batch_size, tokenizer.pad_token_id), 4),
            }
            | math_accuracy(model, questions, args)
        )
        print(format_table(rows), flush=True)
        del model, base
    results = {
        "model": args.model,
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len},
        "math_questions_per_set": args.math_limit or "all",
        "rows": rows,
        "table": format_table(rows),
    }
    write_results(results, args.out)


def training_config(args, out: str, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(
        data=str(Path(args.data) / "math_data.json"),
        out=out,
        epochs=100,
        max_steps=steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=lr,
        val_fraction=0.02,
        save_every=10**9,
        on_bad_row="skip",  # math_data.json has three rows with an empty output
    )


@torch.no_grad()
def generation_speed(model: LlamaAdapterModel, new_tokens: int) -> float:
    """Greedy tokens/s at batch 1 after a short prompt, exactly `new_tokens` of them (no early stop)."""
    encoded = model.tokenizer(data.format_prompt("Explain what a prime number is."), return_tensors="pt")
    ids, mask = encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device)
    settings = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    best = float("inf")
    with model.images(None):
        for run in range(3):  # the first run warms up (CUDA kernels, caches); the best of the other two counts
            synchronize()
            start = time.perf_counter()
            inputs = model.method.generation_inputs(ids, mask)  # fresh: generate fills a prefix's cache in place
            model.base.generate(**inputs, **settings, pad_token_id=model.tokenizer.pad_token_id)
            synchronize()
            best = min(best, time.perf_counter() - start) if run else best
    return new_tokens / best


def math_accuracy(model: LlamaAdapterModel, questions: list, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        scores = evaluate_math(
            model,
            questions,
            Path(folder) / "math.jsonl",
            llm_adapters.MATH_DATASETS,
            args.math_batch_size,
            args.max_new_tokens,
        )
    return {"math_accuracy": {name: round(value, 1) for name, value in scores["accuracy"].items()}}


def format_table(rows: list[dict]) -> str:
    sets = [*llm_adapters.MATH_DATASETS, "Avg"]
    head = ["method", "trainable params", "checkpoint", "train tok/s", "gen tok/s (vs base)", "Alpaca val loss", *sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        speed = f"{row['generation_tokens_per_s']}" + (
            f" ({row['generation_vs_base']}×)" if "generation_vs_base" in row else ""
        )
        cells = [
            row["method"],
            f"{row['trainable_parameters']:,}" if "trainable_parameters" in row else "0",
            f"{row['checkpoint_kib']:,.0f} KiB" if "checkpoint_kib" in row else "–",
            f"{row['train_tokens_per_s']}" if "train_tokens_per_s" in row else "–",
            speed,
            f"{row['alpaca_val_loss']:.3f}",
            *(f"{row['math_accuracy'].get(name, 0):.1f}" for name in sets),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
