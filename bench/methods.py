"""The adapter methods side by side: each trained with the same budget on LLM-Adapters' data, then evaluated.

    python bench/methods.py                     # math: writes bench/results/methods.json, prints the table
    python bench/methods.py --task commonsense  # commonsense: bench/results/methods_commonsense.json

For each `--methods` entry in turn, on a fresh copy of the base: train `--steps` optimizer steps of `--batch-size`
rows (2% held out) of the task's training data -- math: math_data.json, 3,260 rows with rationales;
commonsense: the train.json of ARC-Easy, ARC-Challenge, BoolQ and OpenBookQA, 17,754 rows, four of the eight sets
LLM-Adapters' commonsense_170k is built from (the rest are not in the data folder) -- then measure trainable
parameters, checkpoint size, training tokens/s, greedy generation tokens/s (batch 1, exactly `--gen-tokens` new
tokens, as a ratio to the base model alone measured in the same run; LoRA folded into the base, as `chat`, `eval`
and `demo` serve it), the response loss on `--alpaca-rows` real Alpaca rows (the base model's own loss is the
first row), and accuracy on the task's test sets (the first `--limit` questions of each; `--limit 0` for all).
Learning rates: each method's default (llama_adapter/methods/: LLM-Adapters' 3e-4 for LoRA, DyLoRA and the
bottleneck adapters, 3e-3 for AdaLoRA, whose update B diag(E) A starts from E = 0 and small A and B, so it moves ~10x
slower per unit of learning rate, and for prefix tuning's MLP, and 3e-2 for the virtual tokens' few parameters), but
LLaMA-Adapter's paper base rate 9e-3 unscaled, as its rows were measured; `--lr METHOD=VALUE` changes one.
"""

import argparse
import tempfile
from pathlib import Path

import datasets
import torch
from common import ALPACA, DATA, MODELS, RESULTS, generation_speed, load_base, write_results

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.data import batching, encoding, reading
from llama_adapter.evaluation import llm_adapters
from llama_adapter.evaluation.predict import evaluate_questions
from llama_adapter.methods import REGISTRY
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import evaluate, train

