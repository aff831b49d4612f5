"""The benchmarks of LLM-Adapters (Hu et al. 2023), math and commonsense: questions, answer extraction, scores.

Each dataset folder holds test.json, a list of {instruction, input, output, answer} rows in Alpaca format. One
loader serves both benchmarks; how an answer is read, and so what a gold answer may be, depends on the dataset.

Math: as in LLM-Adapters, the last number in the model's answer is compared with the gold number (within 0.001),
and for AQuA the option letter. LLM-Adapters takes the first capital A-E anywhere in the text, so "Answer: (C)"
would read as A; here it is the last letter A-E that stands alone, which is what "The answer is C." (the form
math_data.json trains) ends with.

Commonsense: the answer is a label (boolq true/false, piqa solution1/solution2, winogrande option1/option2, the
others answer1-answer5), and exactly as in LLM-Adapters' commonsense_evaluate.py the FIRST label anywhere in the
answer is the prediction: case-sensitive and without word boundaries ("untrue" reads as true, "True" as nothing).
The training rows answer "the correct answer is answer3" and stop, so the label given comes before anything a
model runs on into, such as an echo of the instruction's "Answer format: answer1/answer2/answer3"; the last label
would read that echo. Matching case keeps LLM-Adapters' numbers comparable and skips echoes of the instruction's
capitalised option list ("Answer1: ... Answer2: ..."); the price is that "True" or "Answer3" count as unparsed.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from .. import files
from ..data.sources import DataError

MATH_DATASETS = ("gsm8k", "SVAMP", "MultiArith", "AddSub", "AQuA", "SingleEq")
LETTER_DATASETS = {"AQuA"}
# LLM-Adapters' table order less HellaSwag, whose test set is not in the data folder (its labels are kept below).
COMMONSENSE_DATASETS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
_ANSWERS = ("answer1", "answer2", "answer3", "answer4", "answer5")
COMMONSENSE_LABELS = {  # what commonsense_evaluate.py's extract_answer looks for in each test set
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _ANSWERS,
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": _ANSWERS,
    "ARC-Challenge": _ANSWERS,
    "openbookqa": _ANSWERS,
}
PREDICTION_FIELDS = ("pid", "dataset", "output", "pred", "answer", "correct")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-E])\b")


@dataclass(frozen=True)
class Question:
    pid: str  # "<dataset>/<row index>"
    dataset: str
    instruction: str
    input: str
    answer: str


def load_questions(data_dir: str | Path, datasets: tuple[str, ...], limit: int | None = None) -> list[Question]:
    """The test questions of each dataset in order, the first `limit` of each if given."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be >= 1 (None: every question), got {limit!r}")
    questions = []
    for name in datasets:
        path = Path(data_dir) / name / "test.json"
        if not path.is_file():
            present = sorted(p.parent.name for p in Path(data_dir).glob("*/test.json"))
            raise FileNotFoundError(f"{path}: no such file (test sets in {data_dir}: {', '.join(present) or 'none'})")
        rows = files.read_json(path, DataError)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of rows, got {type(rows).__name__}")
        questions += [_question(row, name, i, path) for i, row in enumerate(rows[:limit])]
    return questions


def _question(row, dataset: str, index: int, path: Path) -> Question:
    where = f"{path}: row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for name in ("instruction", "answer"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise DataError(f"{where}: field '{name}' is missing, empty or not a string")
    answer = row["answer"].strip()
    gold = read_answer(dataset, answer)
    if gold is None or (isinstance(gold, str) and gold != answer):  # a label or letter must be exactly that
        if dataset in COMMONSENSE_LABELS:
            expected = "one of " + ", ".join(COMMONSENSE_LABELS[dataset])
        else:
            expected = "an option letter A-E" if dataset in LETTER_DATASETS else "a number"
        raise DataError(f"{where}: field 'answer' is {answer!r}, expected {expected}")
    return Question(f"{dataset}/{index}", dataset, row["instruction"].strip(), str(row.get("input") or ""), answer)


def parse_number(text: str) -> float | None:
    """The last number in `text` (thousands separators ignored), or None."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def parse_letter(text: str) -> str | None:
    """The last option letter A-E that stands alone in `text`, or None."""
    letters = _LETTER.findall(text)
    return letters[-1] if letters else None


def parse_label(text: str, dataset: str) -> str | None:
    """The first of `dataset`'s commonsense labels in `text` (case-sensitive, anywhere), or None."""
    match = re.search("|".join(COMMONSENSE_LABELS[dataset]), text)
    return match.group() if match else None


def read_answer(dataset: str, text: str) -> float | str | None:
    """What `text` answers, read as `dataset`'s answers are: a commonsense label, an option letter or a number."""
    if dataset in COMMONSENSE_LABELS:
        return parse_label(text, dataset)
    if dataset in LETTER_DATASETS:
        return parse_letter(text)
    return parse_number(text)


def prediction_record(question: Question, output: str) -> dict:
    """One answer: the raw output, what was read from it, and whether it is right."""
    pred, gold = read_answer(question.dataset, output), read_answer(question.dataset, question.answer)
    if isinstance(gold, float):
        correct = pred is not None and abs(pred - gold) <= 1e-3
    else:
        correct = pred == gold
    return {
        "pid": question.pid,
        "dataset": question.dataset,
        "output": output,
        "pred": pred,
        "answer": question.answer,
        "correct": correct,
    }


def score(records: list[dict], datasets: tuple[str, ...]) -> dict:
    """Accuracy (%) per dataset and their plain average (LLM-Adapters' 'Avg'), with counts and unparsed answers.

    A dataset without predictions has no accuracy (it is left out of the average); none at all is an error.
    """
    per = {name: [r for r in records if r["dataset"] == name] for name in datasets}
    accuracy = {name: 100 * sum(r["correct"] for r in rows) / len(rows) for name, rows in per.items() if rows}
    if not accuracy:  # an average of nothing is no score, not a 0
        raise ValueError(f"nothing to score: no prediction of any question of {', '.join(datasets)}")
    return {
        "accuracy": accuracy | {"Avg": sum(accuracy.values()) / len(accuracy)},
        "count": {name: len(rows) for name, rows in per.items()},
        "unparsed": {name: sum(r["pred"] is None for r in rows) for name, rows in per.items()},
    }


def format_table(scores: dict) -> str:
    """The accuracies as a Markdown table, one column per dataset and the average."""
    names = list(scores["accuracy"])
    return "\n".join(
        [
            "| " + " | ".join(names) + " |",
            "|" + "---|" * len(names),
            "| " + " | ".join(f"{scores['accuracy'][n]:.1f}" for n in names) + " |",
        ]
    )
