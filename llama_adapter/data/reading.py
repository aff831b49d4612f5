"""Training rows from any source (sources.py), every field checked: Alpaca rows {instruction, input, output[, image]}
or conversations (conversations.py: OpenAI's `messages`, ShareGPT's `conversations`, each with an optional image).

A bad row is a DataError naming its file and row (or, with `skipped`, left out and counted); checked tables are
cached in the datasets cache, keyed by the file's content and by these checks' own code (CHECKS)."""

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np

from .. import files
from . import conversations, sources
from .sources import DataError
from .templates import check_text

# A row this long is a broken file (a whole document pasted into a field), not an instruction: refused before it
# is tokenised, which would cost seconds and gigabytes for nothing, as at most max_len tokens of it are trained.
MAX_ROW_CHARS = 1_000_000
BadRows = list[tuple[str, str]]  # (where, why): the rows left out by `load_rows(..., skipped=...)`
FIELDS = ("instruction", "input", "output")
COLUMNS = FIELDS + ("image", "messages")  # what --columns may rename ("messages": either conversation shape)
ROW_KEYS = set(FIELDS) | set(conversations.FIELDS)  # an object with none of them is not a row

# Checked rows, and for a bad row where it is and why it is bad instead (kept in the table, so that a cached table
# still knows its bad rows).
# A conversation's messages are kept as JSON text (conversations.checked_messages); an Alpaca row's is None.
CHECKED = datasets.Features({name: datasets.Value("string") for name in COLUMNS + ("bad_at", "bad_why")})


def load_rows(
    source: str | os.PathLike,
    skipped: BadRows | None = None,
    *,
    split: str = "train",
    config: str | None = None,
    columns: dict[str, str] | None = None,
) -> datasets.Dataset:
    """Alpaca rows {instruction, input, output, image} from any source `sources.py` opens, every row checked.

    `columns` maps our field names to the source's where they differ ({"instruction": "prompt"}). An image is a
    file path relative to the data's folder, or an image stored in the dataset; a text-only row's image is None.
    A bad row -- a JSONL line that is not UTF-8 or not JSON, a CSV row that is not UTF-8, not valid CSV or not as
    many fields as the header, a missing, mistyped or empty field, more than MAX_ROW_CHARS characters -- raises
    DataError naming the source and the row or line; given a `skipped` list, the row is left out and (where, why)
    appended to it instead. A source that cannot be read as a whole always raises.
    The rows are a memory-mapped Arrow table: a large file is never held in memory (a JSON list is parsed whole
    once; JSONL, CSV and Parquet never are).
    """
    columns = check_columns(columns or {})
    kind = sources.kind(source)
    if kind in ("json", "csv"):
        checked = _checked_file(Path(source), kind, columns)
    else:
        table = sources.undecoded_images(sources.open_table(source, split, config))
        if not len(table):
            raise DataError(f"{sources.describe(source, split, config)}: no rows")
        checked = _checked_table(table, sources.describe(source, split, config), source, columns)
    return _good_rows(checked, skipped, sources.describe(source, split, config))


def as_rows(rows) -> datasets.Dataset:
    """Rows given as a list of dicts (the Python API, ScienceQA's problems) as a checked table like `load_rows`'s."""
    if isinstance(rows, datasets.Dataset):
        return rows
    if not rows:
        raise DataError("no rows")
    checked = [_checked(record, f"row {i}", Path.cwd(), {}) for i, record in enumerate(rows)]
    return _good_rows(datasets.Dataset.from_list(checked, features=CHECKED), None, "rows")


def check_columns(columns: dict[str, str]) -> dict[str, str]:
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise DataError(f"columns: cannot rename {', '.join(sorted(unknown))}; the fields are {', '.join(COLUMNS)}")
    taken = list(columns.values())
    if len(set(taken)) < len(taken) or any(not name.strip() for name in taken):
        raise DataError(f"columns: each field needs its own non-empty source column, got {columns}")
    return columns


