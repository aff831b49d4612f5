"""LLaMA-Adapter v1 against V2 at the same budget on the embedded SmolLM2-135M-Instruct: one table.

    python bench/v2.py       # trains in runs/v2/ (each run resumable), writes bench/results/v2.json as it goes

For each task, each `--rows` entry (a method at a learning rate) trains a fresh adapter for `--steps` optimizer steps
of `--batch-size` rows with the same warm-up (the paper's K=10 prompts in the top L=30 layers, for V2 with bias,
scale and norm tuning on top), then is measured:

  alpaca     held-out response loss on the last 200 rows of alpaca_small.json (trained on the others); also the
             trainable parameters, the checkpoint's size and training tokens/s
  math       held-out response loss on the last 200 rows of LLM-Adapters' math_data.json (trained on the others)
  shapes     accuracy on 200 held-out drawings of llama_adapter.data.synthetic, options shuffled (chance 33.3%), greedy
             answers parsed as ScienceQA's (trained to name the colour first, as the shelf's `shapes`, they are not
             scored by likelihood, which would ask for the letter at once); multimodal, CLIP random (ViT-B-32, seed 0)
  scienceqa  accuracy on the 361 test problems with metadata, likelihood scoring, text-only with captions as context,
             trained on the 1,041 train problems (the same rows as eval/scienceqa_smollm2.py)

  speed      training tokens/s of each method on the same batches of 8 Alpaca rows, steps of the two methods taken
             in turn in one process (forward, backward, AdamW), so that the machine's load weighs on both alike

The zero-gated base model's numbers come first: both adapters start from it. A cell that is in the results file is
not measured again, so a run cut short goes on where it stopped.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import device_name

from llama_adapter import AdapterConfig, LlamaAdapterModel, VisualConfig
from llama_adapter.config import default_precision
from llama_adapter.data import batching, encoding, reading
from llama_adapter.data.batching import make_batch
from llama_adapter.data.synthetic import make_colour_problems, rows_saying_the_colour
from llama_adapter.evaluation import scienceqa
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import evaluate, train
from llama_adapter.train.optim import adamw

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO.parent / "shared" / "data")
RESULTS = REPO / "bench" / "results" / "v2.json"
ROWS = ("llama-adapter@0.009", "llama-adapter-v2@0.001")  # method@learning rate
TASKS = ("speed", "alpaca", "shapes", "math", "scienceqa")
TEXT_FILES = {"alpaca": DATA / "alpaca" / "alpaca_small.json", "math": DATA / "llm-adapters" / "math_data.json"}
HELD_OUT = 200
VISUAL = VisualConfig(clip_model="ViT-B-32", clip_seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (the same budget)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--rows", nargs="+", default=list(ROWS),
        help="METHOD@LR entries, e.g. llama-adapter@0.009; METHOD@LR@V sets V2's early-fusion layers (default 1)",
    )  # fmt: skip
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--runs", default="runs/v2", help="the training runs' folders")
    args = parser.parse_args()
    budget = {"steps": args.steps, "batch_size": args.batch_size, "warmup": 0.1, "max_len": args.max_len}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if results.get("budget", budget) != budget:
        raise SystemExit(f"{RESULTS} was measured with {results['budget']}; move it away to measure {budget}")
    command = " ".join(["python bench/v2.py", *sys.argv[1:]])
    where = {"device": device_name(), "precision": default_precision(answering=False), "torch": torch.__version__}
    commands = list(dict.fromkeys([*results.get("commands", []), command]))  # the file may gather several runs
    results |= {"commands": commands, **where, "budget": budget, "cells": results.get("cells", {})}

    def save() -> None:  # after each measurement: a stopped run keeps what it measured
        results["table"] = table(results)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(results["table"], flush=True)

    save()
    if "speed" in args.tasks and "speed" not in results:
        results["speed"] = training_speed(list(dict.fromkeys(row.split("@")[0] for row in args.rows)), args)
        save()
    for task in (task for task in args.tasks if task != "speed"):
        for row in ("base", *args.rows):
            key = f"{task}/{row}"
            if key not in results["cells"]:
                print(f"--- {key}", flush=True)
                results["cells"][key] = measure(task, row, args, Path(args.runs) / task / row)
                save()


def measure(task: str, row: str, args, out: Path) -> dict:
    """Train `row`'s method at its learning rate on `task` (nothing for "base": the zero-gated base); measure it."""
    method, lr, *visual_layers = row.split("@") if row != "base" else (row, None)
    visual = VISUAL if task == "shapes" else None
    config = AdapterConfig(method="llama-adapter" if method == "base" else method)
    if visual_layers:
        config = dataclasses.replace(config, visual_layers=int(visual_layers[0]))
    model = LlamaAdapterModel.from_base(config=config, visual=visual)
    rows, test = task_data(task, Path(args.runs) / task)
    cell = {}
    if method != "base":
        cfg = TrainConfig(
            data=str(TEXT_FILES.get(task, DATA / "scienceqa")), out=str(out), epochs=1000, max_steps=args.steps,
            batch_size=args.batch_size, lr=float(lr), warmup=0.1, max_len=args.max_len, val_fraction=0.0,
            save_every=20,
        )  # fmt: skip
        started = time.perf_counter()
        summary = train(cfg, model.config, model, visual_cfg=visual or VisualConfig(), rows=rows)
        cell = {
            "trainable_parameters": model.num_trainable_parameters(),
            "checkpoint_kib": round((out / "adapter.safetensors").stat().st_size / 1024, 1),
            "train_tokens_per_s": round(summary["tokens_per_s"], 1),
            "wall_time_s": round(time.perf_counter() - started),
        }
    if task in TEXT_FILES:
        examples, _ = encoding.encode_all(model.tokenizer, reading.as_rows(test), args.max_len)
        cell["held_out_loss"] = round(evaluate(model, examples, args.batch_size, batching.pad_id(model.tokenizer)), 4)
    else:
        predictions = out / "predictions.jsonl"
        predictions.unlink(missing_ok=True)  # scored afresh: the adapter may have trained further since
        predictions.parent.mkdir(parents=True, exist_ok=True)
        if task == "scienceqa":
            scores = evaluate_problems(model, test, predictions, "likelihood", batch_size=8, image_context="captions")
        else:  # "The shape is red. The answer is B." is 11 tokens with EOS
            scores = evaluate_problems(model, test, predictions, "generate", batch_size=16, max_new_tokens=24)
        cell["accuracy"] = round(scores["Avg"], 2)
    return cell


