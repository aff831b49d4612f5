"""ScienceQA in the Hugging Face hub's layout (Parquet, images embedded) gives the official folder's problems.

The tables are built from real ScienceQA problems and images (../shared/data/scienceqa, see SOURCES.md): the
same problems written both ways must give the same prompts, targets, image bytes and score tables.
"""

import json
import random
import re
import shutil
from dataclasses import replace

import datasets
import pytest

from llama_adapter import cli
from llama_adapter.data.sources import DataError
from llama_adapter.evaluation import scienceqa as sqa
from llama_adapter.evaluation.predictions import read_predictions

SPLITS = {"train": "train", "val": "validation", "test": "test"}  # official name -> the hub's
TEXT_COLUMNS = ["question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution"]
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int8"),
    }
    | {name: datasets.Value("string") for name in TEXT_COLUMNS}
)
# How many problems of each kind: (split, has an image, has a hint). Train and val images are not in the shared
# data, so their problems are ones without an image.
WANTED = {
    ("test", True, True): 8,
    ("test", True, False): 6,
    ("test", False, True): 4,
    ("test", False, False): 6,
    ("train", False, True): 4,
    ("train", False, False): 4,
    ("val", False, True): 4,
    ("val", False, False): 4,
}


@pytest.fixture(scope="module")
def real(data_dir):
    root = data_dir / "scienceqa"
    if not (root / "problems_think_partial.json").is_file():
        pytest.skip(f"{root} has no problems_think_partial.json")
    return root


@pytest.fixture(scope="module")
def official(real, tmp_path_factory):
    """40 real problems in the official layout, with their real images and the captions and OCR of those."""
    records = json.loads((real / "problems_think_partial.json").read_text())
    counts, pids = dict.fromkeys(WANTED, 0), {split: [] for split in SPLITS}
    for pid, record in records.items():
        kind = (record["split"], record["image"] is not None, bool(record["hint"]))
        length = len(record["question"]) + len(record["hint"]) + sum(map(len, record["choices"]))
        # Short prompts, so that the tiny model's 512 positions hold them; a lecture, for --cot.
        if counts.get(kind, 99) < WANTED.get(kind, 0) and length < 200 and record["lecture"]:
            counts[kind] += 1
            pids[record["split"]].append(pid)
    assert counts == WANTED
    root = tmp_path_factory.mktemp("official")
    chosen = [pid for split in pids.values() for pid in split]
    (root / "problems.json").write_text(json.dumps({pid: records[pid] for pid in chosen}))
    (root / "pid_splits.json").write_text(json.dumps(pids))
    for pid in pids["test"]:
        if records[pid]["image"]:
            (root / "images" / "test" / pid).mkdir(parents=True)
            shutil.copy(real / "images" / "test" / pid / "image.png", root / "images" / "test" / pid)
    captions = json.loads((real / "captions.json").read_text())["captions"]
    ocrs = json.loads((real / "ocrs.json").read_text())["texts"]
    (root / "captions.json").write_text(json.dumps({"captions": {p: captions[p] for p in chosen if p in captions}}))
    (root / "ocrs.json").write_text(json.dumps({"texts": {p: ocrs[p] for p in chosen if p in ocrs}}))
    return root


def official_problems(root, split: str) -> list[sqa.Problem]:
    problems, missing = sqa.load_problems(root, split)
    assert missing == 0
    return problems


def hub_table(official_root, split: str, extra: dict | None = None) -> datasets.Dataset:
    """The official split's problems as the hub holds them, plus `extra` columns (name -> one value per row)."""
    problems = json.loads((official_root / "problems.json").read_text())
    pids = json.loads((official_root / "pid_splits.json").read_text())[split]
    columns = {name: [problems[pid][name] for pid in pids] for name in ["choices", "answer", *TEXT_COLUMNS]}
    columns["image"] = [
        {"bytes": (official_root / "images" / split / pid / "image.png").read_bytes(), "path": None}
        if problems[pid]["image"]
        else None
        for pid in pids
    ]
    features = datasets.Features(FEATURES | {name: datasets.Value("string") for name in extra or {}})
    return datasets.Dataset.from_dict(columns | (extra or {}), features=features)


