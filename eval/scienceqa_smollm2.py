"""The README's ScienceQA table: text-only LLaMA-Adapter on the embedded SmolLM2-135M-Instruct, real problems.

    python eval/scienceqa_smollm2.py                     # writes eval/results/scienceqa_smollm2.{json,md}

Trains on the train split of ../shared/data/scienceqa/problems_think_partial.json (1041 problems; no train images
exist here, so text-only), once without and once with the images' machine captions as context, and evaluates
the base model (zero gates) and both adapters on the 361 test problems that carry subject and grade metadata
(the nine-column table), and, with --full-test, on all 4241 test questions of llava_test_CQM-A.json (Avg).
Every stage resumes: a trained adapter is reused, a predictions file continues where it stopped.
"""

import argparse
import json
import os
from pathlib import Path

from llama_adapter import LlamaAdapterModel
from llama_adapter.adapter_files import CONFIG_NAME
from llama_adapter.evaluation import scienceqa
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO.parent / "shared" / "data") / "scienceqa"
PROBLEMS = "problems_think_partial.json"
# Most wanted first, so a run cut short by the clock has measured what matters: the text-only adapter on all
# 4241 test questions comes before the captions variant and the base model's full-test average.
STAGES = [
    ("base model (zero gates)", "test361"),
    ("adapter", "test361"),
    ("adapter", "test4241"),
    ("adapter + captions", "test361"),
    ("base model (zero gates)", "test4241"),
    ("adapter + captions", "test4241"),
]
PAPER = {"LLaMA-Adapter (paper, 7B + CLIP)": 85.19, "LLaMA-Adapter text-only (paper)": 78.31, "random": 39.83}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/scienceqa_smollm2", help="adapters and predictions")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--scoring", choices=["generate", "likelihood"], default="likelihood")
    parser.add_argument("--full-test", action="store_true", help="also all 4241 LLaVA test questions (slow on CPU)")
    parser.add_argument("--skip-captions", action="store_true", help="leave out the adapter trained with captions")
    args = parser.parse_args()
    out = Path(args.out)

    train_problems, _ = scienceqa.load_problems(DATA, "train", PROBLEMS, missing_images="text-only")
    test_problems, _ = scienceqa.load_problems(DATA, "test", PROBLEMS)
    llava = scienceqa.load_llava_questions(DATA / "llava_test_CQM-A.json", DATA) if args.full_test else []
    results = {"settings": vars(args) | {"problems": PROBLEMS, "train_problems": len(train_problems)}, "rows": {}}

    rows = {  # name: (adapter trained with which image context or None for zero gates, context at test time)
        "base model (zero gates)": (None, "none"),
        "adapter": ("none", "none"),
        "adapter + captions": ("captions", "captions"),
    }
    test_sets = {"test361": test_problems, "test4241": llava}
    results["rows"]["random guess (expected)"] = {name: scienceqa.chance(p) for name, p in test_sets.items() if p}
    for name, test_set in STAGES:
        if (args.skip_captions and "captions" in name) or not test_sets[test_set]:
            continue
        trained_with, context = rows[name]
        model = LlamaAdapterModel.from_base()
        row = results["rows"].setdefault(name, {"train": None})
        if trained_with is not None:
            adapter_dir = out / f"adapter-{trained_with}"
            row["train"] = train_or_reuse(model, train_problems, trained_with, adapter_dir, args.epochs, args.lr)
        tag = name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")
        row[test_set] = evaluate_problems(
            model, test_sets[test_set], out / f"{tag}-{test_set}.jsonl", args.scoring, batch_size=8,
            image_context=context,
        )  # fmt: skip
        print(name, test_set, scienceqa.format_table(row[test_set]), sep="\n")
        write_results(results)  # after every stage: a long run that stops keeps what it measured


def write_results(results: dict) -> None:
    folder = REPO / "eval" / "results"
    folder.mkdir(exist_ok=True)
    (folder / "scienceqa_smollm2.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "scienceqa_smollm2.md").write_text(markdown_table(results))


def train_or_reuse(model, problems, image_context: str, adapter_dir: Path, epochs: int, lr: float) -> dict:
    """Train on the ScienceQA train rows, or load the adapter a previous run of this script saved."""
    summary_file = adapter_dir / "summary.json"
    if (adapter_dir / CONFIG_NAME).is_file() and summary_file.is_file():
        saved = json.loads((adapter_dir / "train_config.json").read_text())  # the run's settings (train.py)
        if (saved["epochs"], saved["lr"]) != (epochs, lr):
            raise SystemExit(
                f"{adapter_dir} was trained with --epochs {saved['epochs']} --lr {saved['lr']}, not {epochs} and "
                f"{lr}: its numbers would be mislabelled. Choose another --out."
            )
        model.load_adapter_weights(adapter_dir / "adapter.safetensors")
        return json.loads(summary_file.read_text())
    cfg = TrainConfig(
        data=str(DATA), out=str(adapter_dir), task="scienceqa", epochs=epochs, batch_size=8, lr=lr, warmup=0.1,
        max_len=384, val_fraction=0.05,
    )  # fmt: skip
    summary = train(cfg, model.config, model, rows=scienceqa.to_rows(problems, image_context))
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def markdown_table(results: dict) -> str:
    columns = scienceqa.COLUMNS
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in results["rows"].items():
        scores = row["test361"]
        cells = ["-" if scores[c] is None else f"{scores[c]:.2f}" for c in columns]
        label = name if name.startswith("random") else f"SmolLM2-135M {name}"
        lines.append(f"| {label}, 361 test problems | " + " | ".join(cells) + " |")
        if "test4241" in row:
            avg = row["test4241"]["Avg"]
            lines.append(f"| {label}, all 4241 test questions | " + "| " * 8 + f"{avg:.2f} |")
    for name, avg in PAPER.items():
        lines.append(f"| {name}, all 4241 | " + "| " * 8 + f"{avg:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
