"""Alpaca data: reading with clear errors, the template, response-only labels, batching."""

import json

import pytest

from llama_adapter.data import batching, encoding, reading, sources, templates
from llama_adapter.data.encoding import IGNORE_INDEX
from llama_adapter.data.sources import DataError


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def test_template_with_and_without_input():
    assert templates.format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    with_input = templates.format_prompt("Add the numbers.", "2 and 3")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    # Whitespace-only input is no input.
    assert templates.format_prompt("Say hi.", "  \n") == templates.format_prompt("Say hi.")


def test_conversation_prompt_repeats_the_turn_template():
    assert templates.format_conversation([], "Say hi.") == templates.format_prompt("Say hi.")
    assert templates.format_conversation([("Say hi.", " Hi! \n"), ("Louder.", "HI!")], "Thanks.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!\n\n"
        "### Instruction:\nLouder.\n\n### Response:\nHI!\n\n"
        "### Instruction:\nThanks.\n\n### Response:\n"
    )


def test_reads_json_list_and_jsonl(tmp_path):
    as_json = write(tmp_path / "a.json", json.dumps(ROWS))
    as_jsonl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    assert reading.load_rows(as_json).to_list() == [row | {"image": None} for row in ROWS]
    assert reading.load_rows(as_jsonl).to_list() == [row | {"image": None} for row in ROWS]


def test_missing_input_field_means_empty(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"instruction": "Say hi.", "output": "hi"}]))
    assert reading.load_rows(path).to_list() == [{"instruction": "Say hi.", "input": "", "output": "hi", "image": None}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": ]', "a.json: invalid JSON at line 2"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n', "a.json: line 2: invalid JSON"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]', "a.json: row 1: missing field 'output'"),
        ('[{"instruction": 3, "output": "b"}]', "a.json: row 0: field 'instruction' must be a string, got int"),
        ('[{"instruction": "  ", "output": "b"}]', "a.json: row 0: field 'instruction' is empty"),
        ('[{"instruction": "a", "output": ""}]', "a.json: row 0: field 'output' is empty"),
        ('["just a string"]', "a.json: row 0: expected an object"),
        ("[]", "a.json: no rows"),
        ("", "a.json: no rows"),
    ],
)
def test_bad_data_names_file_and_place(tmp_path, content, message):
    path = write(tmp_path / "a.json", content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        reading.load_rows(path)


def test_non_utf8_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"b.json: not UTF-8 text \(line 1, byte 18\)"):
        reading.load_rows(write(tmp_path / "b.json", b'[{"instruction": "\xff", "output": "x"}]'))
    with pytest.raises(DataError, match="nope.json: no such file"):
        reading.load_rows(tmp_path / "nope.json")


def test_encode_labels_only_response_and_eos(tokenizer):
    example = encoding.encode(tokenizer, ROWS[1], max_len=512)
    prompt = tokenizer(templates.format_prompt("Add the numbers.", "2 and 3"))["input_ids"]
    response = tokenizer("5", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]


def test_encode_truncates_and_drops_rows_without_room_for_a_response(tokenizer):
    full = encoding.encode(tokenizer, ROWS[0], max_len=512)
    prompt_len = full.labels.count(IGNORE_INDEX)
    cut = encoding.encode(tokenizer, ROWS[0], max_len=prompt_len + 1)
    assert cut.input_ids == full.input_ids[: prompt_len + 1]
    assert cut.labels[-1] != IGNORE_INDEX
    assert encoding.encode(tokenizer, ROWS[0], max_len=prompt_len) is None
    kept, dropped = encoding.encode_all(tokenizer, ROWS, max_len=prompt_len)
    assert dropped >= 1 and len(kept) + dropped == 2


def test_split_is_seeded_disjoint_and_complete():
    rows = reading.as_rows([{"instruction": str(i), "input": "", "output": "x"} for i in range(100)])

    def split(rows, fraction, seed):
        return tuple(list(part["instruction"]) for part in reading.split_rows(rows, fraction, seed))

    train, val = split(rows, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == sorted(rows["instruction"])
    assert split(rows, 0.1, seed=3) == (train, val)
    assert split(rows, 0.1, seed=4) != (train, val)
    assert len(reading.split_rows(rows.select(range(3)), 0.01, seed=0)[1]) == 1  # a positive fraction holds out one
    with pytest.raises(DataError, match="leaves no training rows"):
        reading.split_rows(rows.select(range(1)), 0.5, seed=0)


def test_length_grouped_batches_cover_everything_once_and_cut_padding():
    lengths = [(i * 37) % 200 + 1 for i in range(512)]
    batches = batching.length_grouped_batches(lengths, batch_size=8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(512))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    random_batches = [list(range(i, i + 8)) for i in range(0, 512, 8)]
    assert padding(batches) < 0.1 < padding(random_batches)
    assert batching.length_grouped_batches(lengths, 8, seed=1) != batches


def test_collate_right_pads(tokenizer):
    a, b = encoding.Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), encoding.Example([8], [8])
    batch = batching.collate([a, b], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_image_field_is_resolved_against_the_data_file(tmp_path):
    rows = [{"instruction": "Colour?", "output": "red", "image": "pics/a.png"}, {"instruction": "Hi.", "output": "hi"}]
    path = write(tmp_path / "rows.json", json.dumps(rows))
    loaded = reading.load_rows(path)
    assert loaded[0]["image"] == str(tmp_path / "pics" / "a.png")
    assert loaded[1]["image"] is None
    bad = write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b", "image": 3}\n')
    with pytest.raises(sources.DataError, match=r"bad.jsonl: line 1: field 'image' must be a file path"):
        reading.load_rows(bad)
