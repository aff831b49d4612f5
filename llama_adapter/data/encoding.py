"""Rows as token examples: prompt + response + EOS, labels on the response alone (the loss scores nothing
else), tokenised into the datasets cache and read back one example at a time."""

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import pyarrow.compute as pc

from . import templates
from .reading import as_rows

IGNORE_INDEX = -100  # label of positions that carry no loss: the prompt and the padding


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


def encode(tokenizer, row: dict, max_len: int, template: str = "alpaca") -> Example | None:
    """The row's prompt and answer pieces as `template` renders them, with labels only on the answers; the last
    answer ends with EOS. None if what max_len keeps of it trains nothing: no answer token the loss scores, as when
    the prompt alone fills max_len.

    Each piece is tokenised apart, so a boundary never merges into one token and the model is trained on exactly the
    prompt tokens it sees at answering time.
    """
    pieces = templates.row_pieces(template, tokenizer, row)
    input_ids, labels = [], []
    for i, (text, answer) in enumerate(pieces):
        ids = tokenizer(text, add_special_tokens=i == 0)["input_ids"]
        if i == len(pieces) - 1 and (template == "alpaca" or tokenizer.eos_token_id not in ids):
            ids.append(tokenizer.eos_token_id)  # unless the chat template ends its turns with EOS itself
        input_ids += ids
        labels += ids if answer else [IGNORE_INDEX] * len(ids)
    example = Example(input_ids[:max_len], labels[:max_len], row.get("image"))
    return example if example.response_tokens else None  # a step of such rows alone would weigh its loss by 0 / 0


def response_ids(tokenizer, text: str) -> list[int]:
    """A response's tokens as the model learns and scores them: tokenised apart from the prompt, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_all(tokenizer, rows, max_len: int, template: str = "alpaca") -> tuple[Examples, int]:
    """Encode rows (a table, or a list of row dicts) in `template`; returns the examples and how many rows were
    dropped because max_len leaves them no response token to train on (see `encode`). Rows from a file are tokenised
    into the datasets cache, once per tokenizer."""
    rows = as_rows(rows)
    if not len(rows):  # (a validation set of none) `map` would drop the columns of an empty table
        return Examples(datasets.Dataset.from_dict({key: [] for key in ENCODED}, features=ENCODED)), 0
    table = rows.map(
        _encoded_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "max_len": max_len, "template": template},
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


def _encoded_batch(batch: dict, tokenizer, max_len: int, template: str) -> dict:
    examples = [encode(tokenizer, dict(zip(batch, values)), max_len, template) for values in zip(*batch.values())]
    kept = [example for example in examples if example is not None]
    return {name: [getattr(example, name) for example in kept] for name in ENCODED}
