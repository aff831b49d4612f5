"""Benchmark evaluation: predict, append, score. ScienceQA (and anything shaped like it); LLM-Adapters' test sets.

One config (EvalConfig, plus each benchmark's own question settings) and one resumable loop (`predict`) serve
every benchmark: stage one appends one JSON line per question as soon as it is answered (with its batch), so a
stopped run resumes where it stopped, and refuses to go on with other settings (the progress bar counts a generated
answer as soon as its row of the batch ends, before the batch does); stage two is a pure scorer of those lines (`scienceqa.score`, `llm_adapters.score`). Two ways to answer a
ScienceQA question:
- generate: greedy decoding, then `scienceqa.parse_answer` on the text (what the paper reports);
- likelihood: the option whose "The answer is X." the model finds most likely; no parsing, never unparsed.
"""

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from .. import files
from ..config import Checked, SamplingConfig, option
from ..data import sources, templates
from ..model import LlamaAdapterModel
from ..serving.generation import generate_batch
from ..serving.logprobs import options_logprobs
from . import llm_adapters, scienceqa
from .predictions import append_prediction, check_resume_settings, first_repeat, read_predictions, settings_path
from .scienceqa import Problem


@dataclass
class EvalConfig(Checked):
    """Which benchmark data, who answers, where the predictions go, and how many questions at a time."""

    data: str = option(
        "the benchmark: ScienceQA's folder (problems.json, ...) or a dataset in its hub layout (a name, a Parquet "
        "file, a save_to_disk folder); LLM-Adapters' folder (<set>/test.json)"
    )
    out: str = option("predictions JSONL; an existing file is resumed; scores go beside it (.scores.json)")
    adapter: str | None = option(
        "adapter folder or shelf name, e.g. alpaca (`llama-adapter adapters`; default: the base model alone)", None
    )
    batch_size: int = option("questions per batch", 8, at_least=1)
    max_new_tokens: int = option("answer length limit, in tokens", 16, at_least=1)
    limit: int | None = option("evaluate only the first N questions of each test set (a quick look)", None, at_least=1)


@dataclass
class ScienceQATestConfig(Checked):
    """Which ScienceQA questions are asked, and how an answer is chosen."""

    split: str = option("which split: of the problems file, or of a hub-layout dataset", "test")
    data_config: str | None = option("the configuration (subset) of a hub dataset that has several", None)
    llava: str | None = option("LLaVA's llava_test_CQM-A.json: its 4241 test questions instead of the split", None)
    scoring: Literal["generate", "likelihood"] = option(
        "generate: parse the greedy answer (the paper's way); likelihood: the most likely option, no parsing",
        "generate",
    )


@dataclass
class DatasetsConfig(Checked):
    """Which of LLM-Adapters' test sets are asked."""

    datasets: tuple[str, ...] = option("test sets, by folder name", llm_adapters.MATH_DATASETS)

    def __post_init__(self):
        super().__post_init__()
        if not self.datasets:
            raise ValueError("datasets must name at least one test set")
        if len(set(self.datasets)) < len(self.datasets):
            raise ValueError(f"datasets names a test set twice: {list(self.datasets)}")
        self.datasets = tuple(self.datasets)


# Each benchmark's defaults where they differ from the configs' own (the ScienceQA ones): `eval <benchmark>` flags.
BENCHMARK_DEFAULTS = {
    "scienceqa": {},
    "math": {"batch_size": 16, "max_new_tokens": 256, "datasets": llm_adapters.MATH_DATASETS},
    # LLM-Adapters' 32: the label comes first
    "commonsense": {"batch_size": 16, "max_new_tokens": 32, "datasets": llm_adapters.COMMONSENSE_DATASETS},
}


