"""The math reasoning benchmarks of LLM-Adapters (Hu et al. 2023): questions, answer extraction, scores.

Each dataset folder holds test.json, a list of {instruction, input, output, answer} rows in Alpaca format. The
model answers the instruction; as in LLM-Adapters, the last number in its answer is compared with the gold number
(within 0.001), and for AQuA the option letter. LLM-Adapters takes the first capital A-E anywhere in the text, so
"Answer: (C)" would read as A; here it is the last letter A-E that stands alone, which is what "The answer is C."
(the form math_data.json trains) ends with.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config import option
from .data import DataError

MATH_DATASETS = ("gsm8k", "SVAMP", "MultiArith", "AddSub", "AQuA", "SingleEq")
LETTER_DATASETS = {"AQuA"}
PREDICTION_FIELDS = ("pid", "dataset", "output", "pred", "answer", "correct")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-E])\b")


@dataclass
class MathEvalConfig:
    """Which math test sets, where the predictions go, and how long answers may be."""

    data: str = option("LLM-Adapters dataset folder (holds <dataset>/test.json)")
    out: str = option("predictions JSONL; an existing file is resumed; scores go beside it (.scores.json)")
    adapter: str | None = option("adapter folder (default: the base model with no adapter)", None)
    datasets: tuple[str, ...] = option("test sets, by folder name", MATH_DATASETS)
    batch_size: int = option("questions per batch", 16)
    max_new_tokens: int = option("answer length limit (the rationale comes before the number)", 256)
    limit: int | None = option("evaluate only the first N questions of each test set (a quick look)", None)

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.datasets:
            raise ValueError("datasets must name at least one test set")
        if len(set(self.datasets)) < len(self.datasets):
            raise ValueError(f"datasets names a test set twice: {list(self.datasets)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        self.datasets = tuple(self.datasets)


@dataclass(frozen=True)
class Question:
    pid: str  # "<dataset>/<row index>"
    dataset: str
    instruction: str
    input: str
    answer: str


def load_questions(data_dir: str | Path, datasets: tuple[str, ...], limit: int | None = None) -> list[Question]:
    """The test questions of each dataset in order, the first `limit` of each if given."""
    questions = []
    for name in datasets:
        path = Path(data_dir) / name / "test.json"
        if not path.is_file():
            present = sorted(p.parent.name for p in Path(data_dir).glob("*/test.json"))
            raise FileNotFoundError(f"{path}: no such file (test sets in {data_dir}: {', '.join(present) or 'none'})")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of rows, got {type(rows).__name__}")
        questions += [_question(row, name, i, path) for i, row in enumerate(rows[:limit] if limit else rows)]
    return questions


def _question(row, dataset: str, index: int, path: Path) -> Question:
    where = f"{path}: row {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    for name in ("instruction", "answer"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise DataError(f"{where}: field '{name}' is missing, empty or not a string")
    answer = row["answer"].strip()
    if dataset in LETTER_DATASETS and answer not in ("A", "B", "C", "D", "E"):
        raise DataError(f"{where}: field 'answer' is {answer!r}, expected an option letter A-E")
    if dataset not in LETTER_DATASETS and parse_number(answer) is None:
        raise DataError(f"{where}: field 'answer' is {answer!r}, expected a number")
    return Question(f"{dataset}/{index}", dataset, row["instruction"].strip(), str(row.get("input") or ""), answer)


def parse_number(text: str) -> float | None:
    """The last number in `text` (thousands separators ignored), or None."""
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def parse_letter(text: str) -> str | None:
    """The last option letter A-E that stands alone in `text`, or None."""
    letters = _LETTER.findall(text)
    return letters[-1] if letters else None


def prediction_record(question: Question, output: str) -> dict:
    """One answer: the raw output, what was read from it, and whether it is right."""
    if question.dataset in LETTER_DATASETS:
        pred = parse_letter(output)
        correct = pred == question.answer
    else:
        pred = parse_number(output)
        correct = pred is not None and abs(pred - float(question.answer)) <= 1e-3
    return {
        "pid": question.pid,
        "dataset": question.dataset,
        "output": output,
        "pred": pred,
        "answer": question.answer,
        "correct": correct,
    }


def score(records: list[dict], datasets: tuple[str, ...]) -> dict:
    """Accuracy (%) per dataset and their plain average (LLM-Adapters' 'Avg'), with counts and unparsed answers."""
    per = {name: [r for r in records if r["dataset"] == name] for name in datasets}
    accuracy = {name: 100 * sum(r["correct"] for r in rows) / len(rows) for name, rows in per.items() if rows}
    return {
        "accuracy": accuracy | {"Avg": sum(accuracy.values()) / len(accuracy) if accuracy else 0.0},
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
