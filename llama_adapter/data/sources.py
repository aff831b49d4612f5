"""Where data comes from. Every dataset is opened with Hugging Face `datasets`, as memory-mapped Arrow tables.

A data source (`--data`) is one of
- a local file, by its suffix: JSON (a list of rows), JSONL or CSV (every cell text), read row by row by reading.py so
  that every bad row is named; Parquet, read by `datasets`;
- a folder written by `save_to_disk`: a Dataset, or a DatasetDict whose split `split` names;
- a folder of data files laid out as a hub dataset repository (a clone of one, say);
- a hub dataset name such as `owner/name`, with a split and a configuration, when the hub can be reached.

A single file is one table: all of it is read, whatever the split. Images stored inside a dataset (bytes) are
written once to a content-addressed folder in the datasets cache, so that everything downstream reads image files.
"""

import csv
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets

from .. import files

JSON_SUFFIXES = (".json", ".jsonl")
TABLE_BUILDERS = {".csv": "csv", ".parquet": "parquet"}
SUFFIXES = JSON_SUFFIXES + tuple(TABLE_BUILDERS)
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes at the top of its folder


class DataError(ValueError):
    """Bad data; the message names the file, or the dataset, and the row, line or field at fault."""


def kind(source: str | os.PathLike) -> str:
    """ "json", "csv", "parquet", "saved" (a save_to_disk folder), "folder" (data files) or "hub" (a dataset name)."""
    path = Path(source)
    if path.is_dir():
        return "saved" if any((path / marker).is_file() for marker in SAVED_MARKERS) else "folder"
    if path.exists() or _looks_like_a_path(str(source)):
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DataError(f"{source}: not a data file this reads: expected one of {', '.join(SUFFIXES)}")
        if not path.exists():
            raise DataError(f"{source}: no such file")
        return "json" if suffix in JSON_SUFFIXES else TABLE_BUILDERS[suffix]
    return "hub"


def _looks_like_a_path(source: str) -> bool:
    """A missing file the user meant (a typo): not worth a trip to the hub, which names datasets `owner/name`."""
    return Path(source).suffix.lower() in SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1


def open_table(source: str | os.PathLike, split: str = "train", config: str | None = None) -> datasets.Dataset:
    """The table `source` holds (see the module docstring): a whole file, or the split `split` of anything else.

    JSON and JSONL are reading.py's to read, row by row. Every failure is a DataError naming the source.
    """
    source_kind = kind(source)
    try:
        if source_kind == "saved":
            return _split_of(datasets.load_from_disk(str(source)), split, source)
        if source_kind in ("csv", "parquet"):
            return datasets.load_dataset(
                source_kind, data_files=str(source), split="train", **_text_columns(Path(source), source_kind)
            )
        if source_kind == "json":
            raise ValueError("JSON and JSONL rows are read by reading.load_rows, which names every bad row")
        return datasets.load_dataset(str(source), config, split=split)
    except DataError:
        raise
    except ConnectionError as err:  # the hub, unreachable: offline, or HF_HUB_OFFLINE set
        raise DataError(
            f"{source}: not a local file or folder, and the Hugging Face hub cannot be reached to find a dataset of "
            f"that name ({err})"
        ) from None
    except IndexError:  # what datasets raises for a saved dataset of no rows
        raise DataError(f"{source}: no rows") from None
    except (ValueError, OSError, KeyError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"{source}: {_one_line(err)}") from None


def _text_columns(path: Path, builder: str) -> dict:
    """CSV cells are text: "42" is an answer, not a number, and an empty cell is "", not a missing value."""
    if builder != "csv":
        return {}
    features = datasets.Features({name: datasets.Value("string") for name in csv_header(path)})
    return {"features": features, "na_filter": False, "encoding": "utf-8-sig"}


def csv_records(path: Path) -> Iterator[list[str] | csv.Error]:
    """A CSV file's records, the header first, read one at a time: each the list of its cells, or the csv.Error of
    one that is not valid CSV. A blank line is no record.

    A byte that is not UTF-8 is kept in its cell as a lone surrogate (PEP 383), so that `not_utf8` finds it in the
    row that holds it: decoding the file as it is read fails wherever a read buffer happens to end.
    """
    csv.field_size_limit(2**31 - 1)  # the module's limit (process-wide) is 131,072 characters; reading.py limits rows
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle, strict=True)  # else a quote left open silently takes in the rest of the file
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # the reader goes on at the next line
                yield err
                continue
            if cells:
                yield cells


def not_utf8(cell: str) -> int | None:
    """The offset in bytes of the first byte that is not UTF-8 in a cell as `csv_records` reads it; None if none is."""
    found = UNDECODED.search(cell)
    return None if found is None else len(cell[: found.start()].encode())


UNDECODED = re.compile("[\udc80-\udcff]")  # the lone surrogates that stand for undecodable bytes


def csv_header(path: Path) -> list[str]:
    """The column names on a CSV file's first line, checked: there, valid CSV, UTF-8, each name once."""
    header = next(csv_records(path), None)
    if header is None:
        raise DataError(f"{path}: no header line naming the columns")
    if isinstance(header, csv.Error):
        raise DataError(f"{path}: the header line is not valid CSV: {header}")
    bad = next(((column, at) for column, name in enumerate(header, 1) if (at := not_utf8(name)) is not None), None)
    if bad:
        raise DataError(f"{path}: the header is not UTF-8 text (byte {bad[1]} of column {bad[0]})")
    if len(set(header)) < len(header):
        raise DataError(f"{path}: the header names a column twice: {header}")
    return header


def _split_of(loaded, split: str, source) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise DataError(f"{source}: no split '{split}'; available: {', '.join(loaded)}")
    return loaded[split]


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def describe(source: str | os.PathLike, split: str, config: str | None) -> str:
    """How messages name a source: the path, or the hub name with its split and configuration."""
    if kind(source) != "hub":
        return str(source)
    return f"{source}" + (f" ({config})" if config else "") + f" [{split}]"


def relative_folder(source: str | os.PathLike) -> Path:
    """Where relative image paths in a source's rows point: the folder of its file, the folder itself, or '.'."""
    path = Path(source)
    if path.is_dir():
        return path.resolve()
    return path.resolve().parent if path.exists() else Path.cwd()


def stored_image(data: bytes) -> Path:
    """An image held in a dataset as bytes, as a file: written once, named by its content, in the datasets cache.

    Downstream everything (the feature cache, evaluation records, the demo) works with image files.
    """
    digest = hashlib.sha256(data).hexdigest()
    path = Path(datasets.config.HF_DATASETS_CACHE) / "llama-adapter-images" / digest[:2] / digest
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomically(path, lambda temporary: Path(temporary).write_bytes(data))
    return path


def image_bytes(value, where: str) -> bytes | None:
    """The bytes of an image cell as `datasets` stores an Image column undecoded ({"bytes", "path"}), or None.

    `where` names the cell ("<source>: row 3: field 'image'")."""
    if value is None:
        return None
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return value["bytes"]
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return files.read_bytes(value["path"], DataError)
    raise DataError(f"{where} must be an image (bytes) or empty, got {type(value).__name__}")


def undecoded_images(table: datasets.Dataset, column: str = "image") -> datasets.Dataset:
    """`table` with its Image column left as bytes: decoding every image into PIL on access would be wasted."""
    if isinstance(table.features.get(column), datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    return table