def predict(
    model: LlamaAdapterModel,
    questions: list,
    out: str | Path,
    settings: dict,
    answer: Callable[[list, Callable[[int], None]], Iterator[dict]],
    fields: tuple[str, ...],
    batch_size: int,
    desc: str,
    prepare: Callable[[list], None] | None = None,
) -> list[dict]:
    """The records of every question (anything with a `pid`), answering, `batch_size` at a time, only those not yet
    in `out`; `answer(batch, on_row_done)` yields each question's record (with `fields`) when it has one, and it is
    appended at once. The progress bar counts a question when its record comes, or before, as `on_row_done(count)`
    tells it that `count` more of the batch are as good as answered (rows of a generating batch finishing).

    `settings` (with the answering model's own added) must be those `out` was made with. `prepare(questions)` runs
    on the questions still to answer before the first of them is: where bad input should stop a run unstarted.
    """
    repeat = first_repeat([question.pid for question in questions])
    if repeat is not None:
        again, first = repeat
        raise sources.DataError(f"questions: pid {questions[again].pid} twice (questions {first} and {again})")
    model_settings = {"adapter_config": model.config.to_dict(), "base_model": model.base.name_or_path}
    check_resume_settings(out, settings | model_settings)
    done = read_predictions(out, fields)
    todo = [question for question in questions if question.pid not in done]
    if prepare is not None:
        prepare(todo)
    with (
        open(out, "a", encoding="utf-8") as handle,
        tqdm(total=len(questions), initial=len(questions) - len(todo), desc=desc, unit="q") as bar,
    ):
        for start in range(0, len(todo), batch_size):
            progress = _BatchProgress(bar)
            for record in answer(todo[start : start + batch_size], progress.rows_done):
                append_prediction(handle, record, fields)
                progress.recorded()
    wanted = {question.pid for question in questions}
    return [record for pid, record in read_predictions(out, fields).items() if pid in wanted]


class _BatchProgress:
    """One batch on the progress bar: each question moves it once, when its row finishes or its record comes."""

    def __init__(self, bar):
        self.bar = bar
        self.ahead = 0  # rows counted whose records have not come yet

    def rows_done(self, count: int) -> None:
        self.bar.update(count)
        self.ahead += count

    def recorded(self) -> None:
        if self.ahead:
            self.ahead -= 1
        else:
            self.bar.update()


def evaluate_problems(
    model: LlamaAdapterModel,
    problems: list[Problem],
    out: str | Path,
    scoring: str = "generate",
    batch_size: int = 8,
    image_context: str = "none",
    max_new_tokens: int = 16,
    settings: dict | None = None,
    explanation: str = "none",
    answer_form: str = "letter",
) -> dict:
    """Predict every problem not yet in `out`, append the predictions, and return the scores of all of them.

    `settings`: what else decides the answers (the questions' source, the adapter's folder), recorded with `out`.
    `explanation` and `answer_form`: where the adapter's training targets put the lecture and solution, and how
    they name the option (likelihood scoring compares the options as those targets begin; generated answers are
    read as they name it).
    """
    if problems:  # bad settings, or an explanation-first adapter scored by likelihood: refused before any work
        scienceqa.answer_text(problems[0], explanation, answer_form)
        if scoring == "likelihood":
            scienceqa.option_targets(problems[0], explanation, answer_form)
    cache = model.feature_cache()
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    def encode_images(todo: list[Problem]) -> None:
        # Every image encoded before the first prediction: a bad one stops the run before it starts.
        failed = cache.precompute([str(p.image) for p in todo if p.image])
        if failed:
            raise sources.DataError(f"{len(failed)} image(s) cannot be used, e.g. {next(iter(failed.values()))}")

    def answer(chunk: list[Problem], on_row_done: Callable[[int], None]) -> Iterator[dict]:
        prompts = [
            templates.instruction_prompt(model.template, model.tokenizer, *scienceqa.question_prompt(p, image_context))
            for p in chunk
        ]
        images = cache.model_inputs([str(p.image) if p.image else None for p in chunk]) if cache else {}
        if scoring == "generate":
            outputs = generate_batch(model, prompts, sampling, **images, on_row_done=on_row_done)
        else:
            outputs = _most_likely_answers(model, chunk, prompts, images, explanation, answer_form)
        for answered in zip(chunk, prompts, outputs):
            yield scienceqa.prediction_record(*answered, answer_form)

    asked = {"scoring": scoring, "image_context": image_context}
    asked |= {"max_new_tokens": max_new_tokens} if scoring == "generate" else {}
    # Files made before these settings existed resume as they were.
    asked |= {"explanation": explanation} if explanation != "none" else {}
    asked |= {"answer_form": answer_form} if answer_form != "letter" else {}
    asked_in = problems
    if scoring == "likelihood":  # prompts of a length together: a batch pads little (answers come in any order)
        asked_in = sorted(problems, key=lambda p: len("".join(scienceqa.question_prompt(p, image_context))))
    records = predict(
        model, asked_in, out, (settings or {}) | asked, answer, scienceqa.PREDICTION_FIELDS, batch_size,
        f"eval ({scoring})", encode_images if cache else None,
    )  # fmt: skip
    return scienceqa.score(records, {problem.pid: problem for problem in problems}) | {"scoring": scoring}


