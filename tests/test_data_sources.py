"""Every data source through `datasets`: the same rows from JSON, JSONL, CSV, Parquet, save_to_disk folders and a
folder of data files; column mapping; bad rows named in every format; memory that does not grow with the file."""

import csv
import hashlib
import json
import tracemalloc
from pathlib import Path

import datasets
import pytest

from llama_adapter import cli
from llama_adapter.data import encoding, reading, sources
from llama_adapter.data.sources import DataError
from llama_adapter.train.tasks import rows_hash

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Write a line\nthat spans two.", "input": "", "output": 'one, "two"\nthree'},
]
LOADED = [row | {"image": None} for row in ROWS]


def write_csv(path, rows, fields=("instruction", "input", "output")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def every_layout(folder, rows=ROWS) -> dict:
    """The same rows written in each layout a user may have them in."""
    table = datasets.Dataset.from_list(rows)
    (folder / "rows.json").write_text(json.dumps(rows))
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_csv(folder / "rows.csv", rows)
    table.to_parquet(folder / "rows.parquet")
    table.save_to_disk(folder / "saved")
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(folder / "saved-splits")
    (folder / "repo" / "data").mkdir(parents=True)  # a hub dataset repository, cloned
    table.to_parquet(folder / "repo" / "data" / "train-00000-of-00001.parquet")
    return {
        name: folder / name
        for name in ("rows.json", "rows.jsonl", "rows.csv", "rows.parquet", "saved", "saved-splits", "repo")
    }


def test_every_layout_gives_the_same_rows(tmp_path):
    layouts = every_layout(tmp_path)
    assert {name: sources.kind(path) for name, path in layouts.items()} == {
        "rows.json": "json", "rows.jsonl": "json", "rows.csv": "csv", "rows.parquet": "parquet",
        "saved": "saved", "saved-splits": "saved", "repo": "folder",
    }  # fmt: skip
    for name, path in layouts.items():
        assert reading.load_rows(path).to_list() == LOADED, name
    assert reading.load_rows(layouts["saved-splits"], split="test").to_list() == LOADED[:1]
    with pytest.raises(DataError, match=r"saved-splits: no split 'validation'; available: train, test"):
        reading.load_rows(layouts["saved-splits"], split="validation")


def test_rows_are_memory_mapped_arrow_and_the_hash_is_the_row_lists(tmp_path):
    for path in every_layout(tmp_path).values():
        rows = reading.load_rows(path)
        assert rows.cache_files, f"{path}: rows held in memory"
        # The hash a resumed run compares: the same as that of the JSON list of the rows (kept before tables).
        assert (
            rows_hash(rows) == hashlib.sha256(json.dumps(ROWS, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        )


def test_csv_cells_are_text(tmp_path):
    path = write_csv(tmp_path / "numbers.csv", [{"instruction": "What is 6 x 7?", "input": "", "output": "42"}])
    assert reading.load_rows(path).to_list() == [
        {"instruction": "What is 6 x 7?", "input": "", "output": "42", "image": None}
    ]


def test_columns_map_the_fields_to_the_sources_names(tmp_path):
    renamed = [{"prompt": row["instruction"], "context": row["input"], "completion": row["output"]} for row in ROWS]
    path = write_csv(tmp_path / "renamed.csv", renamed, fields=("prompt", "context", "completion"))
    columns = reading.parse_columns("instruction=prompt, input=context,output=completion")
    assert reading.load_rows(path, columns=columns).to_list() == LOADED
    datasets.Dataset.from_list(renamed).to_parquet(tmp_path / "renamed.parquet")
    assert reading.load_rows(tmp_path / "renamed.parquet", columns=columns).to_list() == LOADED
    (tmp_path / "renamed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in renamed))
    assert reading.load_rows(tmp_path / "renamed.jsonl", columns=columns).to_list() == LOADED
    with pytest.raises(DataError, match=r"renamed.csv: no column instruction or output \(columns: prompt, context, "):
        reading.load_rows(path)
    with pytest.raises(DataError, match=r"renamed.jsonl: line 1: missing field 'instruction'"):
        reading.load_rows(tmp_path / "renamed.jsonl")


@pytest.mark.parametrize(
    "text, message",
    [
        ("instruction", "expected field=column pairs"),
        ("question=prompt", "cannot rename question"),
        ("instruction=a,output=a", "each field needs its own"),
        ("instruction=a,instruction=b", "renamed twice"),
        ("output= ", "each field needs its own non-empty"),
    ],
)
def test_bad_column_mappings_are_refused(text, message):
    with pytest.raises(DataError, match=f"columns: .*{message}"):
        reading.parse_columns(text)


def test_a_bad_row_is_named_in_every_format_and_can_be_skipped(tmp_path):
    rows = [ROWS[0], {"instruction": "No answer.", "input": "", "output": ""}, ROWS[1]]
    paths = [write_csv(tmp_path / "bad.csv", rows), tmp_path / "bad.parquet", tmp_path / "saved"]
    datasets.Dataset.from_list(rows).to_parquet(paths[1])
    datasets.Dataset.from_list(rows).save_to_disk(paths[2])
    for path in paths:
        with pytest.raises(DataError, match=f"^{path}: row 1: field 'output' is empty$"):
            reading.load_rows(path)
        skipped = []
        assert reading.load_rows(path, skipped).to_list() == [LOADED[0], LOADED[1]]
        assert skipped == [(f"{path}: row 1", "field 'output' is empty")]


def test_a_malformed_csv_row_is_named_and_can_be_skipped(tmp_path):
    """CSV is read row by row, as JSONL is: a row that is not valid CSV, UTF-8 or as wide as the header is named."""
    lines = [
        b"instruction,input,output", b"Say hi.,,hi", b"Say bye.,,bye,now", b"Say yes.,yes", b"Say h\xe9.,,hi",
        b'"Say no." now,,no', b"", b"Say ok.,,ok", b'"Say never.,,never', b"Say more.,,more",
    ]  # fmt: skip
    path = tmp_path / "bad.csv"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # the BOM a spreadsheet may start it with
    with pytest.raises(DataError, match=rf"^{path}: row 1: 4 field\(s\) where the header names 3$"):
        reading.load_rows(path)
    skipped = []
    assert [row["output"] for row in reading.load_rows(path, skipped)] == ["hi", "ok"]
    assert skipped == [
        (f"{path}: row 1", "4 field(s) where the header names 3"),
        (f"{path}: row 2", "2 field(s) where the header names 3"),
        (f"{path}: row 3", "field 'instruction': not UTF-8 text (byte 5 of the field)"),
        (f"{path}: row 4", "not valid CSV: ',' expected after '\"'"),
        (f"{path}: row 6", "a quoted field that never closes"),  # the rest of the file is inside its quotes
    ]


def test_nulls_and_types_in_a_table_are_named(tmp_path):
    path = tmp_path / "nulls.parquet"
    datasets.Dataset.from_list([ROWS[0], {"instruction": None, "input": None, "output": "x"}]).to_parquet(path)
    with pytest.raises(DataError, match=r"nulls.parquet: row 1: field 'instruction' is null"):
        reading.load_rows(path)
    numbers = tmp_path / "numbers.parquet"
    datasets.Dataset.from_list([{"instruction": "a", "output": 3}]).to_parquet(numbers)
    with pytest.raises(DataError, match=r"numbers.parquet: row 0: field 'output' must be a string, got int"):
        reading.load_rows(numbers)


def test_images_in_a_table_are_paths_beside_it_or_stored_bytes(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # the rows keep it as a file; the feature cache checks images
    table = datasets.Dataset.from_list(
        [ROWS[0] | {"image": {"bytes": png, "path": None}}, ROWS[1] | {"image": None}],
        features=datasets.Features(
            {name: datasets.Value("string") for name in ("instruction", "input", "output")}
            | {"image": datasets.Image()}
        ),
    )
    table.to_parquet(tmp_path / "embedded.parquet")
    loaded = reading.load_rows(tmp_path / "embedded.parquet")
    assert Path(loaded[0]["image"]).read_bytes() == png and loaded[1]["image"] is None
    write_csv(tmp_path / "paths.csv", [ROWS[0] | {"image": "pics/a.png"}], ("instruction", "input", "output", "image"))
    assert reading.load_rows(tmp_path / "paths.csv")[0]["image"] == str(tmp_path / "pics" / "a.png")


def test_sources_that_cannot_be_read_are_named(tmp_path):
    with pytest.raises(DataError, match=r"nope.parquet: no such file"):
        reading.load_rows(tmp_path / "nope.parquet")
    (tmp_path / "rows.txt").write_text("hi")
    with pytest.raises(DataError, match=r"rows.txt: not a data file this reads: expected one of .json, .jsonl, .csv"):
        reading.load_rows(tmp_path / "rows.txt")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: "):
        reading.load_rows(tmp_path / "broken.parquet")
    datasets.Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(tmp_path / "no-rows")
    with pytest.raises(DataError, match=r"no-rows: no rows"):
        reading.load_rows(tmp_path / "no-rows")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv: no header line"):
        reading.load_rows(tmp_path / "empty.csv")
    (tmp_path / "latin1.csv").write_bytes("instruction,output\nd\xe9j\xe0,vu\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: row 0: field 'instruction': not UTF-8 text \(byte 1 of the"):
        reading.load_rows(tmp_path / "latin1.csv")
    (tmp_path / "latin1-header.csv").write_bytes("instrucci\xf3n,output\nhi,hi\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1-header.csv: the header is not UTF-8 text \(byte 9 of column 1\)"):
        reading.load_rows(tmp_path / "latin1-header.csv")
    (tmp_path / "header.csv").write_text("instruction,input,output\n")
    with pytest.raises(DataError, match=r"header.csv: no rows$"):
        reading.load_rows(tmp_path / "header.csv")


def test_a_hub_name_offline_says_so_at_once():
    # tests/conftest.py sets HF_HUB_OFFLINE, as a machine without internet is.
    with pytest.raises(DataError, match=r"^tatsu-lab/alpaca: not a local file or folder, and the Hugging Face hub"):
        reading.load_rows("tatsu-lab/alpaca")


def peak_python_memory(tokenizer, path):
    """The peak of Python's allocations while rows are read, hashed and (every 40th) tokenised."""
    tracemalloc.start()
    try:
        rows = reading.load_rows(path)
        examples, _ = encoding.encode_all(tokenizer, rows.select(range(0, len(rows), 40)), max_len=64)
        rows_hash(rows)
        return tracemalloc.get_traced_memory()[1], rows, examples
    finally:
        tracemalloc.stop()


def test_a_large_jsonl_file_is_never_held_in_memory(tokenizer, tmp_path):
    row = {"instruction": "Summarise the paragraph. " * 8, "input": "x " * 200, "output": "A summary. " * 20}
    peaks = {}
    for count in (4_000, 16_000):
        path = tmp_path / f"{count}.jsonl"
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row | {"output": f"{i} " + row["output"]}) + "\n" for i in range(count))
        peaks[count], rows, examples = peak_python_memory(tokenizer, path)
        assert len(rows) == count and rows.cache_files and examples.table.cache_files
    size = path.stat().st_size
    # Four times the rows, about the same memory (a list of the rows would need more than the file's size).
    assert peaks[16_000] < 1.5 * peaks[4_000], peaks
    assert peaks[16_000] < size / 4, f"peak {peaks[16_000] / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


def test_train_reads_a_parquet_file_with_mapped_columns_and_writes_nothing_before(tiny_base_dir, tmp_path, capsys):
    renamed = [{"prompt": f"Repeat {word}.", "completion": word} for word in ("red", "blue", "green", "gold") * 2]
    datasets.Dataset.from_list(renamed).to_parquet(tmp_path / "rows.parquet")
    out = tmp_path / "run"
    flags = ["--base", str(tiny_base_dir), "--data", str(tmp_path / "rows.parquet"), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"rows.parquet: no column instruction or output .*--columns maps"):
        cli.main(["train", *flags])
    assert not out.exists()
    with pytest.raises(SystemExit, match="error: columns: expected field=column pairs"):
        cli.main(["train", *flags, "--columns", "prompt"])
    train_flags = ["--max-steps", "2", "--batch-size", "2", "--adapter-layers", "2", "--adapter-len", "3"]
    train_flags += ["--val-fraction", "0.25"]
    cli.main(["train", *flags, "--columns", "instruction=prompt,output=completion", *train_flags])
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["columns"] == "instruction=prompt,output=completion" and saved["data_split"] == "train"
    expected = reading.load_rows(tmp_path / "rows.parquet", columns={"instruction": "prompt", "output": "completion"})
    assert saved["data_sha256"] == rows_hash(expected)
