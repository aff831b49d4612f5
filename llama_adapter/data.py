"""Alpaca-format instruction data: reading, the prompt template, tokenisation with response-only labels, batching."""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import files

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


def format_conversation(earlier: list[tuple[str, str]], instruction: str) -> str:
    """A multi-turn prompt: the Alpaca header once, each earlier (instruction, answer) exchange, the new instruction.

    Without earlier exchanges it is exactly `format_prompt(instruction)`, the prompt the adapter was trained on.
    """
    exchanges = "".join(TURN.format(instruction=asked) + answer.strip() + "\n\n" for asked, answer in earlier)
    return HEADER_NO_INPUT + exchanges + TURN.format(instruction=instruction)


class DataError(ValueError):
    """Bad training data; the message names the file and the row or line at fault."""


# A row this long is a broken file (a whole document pasted into a field), not an instruction: refused before it
# is tokenised, which would cost seconds and gigabytes for nothing, as at most max_len tokens of it are trained.
MAX_ROW_CHARS = 1_000_000


def check_text(text: str, where: str) -> None:
    """Refuse a string Python holds but no tokenizer can encode: one with a lone UTF-16 surrogate (from a JSON
    escape such as "\\ud800", or a command-line argument that was not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"{where}: not valid Unicode text (a lone surrogate {text[err.start]!a} at character {err.start})"
        ) from None


BadRows = list[tuple[str, str]]  # (where, why): the rows left out by `load_rows(..., skipped=...)`


def load_rows(path: str | Path, skipped: BadRows | None = None) -> list[dict]:
    """Read Alpaca rows {instruction, input, output} from a JSON list or a JSONL file, checking every row.

    A row may name an image file ("image": path, relative to the data file's folder) for a multimodal adapter.
    A bad row -- a JSONL line that is not UTF-8 or not JSON, a missing, mistyped or empty field, more than
    MAX_ROW_CHARS characters -- raises DataError naming the file and the row or line; given a `skipped` list, the
    row is left out and (where, why) appended to it instead. A file that cannot be read as a whole always raises.
    """
    path = Path(path)
    raw = files.read_bytes(path, DataError).removeprefix(UTF8_BOM)  # editors on Windows start files with one
    if path.suffix != ".jsonl" and raw.lstrip().startswith(b"["):
        records = _json_list(raw, path)
    else:
        _refuse_wrapped_rows(raw, path)
        records = _jsonl_records(raw, path)
    if not records:
        raise DataError(f"{path}: no rows")
    rows = []
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            rows.append(_check_row(record, where, path.parent))
        except DataError as err:
            if skipped is None:
                raise
            skipped.append((where, str(err).removeprefix(f"{where}: ")))
    if not rows:
        raise DataError(f"{path}: no usable rows: all {len(records)} are bad")
    return rows


UTF8_BOM = b"\xef\xbb\xbf"
FIELDS = ("instruction", "input", "output")


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


def _json_list(raw: bytes, path: Path) -> list[tuple[str, object]]:
    """(where, record) for each element of a JSON list; a list that does not parse has no rows to keep."""
    records = files.parse_json(raw, path, DataError, text_only=False)  # each row's fields are checked: skippable
    return [(f"{path}: row {i}", record) for i, record in enumerate(records)]


def _jsonl_records(raw: bytes, path: Path) -> list[tuple[str, object]]:
    """(where, record) for each non-blank line; a line that is not UTF-8 JSON gets its DataError as the record."""
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            records.append((where, json.loads(line.decode("utf-8"))))
        except RecursionError:
            records.append((where, DataError(f"{where}: JSON nested too deeply to read")))
        except UnicodeDecodeError as err:
            records.append((where, DataError(f"{where}: not UTF-8 text (byte {err.start} of the line)")))
        except json.JSONDecodeError as err:
            records.append((where, DataError(f"{where}: invalid JSON: {err.msg}")))
    return records


def _check_row(record, where: str, folder: Path) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
    row = {}
    for name in FIELDS:
        required = name != "input"  # an absent or null input means none, as in Alpaca's own data
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
        row[name] = value
    size = sum(len(value) for value in row.values())
    if size > MAX_ROW_CHARS:
        raise DataError(f"{where}: {size:,} characters, more than the {MAX_ROW_CHARS:,} a row may hold")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: field 'image' must be a file path, got {type(image).__name__}")
    if image:
        row["image"] = str(folder / image)
    return row


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last `val_fraction` of rows held out (at least one when the fraction is > 0)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(rows):
        raise DataError(f"val_fraction {val_fraction} leaves no training rows out of {len(rows)}")
    shuffled = [rows[i] for i in order]
    return shuffled[: len(rows) - n_val], shuffled[len(rows) - n_val :]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    image: str | None = None

    @property
    def response_tokens(self) -> int:
        """How many tokens the loss scores: each labelled token is predicted from the one before it."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def encode(tokenizer, row: dict, max_len: int) -> Example | None:
    """Prompt + response + EOS, with labels only on the response and EOS; None if truncation leaves no response.

    Prompt and response are tokenised separately so the boundary never merges into one token and the model is
    trained on exactly the prompt tokens it sees at generation time.
    """
    prompt = tokenizer(format_prompt(row["instruction"], row["input"]))["input_ids"]
    if len(prompt) >= max_len:
        return None
    response = response_ids(tokenizer, row["output"])
    labels = [IGNORE_INDEX] * len(prompt) + response
    return Example((prompt + response)[:max_len], labels[:max_len], row.get("image"))


def response_ids(tokenizer, text: str) -> list[int]:
    """A response's tokens as the model learns and scores them: tokenised apart from the prompt, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_all(tokenizer, rows: list[dict], max_len: int) -> tuple[list[Example], int]:
    """Encode rows; returns the examples and how many rows were dropped because their prompt fills max_len."""
    examples = [encode(tokenizer, row, max_len) for row in rows]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def length_grouped_batches(examples: list[Example], batch_size: int, seed: int, group: int = 64) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths, so little compute goes to padding.

    Indices are shuffled, cut into groups of `group` batches, sorted by length inside each group and split into
    batches; the batches are then shuffled so long and short ones alternate across the epoch.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


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
