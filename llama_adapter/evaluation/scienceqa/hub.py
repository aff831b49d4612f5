"""ScienceQA as the Hugging Face hub holds it (`derek-thomas/ScienceQA`): a table per split, a row per problem.

The columns are image (a `datasets` Image: the PNG's bytes, or None for a problem without one), question, choices
(a list of strings), answer (the index of the right choice), hint, subject, grade, lecture and solution; task,
topic, category and skill are not used. The table comes from `sources.open_table`: the hub, a local Parquet or CSV
file, a folder of data files (a clone of the hub repository) or a `save_to_disk` folder. Two optional columns:
- `pid` (or `id`) names the problems. Without one, a problem is named by its split and row, "test-17", stable for a
  given table. Captions and OCR are found by pid, so only a table with pids gets them: from `captions.json` and
  `ocrs.json` beside its file (or in its folder), as in the official layout;
- `split`: one table holding several splits, of which only the rows of the asked split are read.
The hub calls ScienceQA's "val" split "validation": either name finds either, and the problems carry "val", as
the official files have it. Images are written once to content-addressed files (`sources.stored_image`), so that
`Problem.image` is a file, as for the official layout. A problem without an image names none: nothing is missing.
"""

import os
from dataclasses import replace

import datasets

from ...data import sources
from ...data.sources import DataError
from .problems import Problem, checked_fields, read_captions, read_ocr_texts

REQUIRED = ("question", "choices", "answer", "subject", "grade")
PID_COLUMNS = ("pid", "id")  # the first one the table has names its problems
OTHER_NAME = {"val": "validation", "validation": "val"}  # the official split name <-> the hub's
BATCH_ROWS = 256  # rows read at a time, images (undecoded bytes) included


def load_hub_problems(source: str | os.PathLike, split: str, config: str | None = None) -> list[Problem]:
    """The problems of `split` in the table `source` holds (see the module docstring), in table order."""
    table, opened = _open(source, split, config)
    name = _name(source, opened, config)
    missing = [column for column in REQUIRED if column not in table.column_names]
    if missing:
        raise DataError(f"{name}: no column {' or '.join(missing)} (columns: {', '.join(table.column_names)})")
    pid_column = next((column for column in PID_COLUMNS if column in table.column_names), None)
    problem_split = "val" if split in OTHER_NAME else split
    wanted = {split, OTHER_NAME.get(split, split)}
    problems, row_of_pid, splits_seen = [], {}, set()
    for row, record in enumerate(_records(sources.undecoded_images(table))):
        where = f"{name}: row {row}"
        if "split" in record:
            splits_seen.add(str(record["split"]))
            if record["split"] not in wanted:
                continue
        pid = _pid(record[pid_column], pid_column, where) if pid_column else f"{problem_split}-{len(problems)}"
        if pid in row_of_pid:
            raise DataError(f"{where}: pid {pid} again (row {row_of_pid[pid]} has it too)")
        row_of_pid[pid] = row
        problems.append(_problem(record, pid, problem_split, where))
    if not problems and splits_seen:
        raise DataError(f"{name}: no row has split '{split}'; available: {', '.join(sorted(splits_seen))}")
    if not problems:
        raise DataError(f"{name}: no problems of split '{split}'")
    return _with_image_context(problems, source) if pid_column else problems


def _open(source, split: str, config: str | None) -> tuple[datasets.Dataset, str]:
    """The table of `split`, or of its other name when the source has no split of that name; and the split opened."""
    if sources.kind(source) == "json":
        raise DataError(
            f"{source}: a JSON file: ScienceQA's official layout is a folder (--data the folder, --problems the "
            "problems file in it); the hub's layout is Parquet"
        )
    try:
        return sources.open_table(source, split, config), split
    except DataError as asked:
        other = OTHER_NAME.get(split)
        if other is None or sources.kind(source) in ("csv", "parquet"):  # a whole file: the split is no matter
            raise
        try:
            return sources.open_table(source, other, config), other
        except DataError:
            raise asked from None  # the error that names the split asked for


def _name(source, split: str, config: str | None) -> str:
    """How messages name the table: the file, the folder and its split, or the hub dataset and its split."""
    source_kind = sources.kind(source)
    if source_kind in ("saved", "folder"):
        return f"{source} [{split}]"
    return sources.describe(source, split, config)


def _records(table: datasets.Dataset):
    """The rows of `table` as dicts, read a batch at a time."""
    for batch in table.iter(batch_size=BATCH_ROWS):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _pid(value, column: str, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(f"{where}: field '{column}' must be a non-empty string or an integer, got {value!r}")


def _problem(record: dict, pid: str, split: str, where: str) -> Problem:
    image = sources.image_bytes(record.get("image"), f"{where}: field 'image'")
    return Problem(
        pid=pid,
        **checked_fields(record, where),
        image=sources.stored_image(image) if image is not None else None,
        names_image=image is not None,
        split=split,
    )


def _with_image_context(problems: list[Problem], source) -> list[Problem]:
    """Captions and OCR texts by pid, from the files beside a local table (none for a hub dataset)."""
    if sources.kind(source) == "hub":
        return problems
    folder = sources.relative_folder(source)
    captions = read_captions(folder / "captions.json")
    ocrs = read_ocr_texts(folder / "ocrs.json", [p.pid for p in problems])
    return [replace(p, caption=captions.get(p.pid, ""), ocr=ocrs.get(p.pid, "")) for p in problems]