@pytest.fixture(scope="module")
def hub(official, tmp_path_factory):
    """The same problems in the hub's layouts; layout name -> source."""
    root = tmp_path_factory.mktemp("hub")
    tables = {hub_split: hub_table(official, split) for split, hub_split in SPLITS.items()}
    for hub_split, table in tables.items():  # a clone of the hub repository: a folder of data files
        table.to_parquet(root / "clone" / "data" / f"{hub_split}-00000-of-00001.parquet")
    datasets.DatasetDict(tables).save_to_disk(root / "saved")
    marked = [table.add_column("split", [hub_split] * len(table)) for hub_split, table in tables.items()]
    datasets.concatenate_datasets(marked[::-1]).to_parquet(root / "all.parquet")  # several splits in one file
    return {
        "folder": root / "clone",
        "file": root / "clone" / "data" / "test-00000-of-00001.parquet",
        "saved": root / "saved",
        "split-column": root / "all.parquet",
    }


def same_problems(hub_problems, official_problems, split):
    """Everything but the pid, the image's path and the captions and OCR is the same; the image has the same bytes."""
    assert [p.pid for p in hub_problems] == [f"{split}-{i}" for i in range(len(official_problems))]
    for ours, theirs in zip(hub_problems, official_problems, strict=True):
        assert replace(ours, pid=theirs.pid, image=theirs.image, caption=theirs.caption, ocr=theirs.ocr) == theirs
        assert (ours.caption, ours.ocr) == ("", "")  # no pids, no captions
        assert (ours.image is None) == (theirs.image is None)
        if ours.image is not None:
            assert ours.image.is_file() and ours.image.read_bytes() == theirs.image.read_bytes()


def same_rows(hub_problems, official_problems, image_context="none"):
    for explanation in sqa.EXPLANATIONS:
        ours, theirs = (sqa.to_rows(p, image_context, explanation) for p in (hub_problems, official_problems))
        assert [row | {"image": bool(row["image"])} for row in ours] == [
            row | {"image": bool(row["image"])} for row in theirs
        ]


def same_scores(hub_problems, official_problems):
    rng = random.Random(0)
    preds = [rng.choice([None, *range(len(p.choices))]) for p in official_problems]
    tables = []
    for problems in (hub_problems, official_problems):
        records = [{"pid": p.pid, "pred": pred, "correct": pred == p.answer} for p, pred in zip(problems, preds)]
        tables.append(sqa.score(records, {p.pid: p for p in problems}))
    assert tables[0] == tables[1]
    assert sqa.format_table(tables[0]) == sqa.format_table(tables[1])
    assert sqa.chance(hub_problems) == sqa.chance(official_problems)


@pytest.mark.parametrize(
    "layout, split",
    [
        ("folder", "train"), ("folder", "val"), ("folder", "validation"), ("folder", "test"),
        ("file", "test"),
        ("saved", "train"), ("saved", "val"), ("saved", "validation"), ("saved", "test"),
        ("split-column", "train"), ("split-column", "val"), ("split-column", "validation"), ("split-column", "test"),
    ],
)  # fmt: skip
def test_hub_layouts_give_the_official_problems_prompts_and_scores(hub, official, layout, split):
    official_split = "val" if split == "validation" else split
    theirs = official_problems(official, official_split)
    ours, missing = sqa.load_problems(hub[layout], split)
    assert missing == 0
    same_problems(ours, theirs, official_split)
    same_rows(ours, theirs)
    same_scores(ours, theirs)


def test_validation_is_val_by_either_name(hub, tmp_path):
    by_hub_name, _ = sqa.load_problems(hub["saved"], "validation")
    assert sqa.load_problems(hub["saved"], "val")[0] == by_hub_name
    assert {p.split for p in by_hub_name} == {"val"} and by_hub_name[0].pid == "val-0"
    # A table whose split is called "val" is found as "validation" too.
    saved = datasets.load_from_disk(hub["saved"])
    datasets.DatasetDict({"val": saved["validation"]}).save_to_disk(tmp_path / "val")
    assert sqa.load_problems(tmp_path / "val", "validation")[0] == by_hub_name


def test_the_test_split_covers_every_kind_of_problem(hub):
    problems, _ = sqa.load_problems(hub["folder"], "test")
    kinds = {(p.image is not None, bool(p.hint)) for p in problems}
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    assert {p.image.parent.parent.name for p in problems if p.image} == {"llama-adapter-images"}  # datasets cache


