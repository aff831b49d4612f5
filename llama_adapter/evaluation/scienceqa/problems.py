"""A ScienceQA problem, and the checks of its fields that every source's reader shares (load.py, hub.py)."""

import ast
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import files
from ...data.sources import DataError

LETTERS = string.ascii_uppercase
MISSING_IMAGES = ("error", "text-only")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


@dataclass(frozen=True)
class Problem:
    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    hint: str  # the text context; "" when there is none
    image: Path | None  # absolute path of the question image, when it is named and the file is here
    names_image: bool  # the problem has a question image, whether or not the file is here
    subject: str | None  # "natural science", "social science" or "language science"; None when unknown
    grade: str | None  # "grade1" .. "grade12"; None when unknown
    split: str
    lecture: str = ""
    solution: str = ""
    caption: str = ""  # machine caption of the image (captions.json)
    ocr: str = ""  # text read from the image (ocrs.json), joined with ", "


def read_captions(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    captions = files.read_json(path, DataError)
    if not isinstance(captions, dict) or not isinstance(captions.get("captions"), dict):
        raise DataError(f"{path}: expected an object with a 'captions' object mapping pid -> text")
    return captions["captions"]


def read_ocr_texts(path: Path, pids: Iterable[str]) -> dict[str, str]:
    """The OCR text of each of `pids` that has some; only those are parsed, as the file covers every image."""
    if not path.exists():
        return {}
    ocrs = files.read_json(path, DataError)
    if not isinstance(ocrs, dict) or not isinstance(ocrs.get("texts"), dict):
        raise DataError(f"{path}: expected an object with a 'texts' object mapping pid -> OCR result")
    texts = ocrs["texts"]
    return {pid: _parse_ocr(texts[pid], f"{path}: pid {pid}") for pid in pids if pid in texts}


def _parse_ocr(value: Any, where: str) -> str:
    """easyocr's result, stored as the Python repr of a list of (box, text, confidence): the texts, joined."""
    try:
        # literal_eval, never eval: the file is data from the internet, and this accepts nothing but literals.
        boxes = ast.literal_eval(value) if isinstance(value, str) else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        boxes = None
    if not isinstance(boxes, (list, tuple)) or not all(
        isinstance(box, (list, tuple)) and len(box) == 3 and isinstance(box[1], str) for box in boxes
    ):
        raise DataError(f"{where}: OCR result is not a list of (box, text, confidence): {str(value)[:80]!r}")
    return ", ".join(box[1].strip() for box in boxes)


def checked_fields(record: dict, where: str) -> dict:
    """The fields every layout holds alike, checked: question, choices, answer, hint, subject, grade, lecture and
    solution, as keyword arguments of Problem."""
    choices = _choices(record, where)
    return {
        "question": text_field(record, "question", where, required=True),
        "choices": choices,
        "answer": _answer(record, len(choices), where),
        "hint": text_field(record, "hint", where),
        "subject": _subject(record, where),
        "grade": _grade(record, where),
        "lecture": text_field(record, "lecture", where),
        "solution": text_field(record, "solution", where),
    }


def text_field(record: dict, name: str, where: str, required: bool = False) -> str:
    """A string field; a required one must be present and non-empty, an optional one defaults to ""."""
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(
                f"{where}: field '{name}' is null" if name in record else f"{where}: missing field '{name}'"
            )
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _choices(record: dict, where: str) -> tuple[str, ...]:
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a non-empty list of strings, got {choices!r}")
    if len(choices) > len(LETTERS):
        raise DataError(f"{where}: field 'choices' has {len(choices)} options, more than letters A-Z")
    return tuple(choices)


def _answer(record: dict, num_choices: int, where: str) -> int:
    answer = record.get("answer")
    # bool is an int subclass; True as an answer is a broken file, not index 1.
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < num_choices:
        raise DataError(
            f"{where}: field 'answer' must be an integer index into the {num_choices} choices, got {answer!r}"
        )
    return answer


def _subject(record: dict, where: str) -> str:
    subject = record.get("subject")
    if not isinstance(subject, str) or subject not in SUBJECTS:
        raise DataError(f"{where}: field 'subject' must be one of {', '.join(SUBJECTS)}, got {subject!r}")
    return subject


def _grade(record: dict, where: str) -> str:
    grade = record.get("grade")
    if not isinstance(grade, str) or not re.fullmatch(r"grade([1-9]|1[0-2])", grade):
        raise DataError(f"{where}: field 'grade' must be 'grade1' .. 'grade12', got {grade!r}")
    return grade
