"""Does the visual path learn? "What colour is the shape?" with a frozen, randomly initialised CLIP encoder.

    python train/synthetic_colours.py            # writes train/results/synthetic_colours.json

Draws coloured shapes (llama_adapter.data.synthetic), trains a multimodal adapter and a text-only adapter on the
same problems with the embedded SmolLM2-135M-Instruct, and scores both on held-out images by likelihood. The
question text never depends on the image, so the text-only adapter can only guess (33%); the multimodal one
has to get the colour from CLIP features. No pretrained CLIP weights exist offline: the encoder is random.
"""

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from llama_adapter import AdapterConfig, LlamaAdapterModel, VisualConfig
from llama_adapter.data.synthetic import make_colour_problems
from llama_adapter.evaluation import scienceqa
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (random init)")
    parser.add_argument("--train", type=int, default=480, help="training images")
    parser.add_argument("--test", type=int, default=150, help="held-out images")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    parser.add_argument(
        "--shuffle-choices",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="harder: options in random order",
    )
    parser.add_argument("--out", default="runs/synthetic_colours", help="adapters and predictions")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="colours-"))
    train_problems = make_colour_problems(folder, args.train, seed=1, shuffle_choices=args.shuffle_choices)
    test_problems = make_colour_problems(folder, args.test, seed=2, shuffle_choices=args.shuffle_choices)
    cfg = TrainConfig(
        data=str(folder), out="", epochs=100, max_steps=args.steps, batch_size=8, lr=args.lr, warmup=0.1,
        val_fraction=0.05, max_len=256,
    )  # fmt: skip
    results = {"settings": vars(args)}
    for name, visual in (("multimodal", VisualConfig(clip_model=args.clip_model)), ("text_only", VisualConfig())):
        run = dataclasses.replace(cfg, out=str(Path(args.out) / name))
        model = LlamaAdapterModel.from_base(config=AdapterConfig(), visual=visual)
        summary = train(run, model.config, model, rows=scienceqa.to_rows(train_problems))
        scores = evaluate_problems(
            model, test_problems, Path(run.out) / "predictions.jsonl", scoring="likelihood", batch_size=16
        )
        results[name] = {"accuracy": scores["Avg"], "questions": scores["count"]["Avg"]} | summary
        print(name, json.dumps(results[name], indent=2))
    (REPO / "train" / "results").mkdir(exist_ok=True)
    (REPO / "train" / "results" / "synthetic_colours.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