def training_speed(methods: list[str], args, rounds: int = 6) -> dict:
    """Median training tokens/s per method: each round, one step of every method on that round's batch."""
    rows, _ = task_data("alpaca", Path(args.runs))
    base = LlamaAdapterModel.from_base()  # its base carries every method's adapter, each taking its turn
    models = {method: LlamaAdapterModel(base.base, base.tokenizer, AdapterConfig(method=method)) for method in methods}
    examples, _ = encoding.encode_all(
        base.tokenizer, reading.as_rows(rows[: args.batch_size * (rounds + 1)]), args.max_len
    )
    pad = batching.pad_id(base.tokenizer)
    optimizers = {method: adamw(list(model.adapter_state().values()), 1e-3, 0.0) for method, model in models.items()}
    speeds = {method: [] for method in methods}
    for round_ in range(rounds + 1):  # the first round warms up
        batch = make_batch(examples[round_ * args.batch_size : (round_ + 1) * args.batch_size], pad, None)
        for method, model in models.items():
            optimizer = optimizers[method]
            model.train()
            started = time.perf_counter()
            model.loss(**batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:
                speeds[method].append(int(batch["attention_mask"].sum()) / (time.perf_counter() - started))
    medians = {method: round(statistics.median(values), 1) for method, values in speeds.items()}
    return {"tokens_per_s": medians, "rounds": rounds, "batch_size": args.batch_size}


def task_data(task: str, folder: Path) -> tuple[list[dict], list]:
    """The training rows and the held-out rows (text tasks) or problems (the others)."""
    if task in TEXT_FILES:
        rows = list(reading.load_rows(TEXT_FILES[task], []))  # math_data.json has rows without an output: left out
        return rows[:-HELD_OUT], rows[-HELD_OUT:]
    if task == "shapes":
        train_problems = make_colour_problems(folder / "images", 800, seed=1, shuffle_choices=True)
        return rows_saying_the_colour(train_problems), make_colour_problems(folder / "images", HELD_OUT, seed=2)
    sqa = DATA / "scienceqa"
    train_problems, _ = scienceqa.load_problems(sqa, "train", "problems_think_partial.json", missing_images="text-only")
    test, _ = scienceqa.load_problems(sqa, "test", "problems_think_partial.json")
    return scienceqa.to_rows(train_problems, "captions"), test


def label_of(row: str) -> str:
    """llama-adapter-v2@0.001@30 -> llama-adapter-v2, lr 0.001, V=30"""
    method, lr, *visual_layers = row.split("@")
    return f"{method}, lr {lr}" + "".join(f", V={v}" for v in visual_layers)


def table(results: dict) -> str:
    """The markdown table: a row per method and learning rate, a column per measurement."""
    cells, speeds = results["cells"], results.get("speed", {}).get("tokens_per_s", {})
    head = ["", "trainable params", "checkpoint", "train tok/s", "Alpaca held-out loss", "math held-out loss",
            "shapes, shuffled options", "ScienceQA 361 (likelihood)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in dict.fromkeys(key.split("/", 1)[1] for key in cells):
        method = row.split("@")[0]
        label = "base (zero gates)" if row == "base" else label_of(row)

        def value(task: str, key: str, form: str, row: str = row) -> str:
            found = cells.get(f"{task}/{row}", {}).get(key)
            return "–" if found is None else format(found, form)

        kib = cells.get(f"alpaca/{row}", {}).get("checkpoint_kib")
        lines.append(
            f"| {label} | {value('alpaca', 'trainable_parameters', ',')} | "
            + ("–" if kib is None else f"{kib:,.0f} KiB")
            + f" | {'–' if row == 'base' or method not in speeds else format(speeds[method], '.0f')} | "
            f"{value('alpaca', 'held_out_loss', '.3f')} | {value('math', 'held_out_loss', '.3f')} | "
            f"{value('shapes', 'accuracy', '.1f')} | {value('scienceqa', 'accuracy', '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
