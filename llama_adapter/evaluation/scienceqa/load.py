"""ScienceQA's problems from its three sources.

- the official layout (`problems.json`, `pid_splits.json`, `images/<split>/<pid>/...`, with optional
  `captions.json` and `ocrs.json`), read by `load_problems`;
- the Hugging Face hub's layout (`derek-thomas/ScienceQA`: Parquet, images embedded), read by `load_problems` too,
  through hub.py;
- LLaVA's `llava_test_CQM-A.json`, which holds all 4241 test questions but no subject, grade or rationale, read by
  `load_llava_questions`.

Every field is checked; a bad one is a DataError naming the file and the problem.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

from ... import files
from ...data.sources import DataError
from ..predictions import first_repeat
from .hub import load_hub_problems
from .problems import LETTERS, MISSING_IMAGES, Problem, checked_fields, read_captions, read_ocr_texts, text_field


def load_problems(
    source: str | Path,
    split: str,
    problems_file: str = "problems.json",
    splits_file: str = "pid_splits.json",
    missing_images: str = "error",
    config: str | None = None,
) -> tuple[list[Problem], int]:
    """The problems of `split`, in split order, and how many of them name an image whose file is not here.

    `source` is a folder in the official layout (it holds `problems_file`, `splits_file` or `images/`), or else a
    table in the hub's layout (hub.py): a hub dataset name (with its configuration `config`), a Parquet file, a
    folder of data files or a `save_to_disk` folder. That layout embeds its images, so none is ever missing.

    Official layout: pids listed for the split but absent from the problems file are skipped, so a partial
    problems file works. Without a splits file, problems are chosen by their own "split" field.
    `missing_images="error"` stops at problems whose image file is missing; "text-only" keeps them without an image
    and counts them.
    """
    if missing_images not in MISSING_IMAGES:
        raise ValueError(f"missing_images must be one of {MISSING_IMAGES}, got {missing_images!r}")
    if not _is_official_folder(Path(source), problems_file, splits_file):
        return load_hub_problems(source, split, config), 0
    return _load_official(Path(source), split, problems_file, splits_file, missing_images)


def _is_official_folder(path: Path, problems_file: str, splits_file: str) -> bool:
    """A folder with the official layout's files: a misnamed problems file is then named as missing."""
    return path.is_dir() and any((path / name).exists() for name in (problems_file, splits_file, "images"))


def _load_official(
    data_dir: Path, split: str, problems_file: str, splits_file: str, missing_images: str
) -> tuple[list[Problem], int]:
    data_dir = Path(data_dir).resolve()
    problems_path = data_dir / problems_file
    records = files.read_json(problems_path, DataError)
    if not isinstance(records, dict):
        raise DataError(f"{problems_path}: expected an object mapping pid -> problem, got {type(records).__name__}")
    pids = _split_pids(data_dir / splits_file, records, problems_path, split)
    if not pids:
        raise DataError(f"{problems_path}: no problems of split '{split}'")
    captions = read_captions(data_dir / "captions.json")
    ocrs = read_ocr_texts(data_dir / "ocrs.json", pids)
    problems = [
        _problem_from_record(
            records[pid], pid, f"{problems_path}: problem {pid}", data_dir, captions.get(pid, ""), ocrs.get(pid, "")
        )
        for pid in pids
    ]
    missing = [p for p in problems if p.names_image and p.image is None]
    if missing and missing_images == "error":
        first = missing[0]
        raise DataError(
            f"{problems_path}: problem {first.pid}: image {_image_path(data_dir, records[first.pid], first.pid)} "
            f"not found ({len(missing)} of {len(problems)} problems of split '{split}' lack their image); "
            "--missing-images text-only evaluates such problems without the image"
        )
    return problems, len(missing)


def _split_pids(splits_path: Path, records: dict, problems_path: Path, split: str) -> list[str]:
    if not splits_path.exists():
        by_field = {}
        for pid, record in records.items():
            by_field.setdefault(record.get("split") if isinstance(record, dict) else None, []).append(pid)
        if split not in by_field:
            available = sorted(s for s in by_field if isinstance(s, str))
            raise DataError(f"{problems_path}: no problem has split '{split}'; available: {', '.join(available)}")
        return by_field[split]
    splits = files.read_json(splits_path, DataError)
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f"{splits_path}: expected an object mapping split name -> list of pids")
    if split not in splits:
        raise DataError(f"{splits_path}: unknown split '{split}'; available: {', '.join(splits)}")
    pids = [str(pid) for pid in splits[split]]
    repeat = first_repeat(pids)
    if repeat is not None:
        raise DataError(f"{splits_path}: split '{split}' names problem {pids[repeat[0]]} twice")
    return [pid for pid in pids if pid in records]


def _image_path(data_dir: Path, record: dict, pid: str) -> Path:
    return data_dir / "images" / record["split"] / pid / record["image"]


