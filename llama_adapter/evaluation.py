"""Benchmark evaluation: predict, append, score. ScienceQA (and anything shaped like it); LLM-Adapters' test sets.

Stage one writes one JSON line per problem as soon as its batch is done, so a stopped run resumes where it
stopped; stage two is `scienceqa.score`, a pure function of those lines. Two ways to predict:
- generate: greedy decoding, then `scienceqa.parse_answer` on the text (what the paper reports);
- likelihood: the option whose "The answer is X." the model finds most likely; no parsing, never unparsed.
"""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from . import data, llm_adapters, scienceqa
from .config import SamplingConfig, option
from .generation import generate_batch
from .model import LlamaAdapterModel
from .scienceqa import Problem


@dataclass
class EvalConfig:
    """Which questions, where the predictions go, and how answers are chosen."""

    data: str = option("ScienceQA folder (problems.json, pid_splits.json, images/)")
    out: str = option("predictions JSONL; an existing file is resumed; scores go beside it (.scores.json)")
    adapter: str | None = option("adapter folder (default: the base model with no adapter)", None)
    split: str = option("which split of the problems file", "test")
    llava: str | None = option("LLaVA's llava_test_CQM-A.json: its 4241 test questions instead of the split", None)
    scoring: Literal["generate", "likelihood"] = option(
        "generate: parse the greedy answer (the paper's way); likelihood: the most likely option, no parsing",
        "generate",
    )
    batch_size: int = option("problems per batch", 8)
    max_new_tokens: int = option("generate: answer length limit", 16)
    limit: int | None = option("evaluate only the first N problems (a quick look)", None)

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def evaluate_problems(
    model: LlamaAdapterModel,
    problems: list[Problem],
    out: str | Path,
    scoring: str = "generate",
    batch_size: int = 8,
    image_context: str = "none",
    max_new_tokens: int = 16,
) -> dict:
    """Predict every problem not yet in `out`, append the predictions, and return the scores of all of them."""
    done = scienceqa.read_predictions(out)
    todo = [problem for problem in problems if problem.pid not in done]
    cache = model.feature_cache()
    if cache:  # every image encoded before the first prediction: a bad one stops the run before it starts
        failed = cache.precompute([str(problem.image) for problem in todo if problem.image])
        if failed:
            raise data.DataError(f"{len(failed)} image(s) cannot be used, e.g. {next(iter(failed.values()))}")
    progress = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"eval ({scoring})", unit="q")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            prompts = [data.format_prompt(*scienceqa.question_prompt(p, image_context)) for p in chunk]
            images = cache.model_inputs([str(p.image) if p.image else None for p in chunk]) if cache else {}
            if scoring == "generate":
                outputs = generate_batch(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), **images)
            else:
                outputs = _most_likely_answers(model, chunk, prompts, images)
            for problem, prompt, output in zip(chunk, prompts, outputs):
                scienceqa.append_prediction(handle, scienceqa.prediction_record(problem, prompt, output))
            progress.update(len(chunk))
    progress.close()
    wanted = {problem.pid for problem in problems}
    records = [record for pid, record in scienceqa.read_predictions(out).items() if pid in wanted]
    return scienceqa.score(records, {problem.pid: problem for problem in problems}) | {"scoring": scoring}


def evaluate_questions(
    model: LlamaAdapterModel,
    questions: list[llm_adapters.Question],
    out: str | Path,
    datasets: tuple[str, ...],
    batch_size: int = 16,
    max_new_tokens: int = 256,
) -> dict:
    """Answer every LLM-Adapters question (math, commonsense) not yet in `out` greedily, append, score them all."""
    fields = llm_adapters.PREDICTION_FIELDS
    done = scienceqa.read_predictions(out, fields)
    todo = [question for question in questions if question.pid not in done]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    with (
        open(out, "a", encoding="utf-8") as handle,
        tqdm(total=len(questions), initial=len(questions) - len(todo), desc="eval (LLM-Adapters)", unit="q") as bar,
    ):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            outputs = generate_batch(model, [data.format_prompt(q.instruction, q.input) for q in chunk], sampling)
            for question, output in zip(chunk, outputs):
                scienceqa.append_prediction(handle, llm_adapters.prediction_record(question, output), fields)
            bar.update(len(chunk))
    wanted = {question.pid for question in questions}
    records = [record for pid, record in scienceqa.read_predictions(out, fields).items() if pid in wanted]
    return llm_adapters.score(records, datasets)


def _most_likely_answers(model: LlamaAdapterModel, problems: list[Problem], prompts: list[str], images: dict):
    """Each problem's most likely answer among "The answer is A." ...; the question's prompt runs once for all."""
    answers = []
    for row, (problem, prompt) in enumerate(zip(problems, prompts)):
        options = [scienceqa.answer_text(dataclasses.replace(problem, answer=i)) for i in range(len(problem.choices))]
        features = None
        if images and images["has_image"][row]:
            features = images["image_features"][row : row + 1]
        scores = model.continuation_logprobs(prompt, options, features)
        answers.append(options[int(scores.argmax())])
    return answers


def load_eval_problems(cfg: EvalConfig, problems_file: str, splits_file: str, missing_images: str) -> list[Problem]:
    """The problems `cfg` asks for, reporting how many are evaluated without their missing image."""
    if cfg.llava:
        problems = scienceqa.load_llava_questions(cfg.llava, cfg.data)
        missing = sum(1 for p in problems if p.names_image and p.image is None)
        if missing and missing_images == "error":
            raise data.DataError(
                f"{cfg.llava}: {missing} questions name an image missing under {cfg.data}/images/test; "
                "--missing-images text-only evaluates them without it"
            )
    else:
        problems, missing = scienceqa.load_problems(cfg.data, cfg.split, problems_file, splits_file, missing_images)
    problems = problems[: cfg.limit] if cfg.limit else problems
    if missing:
        print(f"{missing} problems lack their image file and are evaluated without it", file=sys.stderr)
    return problems


def check_resume_settings(out: str | Path, settings: dict) -> None:
    """Refuse to resume a predictions file that was made with other settings: its lines would not be comparable."""
    path = Path(out).with_suffix(".settings.json")
    if Path(out).exists() and path.exists():
        before = json.loads(path.read_text())
        changed = {key: (before.get(key), value) for key, value in settings.items() if before.get(key) != value}
        if changed:
            raise ValueError(f"{out} was made with other settings {changed} (before, now); choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def write_scores(scores: dict, out: str | Path, settings: dict) -> Path:
    """The scores and the settings that made them, beside the predictions file."""
    path = Path(out).with_suffix(".scores.json")
    path.write_text(json.dumps(scores | {"settings": settings}, indent=2) + "\n")
    return path