def test_a_pid_column_names_problems_and_brings_captions_and_ocr(official, tmp_path):
    pids = json.loads((official / "pid_splits.json").read_text())["test"]
    hub_table(official, "test", {"pid": pids}).to_parquet(tmp_path / "test.parquet")
    for name in ("captions.json", "ocrs.json"):  # beside the Parquet file
        shutil.copy(official / name, tmp_path)
    theirs = official_problems(official, "test")
    ours, _ = sqa.load_problems(tmp_path / "test.parquet", "test")
    assert [replace(p, image=None) for p in ours] == [replace(p, image=None) for p in theirs]
    assert sum(bool(p.caption) for p in ours) == sum(p.image is not None for p in ours) > 0
    assert any(p.ocr for p in ours)
    for image_context in sqa.IMAGE_CONTEXTS:
        same_rows(ours, theirs, image_context)
    # An "id" column does as well; a pid twice is an error.
    hub_table(official, "test", {"id": pids}).to_parquet(tmp_path / "ids.parquet")
    assert [p.pid for p in sqa.load_problems(tmp_path / "ids.parquet", "test")[0]] == pids
    hub_table(official, "test", {"pid": [pids[0]] * len(pids)}).to_parquet(tmp_path / "twice.parquet")
    with pytest.raises(DataError, match=rf"twice.parquet: row 1: pid {pids[0]} again \(row 0 has it too\)"):
        sqa.load_problems(tmp_path / "twice.parquet", "test")


def with_cell(table: datasets.Dataset, row: int, column: str, value) -> datasets.Dataset:
    return table.map(
        lambda r, i: {column: value if i == row else r[column]}, with_indices=True, features=table.features
    )


def test_a_bad_field_names_the_source_row_and_field(official, tmp_path):
    table = hub_table(official, "test")
    bad = tmp_path / "bad.parquet"
    options = len(table[3]["choices"])
    with_cell(table, 3, "answer", options).to_parquet(bad)
    with pytest.raises(DataError) as err:
        sqa.load_problems(bad, "test")
    assert (
        str(err.value)
        == f"{bad}: row 3: field 'answer' must be an integer index into the {options} choices, got {options}"
    )
    at = re.escape(str(bad))
    table.remove_columns("question").to_parquet(bad)
    with pytest.raises(DataError, match=rf"^{at}: no column question \(columns: choices, answer, hint, task, "):
        sqa.load_problems(bad, "test")
    with_cell(table, 5, "grade", "grade13").to_parquet(bad)
    with pytest.raises(DataError, match=rf"^{at}: row 5: field 'grade' must be 'grade1' .. 'grade12', got 'grade13'"):
        sqa.load_problems(bad, "test")
    with_cell(table, 2, "question", " ").to_parquet(bad)
    with pytest.raises(DataError, match=rf"^{at}: row 2: field 'question' is empty"):
        sqa.load_problems(bad, "test")


def test_an_unknown_split_lists_the_available_ones(hub):
    with pytest.raises(DataError, match=r"saved: no split 'dev'; available: train, validation, test"):
        sqa.load_problems(hub["saved"], "dev")
    with pytest.raises(DataError, match=r"all.parquet: no row has split 'dev'; available: test, train, validation"):
        sqa.load_problems(hub["split-column"], "dev")
    with pytest.raises(DataError, match=r"clone: Unknown split \"dev\". Should be one of \['train', 'validation', "):
        sqa.load_problems(hub["folder"], "dev")


def test_other_sources_are_named_in_their_errors(official):
    with pytest.raises(DataError, match=r"derek-thomas/ScienceQA: not a local file or folder, and the .* hub cannot"):
        sqa.load_problems("derek-thomas/ScienceQA", "test")  # the tests run offline
    with pytest.raises(DataError, match=r"problems.json: a JSON file: ScienceQA's official layout is a folder"):
        sqa.load_problems(official / "problems.json", "test")
    with pytest.raises(ValueError, match="missing_images must be one of"):
        sqa.load_problems(official / "problems.json", "test", missing_images="skip")


def test_cli_trains_and_evaluates_on_the_hub_layout(hub, tiny_base_dir, tiny_clip, tmp_path, capsys):
    """A multimodal adapter, so that the test problems' embedded images go through the feature cache."""
    adapter = tmp_path / "adapter"
    flags = ["--max-steps", "1", "--batch-size", "2", "--val-fraction", "0", "--adapter-layers", "2"]
    cli.main(["train", "--task", "scienceqa", "--data", str(hub["saved"]), "--base", str(tiny_base_dir),
              "--out", str(adapter), "--clip-model", tiny_clip, *flags])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["train_tokens"] > 0
    out = tmp_path / "preds.jsonl"
    cli.main(["eval", "scienceqa", "--data", str(hub["folder"]), "--adapter", str(adapter), "--out", str(out),
              "--max-new-tokens", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in printed
    assert list(read_predictions(out)) == [f"test-{i}" for i in range(24)]
    scores = json.loads(out.with_suffix(".scores.json").read_text())
    assert (scores["count"]["IMG"], scores["count"]["Avg"]) == (14, 24)