def _problem_from_record(record: Any, pid: str, where: str, data_dir: Path, caption: str, ocr: str) -> Problem:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    image_name = record.get("image")
    if image_name is not None and not (isinstance(image_name, str) and image_name.strip()):
        raise DataError(f"{where}: field 'image' must be a file name or null, got {image_name!r}")
    split = text_field(record, "split", where, required=True)
    image = _image_path(data_dir, record, pid) if image_name else None
    return Problem(
        pid=pid,
        **checked_fields(record, where),
        image=image if image is not None and image.is_file() else None,
        names_image=image is not None,
        split=split,
        caption=caption,
        ocr=ocr,
    )


def load_llava_questions(path: str | Path, data_dir: str | Path | None = None) -> list[Problem]:
    """All test questions from LLaVA's `llava_test_CQM-A.json`, with the image, caption and OCR from `data_dir`.

    The human turn is "[<image>\\n][Context: <hint>\\n]<question>\\nA. <choice>\\nB. <choice>...", the gpt turn the
    answer letter. Question and hint both may span lines, so where they meet is ambiguous: the question is taken to
    be the last line before the options whenever there is a context (true for all but a few percent of problems,
    whose first question lines then land in the hint; see tests/test_scienceqa.py).
    """
    path = Path(path)
    entries = files.read_json(path, DataError)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of questions, got {type(entries).__name__}")
    problems = [_problem_from_llava(entry, f"{path}: entry {i}") for i, entry in enumerate(entries)]
    repeat = first_repeat([problem.pid for problem in problems])
    if repeat is not None:
        again, first = repeat
        pid = problems[again].pid
        raise DataError(f"{path}: entry {again} (id {pid}): id {pid} again (entry {first} has it too)")
    if data_dir is None:
        return problems
    data_dir = Path(data_dir).resolve()
    captions = read_captions(data_dir / "captions.json")
    ocrs = read_ocr_texts(data_dir / "ocrs.json", [p.pid for p in problems if p.names_image])
    return [_with_image_context(p, data_dir, captions, ocrs) for p in problems]


def _problem_from_llava(entry: Any, where: str) -> Problem:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise DataError(f"{where}: expected an object with a string 'id'")
    where = f"{where} (id {entry['id']})"
    turns = entry.get("conversations")
    if (
        not isinstance(turns, list)
        or len(turns) != 2
        or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)
        or [t.get("from") for t in turns] != ["human", "gpt"]
    ):
        raise DataError(f"{where}: 'conversations' must be one human turn and one gpt turn with string values")
    image = entry.get("image")
    if image is not None and image != f"{entry['id']}/image.png":
        raise DataError(f"{where}: field 'image' must be '<id>/image.png', got {image!r}")
    question, hint, choices = _parse_llava_question(turns[0]["value"], where)
    letter = turns[1]["value"].strip()
    if len(letter) != 1 or letter not in LETTERS[: len(choices)]:
        raise DataError(f"{where}: answer {letter!r} is not one of the letters of the {len(choices)} options")
    return Problem(
        pid=entry["id"],
        question=question,
        choices=choices,
        answer=LETTERS.index(letter),
        hint=hint,
        image=None,
        names_image=image is not None,
        subject=None,
        grade=None,
        split="test",
    )


def _parse_llava_question(text: str, where: str) -> tuple[str, str, tuple[str, ...]]:
    """(question, hint, choices) from a human turn; see `load_llava_questions` for its layout."""
    text = text.removeprefix("<image>\n")  # where LLaVA splices in the image features
    # The last "A. " line starts the options: the question and hint can contain "A. " only before it.
    start = text.rfind("\nA. ")
    if start < 0:
        raise DataError(f"{where}: no options: expected lines 'A. ...', 'B. ...' at the end of the question")
    head, options = text[:start], text[start + 1 :]
    if head.startswith("Context: "):
        hint, newline, question = head.removeprefix("Context: ").rpartition("\n")
        if not newline:
            raise DataError(f"{where}: no question between the context and the options")
    else:
        hint, question = "", head
    if not question.strip():
        raise DataError(f"{where}: no question before the options")
    return question, hint, _split_options(options)


def _split_options(options: str) -> tuple[str, ...]:
    """'A. x\\nB. y' -> ('x', 'y'); an option may itself span lines (the closing of a letter, a poem)."""
    starts = [0]
    for letter in LETTERS[1:]:
        at = options.find(f"\n{letter}. ", starts[-1])
        if at < 0:
            break
        starts.append(at + 1)
    ends = [s - 1 for s in starts[1:]] + [len(options)]
    return tuple(options[s + 3 : e] for s, e in zip(starts, ends))


def _with_image_context(problem: Problem, data_dir: Path, captions: dict[str, str], ocrs: dict[str, str]) -> Problem:
    if not problem.names_image:
        return problem
    # LLaVA names every question image "<pid>/image.png", under the test split's folder.
    image = data_dir / "images" / "test" / problem.pid / "image.png"
    return replace(
        problem,
        image=image if image.is_file() else None,
        caption=captions.get(problem.pid, ""),
        ocr=ocrs.get(problem.pid, ""),
    )
