"""A predictions file: one JSON record per question, appended and flushed as each batch is answered, so a stopped
evaluation resumes where it stopped; beside it, the settings it was made with (`<out>.settings.json`), so that a
resumed run never adds lines that are not comparable with those already there."""

import json
import os
from pathlib import Path
from typing import IO

from .. import files
from ..data.sources import DataError


def settings_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".settings.json")


def check_resume_settings(out: str | Path, settings: dict) -> None:
    """Refuse to add to a predictions file made with other settings; record the settings of a new one."""
    path = settings_path(out)
    settings = json.loads(json.dumps(settings))  # as the file gives them back: tuples become lists
    if Path(out).exists() and path.exists():
        before = files.read_json(path)
        changed = {key: (before.get(key), value) for key, value in settings.items() if before.get(key) != value}
        if changed:
            raise ValueError(f"{out} was made with other settings {changed} (before, now); choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, settings)


def first_repeat(pids: list[str]) -> tuple[int, int] | None:
    """(where the first pid named a second time is, where it came first), as indices into `pids`; None if none is.

    A file holds one record per pid (`read_predictions`): a question asked twice must be refused before it is
    answered twice.
    """
    first: dict[str, int] = {}
    for index, pid in enumerate(pids):
        if pid in first:
            return index, first[pid]
        first[pid] = index
    return None


def read_predictions(path: str | Path, fields: tuple[str, ...] = ("pid",)) -> dict[str, dict]:
    """The records already written, by pid; {} when the file does not exist yet. Each must have `fields`.

    A last line without its newline was cut off by a crash: it is dropped, and the file truncated to the last
    complete line, so the next append starts on a fresh line instead of gluing onto the fragment.
    """
    path = Path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    records: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(complete.split(b"\n")[:-1], start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{path}: line {lineno}: not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("pid"), str):
            raise DataError(f"{path}: line {lineno}: expected an object with a string 'pid'")
        missing = [name for name in fields if name not in record]
        if missing:
            raise DataError(f"{path}: line {lineno}: not a prediction record: no {', '.join(missing)}")
        if record["pid"] in records:
            raise DataError(
                f"{path}: line {lineno}: pid {record['pid']} already predicted on line {lines[record['pid']]}"
            )
        records[record["pid"]] = record
        lines[record["pid"]] = lineno
    return records


def append_prediction(handle: IO[str], record: dict, fields: tuple[str, ...]) -> None:
    """Write one record as a JSON line and force it to disk, so a crash loses at most the line being written."""
    missing = [name for name in fields if name not in record]
    if missing:
        raise ValueError(f"prediction record lacks {', '.join(missing)}")
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())
