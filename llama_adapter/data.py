"""Alpaca-format instruction data: reading, the prompt template, tokenisation with response-only labels, batching."""

import bisect
import csv
import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from . import files, sources
from .sources import DataError

IGNORE_INDEX = -100  # label of positions that carry no loss: the prompt and the padding

# The Stanford Alpaca templates, with a newline after "### Response:" so the answer starts on its own line.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_NO_INPUT = HEADER_NO_INPUT + TURN


def format_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_conversation(earlier: list[tuple[str, str]], instruction: str, header: str = HEADER_NO_INPUT) -> str:
    """A multi-turn prompt: the header once, each earlier (instruction, answer) exchange, the new instruction.

    With the Alpaca header and no earlier exchanges it is exactly `format_prompt(instruction)`, the prompt the adapter
    was trained on; a system message may take the header's place.
    """
    exchanges = "".join(TURN.format(instruction=asked) + answer.strip() + "\n\n" for asked, answer in earlier)
    return header + exchanges + TURN.format(instruction=instruction)


# A row this long is a broken file (a whole document pasted into a field), not an instruction: refused before it
# is tokenised, which would cost seconds and gigabytes for nothing, as at most max_len tokens of it are trained.
MAX_ROW_CHARS = 1_000_000


def check_text(text: str, where: str) -> None:
    """Refuse a string Python holds but no tokenizer can encode: one with a lone UTF-16 surrogate (from a JSON
    escape such as "\\ud800", or a command-line argument that was not UTF-8)."""
    found = files.LONE_SURROGATE.search(text)
    if found:
        raise DataError(
            f"{where}: not valid Unicode text (a lone surrogate {found.group()!a} at character {found.start()})"
        )


BadRows = list[tuple[str, str]]  # (where, why): the rows left out by `load_rows(..., skipped=...)`
FIELDS = ("instruction", "input", "output")
COLUMNS = FIELDS + ("image",)  # what --columns may rename
# Checked rows, and for a bad row where it is and why it is bad instead (kept in the table, so that a cached table
# still knows its bad rows).
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
    if not isinstance(record, dict) or not record.keys() & set(FIELDS):
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
    if isinstance(whole, dict) and not whole.keys() & set(FIELDS):
        keys = ", ".join(repr(key) for key in list(whole)[:5])
        raise DataError(
            f"{path}: one JSON object (keys {keys}), not rows: expected a JSON list of rows, or JSONL (one row "
            "object per line) with fields instruction, input, output"
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
    missing = {columns.get(field, field) for field in ("instruction", "output")} - set(names)
    if missing:
        raise DataError(
            f"{source}: no column {' or '.join(sorted(missing))} (columns: {', '.join(names)}); "
            "--columns maps the fields to yours, e.g. --columns instruction=prompt,output=completion"
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
    return checked.remove_columns(["bad_at", "bad_why"])


def _check_row(record, where: str, folder: Path, columns: dict[str, str]) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
    row = {}
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
    size = sum(len(value) for value in row.values())
    if size > MAX_ROW_CHARS:
        raise DataError(f"{where}: {size:,} characters, more than the {MAX_ROW_CHARS:,} a row may hold")
    name = columns.get("image", "image")
    row["image"] = _image(record.get(name), f"{where}: field '{name}'", folder)
    return row


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


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image: str | None = None

    @property
    def response_tokens(self) -> int:
        """How many tokens the loss scores: each labelled token is predicted from the one before it."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class Pack:
    """Whole examples laid end to end in one sequence (--packing): each still sees only itself."""

    examples: list[Example]

    @property
    def response_tokens(self) -> int:
        return sum(example.response_tokens for example in self.examples)


class Examples(Sequence[Example]):
    """Tokenised rows in a memory-mapped Arrow table, each read back as an Example only when a batch needs it."""

    def __init__(self, table: datasets.Dataset):
        self.table = table
        token_lists = table.with_format("arrow")["input_ids"]
        self.lengths: list[int] = pc.list_value_length(token_lists).to_pylist()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.table[int(index)]
        return Example(row["input_ids"], row["labels"], row["image"])


def encode(tokenizer, row: dict, max_len: int) -> Example | None:
    """Prompt + response + EOS, with labels only on the response and EOS; None if what max_len keeps of it trains
    nothing: no response token the loss scores, as when the prompt alone fills max_len.

    Prompt and response are tokenised separately so the boundary never merges into one token and the model is
    trained on exactly the prompt tokens it sees at generation time.
    """
    prompt = tokenizer(format_prompt(row["instruction"], row["input"]))["input_ids"]
    response = response_ids(tokenizer, row["output"])
    labels = [IGNORE_INDEX] * len(prompt) + response
    example = Example((prompt + response)[:max_len], labels[:max_len], row.get("image"))
    return example if example.response_tokens else None  # a step of such rows alone would weigh its loss by 0 / 0


def response_ids(tokenizer, text: str) -> list[int]:
    """A response's tokens as the model learns and scores them: tokenised apart from the prompt, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_all(tokenizer, rows, max_len: int) -> tuple[Examples, int]:
    """Encode rows (a table, or a list of row dicts); returns the examples and how many rows were dropped because
    max_len leaves them no response token to train on (see `encode`). Rows from a file are tokenised into the datasets
    cache, once per tokenizer."""
    rows = as_rows(rows)
    if not len(rows):  # (a validation set of none) `map` would drop the columns of an empty table
        return Examples(datasets.Dataset.from_dict({key: [] for key in ENCODED}, features=ENCODED)), 0
    table = rows.map(
        _encoded_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "max_len": max_len},
        remove_columns=rows.column_names, features=ENCODED, desc="tokenising",
    )  # fmt: skip
    return Examples(table), len(rows) - len(table)


ENCODED = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "image": datasets.Value("string"),
    }
)


