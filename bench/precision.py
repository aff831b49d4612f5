"""Whether answering in bf16 keeps the shelf adapters' answers: greedy answers to 100 held-out prompts each, in fp32
and in bf16, compared text for text, with the time each precision took; and what says whether they are as good: the
loss of the held-out reference answers (teacher-forced, per token) and, for `scienceqa`, how many answers are right.

    python bench/precision.py           # writes bench/results/precision.json

- `alpaca`: the first 100 held-out instructions of its training run (train/results/shelf_alpaca.json), at most
  --max-tokens new tokens each;
- `scienceqa`: the first 100 questions of ScienceQA's val split (problems_think_partial.json, captions as context,
  as the README evaluates it), greedy, its answer ("The answer is ...") at most 16 tokens;
- `shapes`: 100 held-out images of its training run's seed; its CLIP encoder here is randomly initialised (no
  pretrained weights offline), as it was when the adapter trained.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import DATA, REPO, RESULTS, write_results

from llama_adapter.config import ModelConfig, SamplingConfig
from llama_adapter.data import encoding, templates
from llama_adapter.data.synthetic import make_colour_problems
from llama_adapter.evaluation import scienceqa
from llama_adapter.serving import generation
from llama_adapter.serving.logprobs import options_logprobs
from llama_adapter.serving.models import load_model

PROMPTS, BATCH = 100, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length limit for alpaca")
    parser.add_argument("--out", default=str(RESULTS / "precision.json"))
    args = parser.parse_args()

    problems = scienceqa_problems()
    asked = {
        "alpaca": (*alpaca_prompts(), None, args.max_tokens, None),
        "scienceqa": (*scienceqa_prompts(problems), None, 16, problems),
    }
    with tempfile.TemporaryDirectory() as folder:
        prompts, images = shapes_prompts(Path(folder))
        asked["shapes"] = (prompts, None, images, 24, None)
        results = {name: compare(name, *setting) for name, setting in asked.items()}
    print(json.dumps(results, indent=2))
    write_results({"precision": "fp32 and bf16", "prompts": PROMPTS, "adapters": results}, args.out)


def compare(adapter: str, prompts: list[str], references, images, max_tokens: int, problems) -> dict:
    """The adapter's greedy answers in fp32 and in bf16: how many are the same text, each precision's seconds, the
    references' loss per token (where there are references) and the share of right answers (ScienceQA problems)."""
    answers, seconds, losses, right = {}, {}, {}, {}
    for precision in ("fp32", "bf16"):
        model = load_model(ModelConfig(precision=precision), adapter)
        if references:
            losses[precision] = reference_loss(model, prompts, references)
        features = model.encode_images(images) if images else None
        start = time.perf_counter()
        answers[precision] = []
        for at in range(0, len(prompts), BATCH):
            rows = slice(at, at + BATCH)
            answers[precision] += generation.generate_batch(
                model, prompts[rows], SamplingConfig(max_new_tokens=max_tokens),
                None if features is None else features[rows],
            )  # fmt: skip
        seconds[precision] = time.perf_counter() - start
        if problems:
            picked = [scienceqa.parse_option_text(a, p.choices) for a, p in zip(answers[precision], problems)]
            right[precision] = sum(pick == p.answer for pick, p in zip(picked, problems)) / len(problems)
        model.unload()
    same = sum(a == b for a, b in zip(answers["fp32"], answers["bf16"]))
    differing = [i for i, (a, b) in enumerate(zip(answers["fp32"], answers["bf16"])) if a != b]
    return {
        "max_new_tokens": max_tokens,
        "same": same,
        "share_same": same / len(prompts),
        "seconds": seconds,
        "bf16_speedup": seconds["fp32"] / seconds["bf16"],
        "reference_loss": losses or None,
        "accuracy": right or None,
        "first_differing": [
            {"prompt": prompts[i][-200:], "fp32": answers["fp32"][i], "bf16": answers["bf16"][i]} for i in differing[:3]
        ],
    }


def reference_loss(model, prompts: list[str], references: list[str]) -> float:
    """Mean negative log-likelihood per token of each reference answer (and its EOS) after its prompt."""
    total, tokens = 0.0, 0
    for at in range(0, len(prompts), BATCH):
        rows = slice(at, at + BATCH)
        scores = options_logprobs(model, prompts[rows], [[text] for text in references[rows]])
        total -= sum(float(score) for score in scores)
        tokens += sum(len(encoding.response_ids(model.tokenizer, text)) for text in references[rows])
    return total / tokens


def alpaca_prompts() -> tuple[list[str], list[str]]:
    held_out = json.loads((REPO / "train" / "results" / "shelf_alpaca.json").read_text())["answers"][:PROMPTS]
    return [templates.format_prompt(row["instruction"], row["input"]) for row in held_out], [
        row["reference"] for row in held_out
    ]


def scienceqa_problems() -> list:
    problems, _ = scienceqa.load_problems(
        DATA / "scienceqa", "val", "problems_think_partial.json", "pid_splits.json", "text-only"
    )
    return problems[:PROMPTS]


def scienceqa_prompts(problems: list) -> tuple[list[str], list[str]]:
    prompts = [templates.format_prompt(*scienceqa.question_prompt(p, "captions")) for p in problems]
    return prompts, [scienceqa.answer_text(p, answer_form="text") for p in problems]


def shapes_prompts(folder: Path) -> tuple[list[str], list[str]]:
    shelf = json.loads((REPO / "train" / "results" / "shelf_shapes.json").read_text())
    problems = make_colour_problems(folder, PROMPTS, shelf["images"]["held_out_seed"], shuffle_choices=True)
    prompts = [templates.format_prompt(*scienceqa.question_prompt(p, "none")) for p in problems]
    return prompts, [str(p.image) for p in problems]


if __name__ == "__main__":
    main()
