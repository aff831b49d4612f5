"""More science problems for ScienceQA training: LLM-Adapters' multiple-choice train sets (ARC-Easy, ARC-Challenge,
OpenBookQA) read as ScienceQA problems, so that `to_rows` asks them in ScienceQA's prompt shape.

Their rows are {instruction, input, output, answer} with the instruction
"Please choose the correct answer to the question: Q\\n\\nAnswer1: x Answer2: y ...\\n\\nAnswer format: answer1/..."
and the answer "answerK". They have no context, image, lecture or solution, so only answer-only targets fit them.
"""

import re
from pathlib import Path

from ... import files
from ...data.sources import DataError
from .problems import LETTERS, Problem

_INSTRUCTION = re.compile(
    r"Please choose the correct answer to the question: (?P<question>.+?)\n\n(?P<options>Answer1: .+)\n\n"
    r"Answer format: (?P<labels>answer1(?:/answer\d)*)",
    re.DOTALL,
)
_OPTION = re.compile(r"(?:^|\s+)Answer(\d): ")


def load_choice_problems(path: str | Path) -> list[Problem]:
    """Every row of an LLM-Adapters multiple-choice train.json as a `Problem` with pid '<file>:<row>'; a row
    that is not such a question is a DataError naming the file, the row and what is wrong."""
    rows = files.read_json(path, DataError)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: no rows")
    return [
        _problem(row, f"{path}: row {index}", f"{Path(path).parent.name}:{index}") for index, row in enumerate(rows)
    ]


def _problem(row, where: str, pid: str) -> Problem:
    if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("instruction", "answer")):
        raise DataError(f"{where}: expected an object with string fields 'instruction' and 'answer'")
    found = _INSTRUCTION.fullmatch(row["instruction"].strip())
    if found is None:
        raise DataError(
            f"{where}: field 'instruction' is not \"Please choose the correct answer to the question: ...\" followed "
            "by options 'Answer1: ...' and an 'Answer format: answer1/...' line"
        )
    parts = _OPTION.split(found["options"])[1:]  # [label, text, label, text, ...]
    labels, choices = parts[0::2], tuple(text.strip() for text in parts[1::2])
    if labels != [str(n) for n in range(1, len(labels) + 1)] or len(choices) > len(LETTERS) or not all(choices):
        raise DataError(f"{where}: options must be non-empty and numbered Answer1, Answer2, ... in order")
    if len(found["labels"].split("/")) != len(choices):
        raise DataError(f"{where}: 'Answer format' names {found['labels']} but the question has {len(choices)} options")
    answer = row["answer"].strip()
    if not re.fullmatch(r"answer\d", answer) or not 1 <= int(answer[-1]) <= len(choices):
        raise DataError(f"{where}: field 'answer' is {answer!r}, expected one of answer1..answer{len(choices)}")
    return Problem(
        pid=pid, question=found["question"].strip(), choices=choices, answer=int(answer[-1]) - 1, hint="",
        image=None, names_image=False, subject=None, grade=None, split="train",
    )  # fmt: skip