def evaluate_questions(
    model: LlamaAdapterModel,
    questions: list[llm_adapters.Question],
    out: str | Path,
    datasets: tuple[str, ...],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    settings: dict | None = None,
) -> dict:
    """Answer every LLM-Adapters question (math, commonsense) not yet in `out` greedily, append, score them all."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    def answer(chunk: list[llm_adapters.Question], on_row_done: Callable[[int], None]) -> Iterator[dict]:
        asked = [templates.instruction_prompt(model.template, model.tokenizer, q.instruction, q.input) for q in chunk]
        outputs = generate_batch(model, asked, sampling, on_row_done=on_row_done)
        for question, output in zip(chunk, outputs):
            yield llm_adapters.prediction_record(question, output)

    records = predict(
        model, questions, out, (settings or {}) | {"max_new_tokens": max_new_tokens}, answer,
        llm_adapters.PREDICTION_FIELDS, batch_size, "eval (LLM-Adapters)",
    )  # fmt: skip
    return llm_adapters.score(records, datasets)


def _most_likely_answers(
    model: LlamaAdapterModel, problems: list[Problem], prompts: list[str], images: dict, explanation: str,
    answer_form: str,
) -> list[str]:  # fmt: skip
    """Each problem's most likely answer among "The answer is A." ... (as the adapter's targets begin: see
    `scienceqa.option_targets`); the problems' prompts run once each, together."""
    targets = [scienceqa.option_targets(problem, explanation, answer_form) for problem in problems]
    options = [texts for texts, _ in targets]
    scores = options_logprobs(
        model, prompts, options, images.get("image_features"), images.get("has_image"), targets[0][1]
    )
    return [texts[int(score.argmax())] for texts, score in zip(options, scores)]


def load_eval_problems(
    cfg: EvalConfig, test: ScienceQATestConfig, problems_file: str, splits_file: str, missing_images: str
) -> list[Problem]:
    """The problems `cfg` and `test` ask for, reporting how many are evaluated without their missing image."""
    if test.llava:
        problems = scienceqa.load_llava_questions(test.llava, cfg.data)
        missing = sum(1 for p in problems if p.names_image and p.image is None)
        if missing and missing_images == "error":
            raise sources.DataError(
                f"{test.llava}: {missing} questions name an image missing under {cfg.data}/images/test; "
                "--missing-images text-only evaluates them without it"
            )
    else:
        problems, missing = scienceqa.load_problems(
            cfg.data, test.split, problems_file, splits_file, missing_images, config=test.data_config
        )
    problems = problems[: cfg.limit]  # None: all of them
    if missing:
        print(f"{missing} problems lack their image file and are evaluated without it", file=sys.stderr)
    return problems


def write_scores(scores: dict, out: str | Path) -> Path:
    """The scores and the settings that made them (recorded by `predict`), beside the predictions file."""
    path = Path(out).with_suffix(".scores.json")
    files.write_json(path, scores | {"settings": files.read_json(settings_path(out))})
    return path