def parse_columns(text: str) -> dict[str, str]:
    """--columns "instruction=prompt,output=completion" as {"instruction": "prompt", "output": "completion"}."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if any(not sep for _, sep, _ in pairs):
        raise DataError(f"columns: expected field=column pairs separated by commas, got {text!r}")
    columns = {field.strip(): column.strip() for field, _, column in pairs}
    if len(columns) < len(pairs):
        raise DataError(f"columns: a field is renamed twice in {text!r}")
    return check_columns(columns)


UTF8_BOM = b"\xef\xbb\xbf"


def _checked_file(path: Path, kind: str, columns: dict[str, str]) -> datasets.Dataset:
    """A JSON list, JSONL or CSV file, checked row by row into an Arrow table (cached: keyed by the file's content)."""
    layout = _csv_layout(path, columns) if kind == "csv" else _json_layout(path)
    kwargs = {"path": str(path), "layout": layout, "columns": columns, "sha256": files.sha256(path), "checks": CHECKS}
    try:
        return datasets.Dataset.from_generator(_file_records, gen_kwargs=kwargs, features=CHECKED)
    except datasets.exceptions.DatasetGenerationError as err:
        raise err.__cause__ if isinstance(err.__cause__, DataError) else err from None


def _csv_layout(path: Path, columns: dict[str, str]) -> str:
    """ "csv", refusing a file whose header lacks a column the rows need (a whole-file error, not one per row)."""
    _check_has_columns(sources.csv_header(path), str(path), columns)
    return "csv"


def _json_layout(path: Path) -> str:
    """ "list" or "lines", refusing a file without rows or one JSON object that wraps them ({"data": [...]})."""
    with open(path, "rb") as handle:
        first = next((line for line in handle if line.strip()), b"").removeprefix(UTF8_BOM).strip()
    if not first:
        raise DataError(f"{path}: no rows")
    if path.suffix != ".jsonl" and first.startswith(b"["):
        return "list"  # parsed once, by `_json_list`, which also refuses an empty one
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):
        record = None  # a bad first line, or an object spread over lines
    if not isinstance(record, dict) or not record.keys() & ROW_KEYS:
        _refuse_wrapped_rows(files.read_bytes(path, DataError).removeprefix(UTF8_BOM), path)
    return "lines"


def _file_records(path: str, layout: str, columns: dict[str, str], sha256: str, checks: str) -> Iterator[dict]:
    """Each record of the file, checked (`sha256` and `checks` only key the cache)."""
    folder = Path(path).parent
    records = {"list": _json_list, "lines": _jsonl_records, "csv": _csv_records}[layout]
    for where, record in records(Path(path)):
        yield _checked(record, where, folder, columns)


def _refuse_wrapped_rows(raw: bytes, path: Path) -> None:
    """A JSON object that holds the rows (say {"data": [...]}) is neither format: say so, rather than report its
    first line as a bad row."""
    try:
        whole = json.loads(raw)
    except (ValueError, RecursionError):
        return  # JSONL, or broken: the lines tell which
    if isinstance(whole, dict) and not whole.keys() & ROW_KEYS:
        keys = ", ".join(repr(key) for key in list(whole)[:5])
        raise DataError(
            f"{path}: one JSON object (keys {keys}), not rows: expected a JSON list of rows, or JSONL (one row "
            "object per line) with fields instruction, input, output, or a conversation in 'messages'"
        )