def _encoded_batch(batch: dict, tokenizer, max_len: int) -> dict:
    examples = [encode(tokenizer, dict(zip(batch, values)), max_len) for values in zip(*batch.values())]
    kept = [example for example in examples if example is not None]
    return {name: [getattr(example, name) for example in kept] for name in ENCODED}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, group: int = 64) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths, so little compute goes to padding.

    Indices are shuffled, cut into groups of `group` batches, sorted by length inside each group and split into
    batches; the batches are then shuffled so long and short ones alternate across the epoch.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def packs(lengths: Sequence[int], max_len: int, seed: int) -> list[list[int]]:
    """Example indices grouped into packs of at most `max_len` tokens, no example split between two.

    Best-fit decreasing: longest first, each into the fullest pack it still fits, which leaves little room unused.
    Equal lengths are taken in a seeded random order, so which short rows share a pack is not the file's order.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    packed: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, pack number) of the packs not yet full, ascending
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            packed.append([i])
            free, number = max_len - lengths[i], len(packed) - 1
        else:
            free, number = room.pop(at)
            packed[number].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, number))
    return packed


def pad_id(tokenizer) -> int:
    """The token that fills padding: the tokenizer's own, else EOS (LLaMA ships none; padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, T) of token lists padded on the left, so that every row ends at column T.

    Padding by hand rather than through the tokenizer, whose padding settings are state shared by every thread.
    """
    width = max(len(tokens) for tokens in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, width - len(tokens) :] = 1
    return input_ids, attention_mask


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(packs: list[Pack], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pack's examples end to end in one row, right-filled to the longest pack: input_ids, attention_mask (0 on
    the fill), labels and position_ids (B, T), the positions restarting at 0 where each example (and the fill)
    starts, which is how the model tells the examples apart (see `LlamaAdapterModel.loss`)."""
    width = max(sum(len(e.input_ids) for e in pack.examples) for pack in packs)
    input_ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(packs), width), dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    for row, pack in enumerate(packs):
        start = 0
        for e in pack.examples:
            n = len(e.input_ids)
            input_ids[row, start : start + n] = torch.tensor(e.input_ids)
            labels[row, start : start + n] = torch.tensor(e.labels)
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
        attention_mask[row, :start] = 1
        position_ids[row, start:] = torch.arange(width - start)  # the fill: a sequence of its own, never attended
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}