# task: (training files in the LLM-Adapters folder, test sets, answer length limit)
TASKS = {
    "math": (["math_data.json"], llm_adapters.MATH_DATASETS, 256),
    "commonsense": (
        [f"{name}/train.json" for name in ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")],
        llm_adapters.COMMONSENSE_DATASETS,
        32,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--task", choices=list(TASKS), default="math")
    parser.add_argument("--methods", nargs="+", choices=list(REGISTRY), default=list(REGISTRY))
    parser.add_argument("--data", default=str(DATA / "llm-adapters"), help="LLM-Adapters folder")
    parser.add_argument("--alpaca", default=str(ALPACA))
    parser.add_argument("--alpaca-rows", type=int, default=200, help="Alpaca rows the validation loss is over")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method (the same budget)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--lr", nargs="*", default=["llama-adapter=9e-3"], metavar="METHOD=VALUE")
    parser.add_argument("--limit", type=int, default=100, help="questions per test set; 0 = all")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, help="answers' length limit (default: 256 math, 32 commonsense)")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--out", help="default: bench/results/methods.json (math), methods_<task>.json (others)")
    args = parser.parse_args()
    rates = {name: method.learning_rate(args.batch_size) for name, method in REGISTRY.items()}
    rates |= {m: float(v) for m, v in (item.split("=", 1) for item in args.lr)}
    files, test_sets, max_new_tokens = TASKS[args.task]
    args.max_new_tokens = args.max_new_tokens or max_new_tokens
    args.out = args.out or str(RESULTS / ("methods.json" if args.task == "math" else f"methods_{args.task}.json"))
    skipped = []  # math_data.json has three rows with an empty output
    training_rows = datasets.concatenate_datasets(
        [reading.load_rows(Path(args.data) / name, skipped) for name in files]
    )

    questions = llm_adapters.load_questions(args.data, test_sets, args.limit or None)
    base, tokenizer = load_base(args.model)
    alpaca, _ = encoding.encode_all(tokenizer, reading.load_rows(args.alpaca).take(args.alpaca_rows), args.max_len)
    plain = LlamaAdapterModel(base, tokenizer, AdapterConfig())  # zero gates: the base model itself
    rows = [
        {
            "method": "base model",
            "alpaca_val_loss": evaluate(plain, alpaca, args.batch_size, batching.pad_id(tokenizer)),
            "generation_tokens_per_s": generation_speed(plain, args.gen_tokens),
        }
    ]
    rows[0] |= accuracy(plain, questions, test_sets, args)
    base_speed = rows[0]["generation_tokens_per_s"]
    if torch.cuda.is_available():  # so that the first method's tokens/s does not pay for CUDA's warm-up
        with tempfile.TemporaryDirectory() as run:
            train(training_config(args, run, 5, rates["llama-adapter"]), plain.config, plain, rows=training_rows)
    del plain, base
    for method in args.methods:
        base, _ = load_base(args.model)  # PEFT's methods change their base: each method gets a fresh one
        model = LlamaAdapterModel(base, tokenizer, AdapterConfig(method=method)).to(base.device)
        with tempfile.TemporaryDirectory() as run:
            cfg = training_config(args, run, args.steps, rates[method])
            summary = train(cfg, model.config, model, rows=training_rows)
            checkpoint_kib = (Path(run) / "adapter.safetensors").stat().st_size / 1024
        if model.method.can_merge:  # as chat, eval and demo serve it
            model.method.merge()
        speed = generation_speed(model, args.gen_tokens)
        rows.append(
            {
                "method": method,
                "lr": rates[method],
                "trainable_parameters": model.num_trainable_parameters(),
                "checkpoint_kib": checkpoint_kib,
                "train_tokens_per_s": summary["tokens_per_s"],
                "generation_tokens_per_s": speed,
                "generation_vs_base": speed / base_speed,
                "task_val_loss": [summary["val_loss_before"], summary["val_loss_after"]],
                "alpaca_val_loss": evaluate(model, alpaca, args.batch_size, batching.pad_id(tokenizer)),
            }
            | accuracy(model, questions, test_sets, args)
        )
        print(format_table(rows, test_sets), flush=True)
        del model, base
    results = {
        "model": args.model,
        "task": args.task,
        "training_rows": len(training_rows),
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len},
        "questions_per_set": args.limit or "all",
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
        "table": format_table(rows, test_sets),
    }
    write_results(results, args.out)


def training_config(args, out: str, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(
        data=args.data,  # the rows come from the task's files; this is what the run's settings record
        out=out,
        epochs=100,
        max_steps=steps,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=lr,
        val_fraction=0.02,
        save_every=10**9,
    )


def accuracy(model: LlamaAdapterModel, questions: list, test_sets: tuple[str, ...], args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        scores = evaluate_questions(
            model, questions, Path(folder) / "answers.jsonl", test_sets, args.eval_batch_size, args.max_new_tokens
        )
    return {"accuracy": {name: value for name, value in scores["accuracy"].items()}}


def format_table(rows: list[dict], test_sets: tuple[str, ...]) -> str:
    sets = [*test_sets, "Avg"]
    head = ["method", "trainable params", "checkpoint", "train tok/s", "gen tok/s (vs base)", "task val loss"]
    head += ["Alpaca val loss", *sets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        speed = f"{row['generation_tokens_per_s']:.1f}" + (
            f" ({row['generation_vs_base']:.2f}×)" if "generation_vs_base" in row else ""
        )
        cells = [
            row["method"],
            f"{row['trainable_parameters']:,}" if "trainable_parameters" in row else "0",
            f"{row['checkpoint_kib']:,.0f} KiB" if "checkpoint_kib" in row else "–",
            f"{row['train_tokens_per_s']:.0f}" if "train_tokens_per_s" in row else "–",
            speed,
            "{:.3f} → {:.3f}".format(*row["task_val_loss"]) if "task_val_loss" in row else "–",
            f"{row['alpaca_val_loss']:.3f}",
            *(f"{row['accuracy'][name]:.1f}" if name in row["accuracy"] else "–" for name in sets),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