def _json_list(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each element of a JSON list; a list that does not parse, or is empty, has no rows to keep
    (a DataError, which `_checked_file` raises as it is)."""
    raw = files.read_bytes(path, DataError).removeprefix(UTF8_BOM)
    records = files.parse_json(raw, path, DataError, text_only=False)  # each row's fields are checked: skippable
    if not records:
        raise DataError(f"{path}: no rows")
    for i, record in enumerate(records):
        yield f"{path}: row {i}", record


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line, read one at a time; a line that is not UTF-8 JSON gets its
    DataError as the record."""
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.removeprefix(UTF8_BOM) if lineno == 1 else line  # editors on Windows start files with one
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                yield where, json.loads(line.decode("utf-8"))
            except RecursionError:
                yield where, DataError(f"{where}: JSON nested too deeply to read")
            except UnicodeDecodeError as err:
                yield where, DataError(f"{where}: not UTF-8 text (byte {err.start} of the line)")
            except json.JSONDecodeError as err:
                yield where, DataError(f"{where}: invalid JSON: {err.msg}")


def _csv_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each row below the header, its cells text keyed by the header's names; a row that is not
    valid CSV, not as many fields as the header or not UTF-8 gets its DataError as the record. A header with no rows
    below it is a DataError, which `_checked_file` raises as it is."""
    records = sources.csv_records(path)
    header = next(records)  # checked by `_csv_layout`
    row = -1
    for row, cells in enumerate(records):
        where = f"{path}: row {row}"
        yield where, _csv_record(cells, header, where)
    if row < 0:
        raise DataError(f"{path}: no rows")


def _csv_record(cells: list[str] | csv.Error, header: list[str], where: str) -> dict | DataError:
    if isinstance(cells, csv.Error):
        unclosed = str(cells) == "unexpected end of data"  # how the csv module says the file ended inside quotes
        return DataError(f"{where}: " + ("a quoted field that never closes" if unclosed else f"not valid CSV: {cells}"))
    if len(cells) != len(header):
        return DataError(f"{where}: {len(cells)} field(s) where the header names {len(header)}")
    for name, cell in zip(header, cells):
        at = sources.not_utf8(cell)
        if at is not None:
            return DataError(f"{where}: field '{name}': not UTF-8 text (byte {at} of the field)")
    return dict(zip(header, cells))


def _checked_table(
    table: datasets.Dataset, name: str, source: str | os.PathLike, columns: dict[str, str]
) -> datasets.Dataset:
    """A table's rows, checked; the result is cached in the datasets cache, never written beside the data."""
    folder = sources.relative_folder(source)
    _check_has_columns(table.column_names, name, columns)
    settings = {"name": name, "folder": str(folder), "columns": columns}
    fingerprint = files.digest(table._fingerprint, settings, CHECKS)
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "llama-adapter-rows" / f"{fingerprint}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    return table.map(
        _checked_batch, batched=True, with_indices=True, fn_kwargs=settings, remove_columns=table.column_names,
        features=CHECKED, cache_file_name=str(cache), new_fingerprint=fingerprint, desc="checking rows",
    )  # fmt: skip


def _check_has_columns(names: list[str], source: str, columns: dict[str, str]) -> None:
    talks = [columns["messages"]] if "messages" in columns else conversations.FIELDS
    missing = {columns.get(field, field) for field in ("instruction", "output")} - set(names)
    if missing and not set(talks) & set(names):
        raise DataError(
            f"{source}: no column {' or '.join(sorted(missing))} (columns: {', '.join(names)}); "
            "--columns maps the fields to yours, e.g. --columns instruction=prompt,output=completion; a conversation is "
            "a column 'messages' or 'conversations' (--columns messages=yours)"
        )


def _checked_batch(batch: dict, indices: list[int], name: str, folder: str, columns: dict[str, str]) -> dict:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    checked = [_checked(record, f"{name}: row {i}", Path(folder), columns) for record, i in zip(records, indices)]
    return {key: [row[key] for row in checked] for key in CHECKED}


def _checked(record, where: str, folder: Path, columns: dict[str, str]) -> dict:
    """A row as the table holds it: checked fields, or where and why it is bad."""
    try:
        if isinstance(record, DataError):
            raise record
        return _check_row(record, where, folder, columns) | {"bad_at": None, "bad_why": None}
    except DataError as err:
        return dict.fromkeys(COLUMNS) | {"bad_at": where, "bad_why": str(err).removeprefix(f"{where}: ")}


def _good_rows(checked: datasets.Dataset, skipped: BadRows | None, name: str) -> datasets.Dataset:
    """The good rows of a checked table; a bad one raises, or with a `skipped` list goes there."""
    bad = np.flatnonzero(checked.data.column("bad_at").is_valid().to_numpy(zero_copy_only=False))
    if len(bad) and skipped is None:
        first = checked[int(bad[0])]
        raise DataError(f"{first['bad_at']}: {first['bad_why']}")
    if len(bad):
        for start in range(0, len(bad), 1000):
            for row in checked.select(bad[start : start + 1000]):
                skipped.append((row["bad_at"], row["bad_why"]))
        if len(bad) == len(checked):
            raise DataError(f"{name}: no usable rows: all {len(checked)} are bad")
        checked = checked.select(np.setdiff1d(np.arange(len(checked)), bad))
    talks = checked.data.column("messages").null_count < len(checked)
    # Alpaca rows keep the four fields they always had; a table with a conversation has the messages of each row.
    return checked.remove_columns(["bad_at", "bad_why"] + ([] if talks else ["messages"]))


def _check_row(record, where: str, folder: Path, columns: dict[str, str]) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
    talk = conversations.conversation_field(record, columns)
    if talk is not None:
        return _check_conversation(record, talk, where, folder, columns)
    row = {"messages": None}
    for field in FIELDS:
        name = columns.get(field, field)
        required = field != "input"  # an absent or null input means none, as in Alpaca's own data
        if required and name not in record:
            raise DataError(f"{where}: missing field '{name}'")
        value = record.get(name)
        if value is None and required:
            raise DataError(f"{where}: field '{name}' is null")
        value = "" if value is None else value
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        check_text(value, f"{where}: field '{name}'")
        row[field] = value
    size = sum(len(row[field]) for field in FIELDS)
    if size > MAX_ROW_CHARS:
        raise DataError(f"{where}: {size:,} characters, more than the {MAX_ROW_CHARS:,} a row may hold")
    name = columns.get("image", "image")
    row["image"] = _image(record.get(name), f"{where}: field '{name}'", folder)
    return row


def _check_conversation(record: dict, talk: str, where: str, folder: Path, columns: dict[str, str]) -> dict:
    messages = conversations.checked_messages(record[talk], f"{where}: field '{talk}'")
    if len(messages) > MAX_ROW_CHARS:
        raise DataError(f"{where}: {len(messages):,} characters, more than the {MAX_ROW_CHARS:,} a row may hold")
    name = columns.get("image", "image")
    image = record.get(name)
    if image is None and record.get("images") is not None:  # TRL's column: a list, of which we take one
        images, name = record["images"], "images"
        images = images.tolist() if hasattr(images, "tolist") else images
        if not isinstance(images, list) or len(images) > 1:
            raise DataError(f"{where}: field 'images' must be a list of at most one image (one per conversation)")
        image = images[0] if images else None
    row = dict.fromkeys(FIELDS) | {"messages": messages}
    return row | {"image": _image(image, f"{where}: field '{name}'", folder)}


def _image(value, where: str, folder: Path) -> str | None:
    """An image file's path: a path relative to the data's folder, or an image stored in the dataset as bytes."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return str(folder / value)
    if isinstance(value, dict):
        return str(sources.stored_image(sources.image_bytes(value, where)))
    raise DataError(f"{where} must be a file path, got {type(value).__name__}")


# The row checks' own code, and that of the readers and image checks they call: a cached table checked by other
# checks is not reused.
CHECKS = hashlib.sha256(Path(__file__).read_bytes() + Path(sources.__file__).read_bytes()).hexdigest()


def split_rows(rows: datasets.Dataset, val_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded shuffle, then the last `val_fraction` of rows held out (at least one when the fraction is > 0)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(rows):
        raise DataError(f"val_fraction {val_fraction} leaves no training rows out of {len(rows)}")
    return rows.select(order[: len(rows) - n_val]), rows.select(order[len(rows) - n_val :])
