"""Conversational training data (OpenAI `messages`, ShareGPT `conversations`) and the prompt templates: rows read
from every kind of source, the loss on the assistant's turns alone, the template chosen and recorded, and an adapter
trained in the chat template answered in it by the library and the server alike."""

import json

import datasets
import pytest
import torch
from conftest import build_tokenizer, spaced_answers, tiny_config
from test_serve import Server
from transformers import LlamaForCausalLM

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig
from llama_adapter.data import encoding, reading, templates
from llama_adapter.data.encoding import IGNORE_INDEX
from llama_adapter.data.sources import DataError
from llama_adapter.serving.generation import conversation_prompt, generate_batch
from llama_adapter.train import TrainConfig, train

# A ChatML-like template in the tiny tokenizer's characters, ending each turn with its EOS token, as SmolLM2's does.
CHAT = (
    "{% for m in messages %}{{ '#' + m['role'] + '\n' + m['content'] + '</s>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '#assistant\n' }}{% endif %}"
)
TWO_TURNS = [
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT
    return tokenizer


def chars(tokenizer, text: str) -> list[int]:
    """The tiny tokenizer's ids of `text`, one per character, written out by hand ('$' stands for EOS)."""
    return [tokenizer.eos_token_id if c == "$" else tokenizer.convert_tokens_to_ids(c) for c in text]


def hand_built(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """BOS, then each piece's ids, labelled where it is trained on."""
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for text, trained in pieces:
        ids += chars(tokenizer, text)
        labels += chars(tokenizer, text) if trained else [IGNORE_INDEX] * len(text)
    return ids, labels


def conversation_row(messages, image=None) -> dict:
    return {"instruction": None, "input": None, "output": None, "messages": json.dumps(messages), "image": image}


def test_a_two_turn_conversations_loss_mask_in_the_chat_template_is_the_hand_built_one(chat_tokenizer):
    example = encoding.encode(chat_tokenizer, conversation_row(TWO_TURNS), 512, "chat")
    pieces = [  # (text, trained on): '$' is EOS, which the template writes after each turn
        ("#user\nHi.$\n#assistant\n", False),
        ("Hello.$\n", True),
        ("#user\nName a colour.$\n#assistant\n", False),
        ("Red.$\n", True),
    ]
    ids, labels = hand_built(chat_tokenizer, pieces)
    assert example.input_ids == ids
    assert example.labels == labels
    prompt = templates.prompt("chat", chat_tokenizer, TWO_TURNS[:3])
    assert chat_tokenizer(prompt)["input_ids"] == ids[: labels.index(chars(chat_tokenizer, "R")[0])]


def test_a_two_turn_conversation_in_the_alpaca_template_trains_each_answer_and_one_eos(chat_tokenizer):
    system = {"role": "system", "content": "Be brief."}
    example = encoding.encode(chat_tokenizer, conversation_row([system] + TWO_TURNS), 1024, "alpaca")
    pieces = [
        ("Be brief.\n\n### Instruction:\nHi.\n\n### Response:\n", False),
        ("Hello.", True),
        ("\n\n### Instruction:\nName a colour.\n\n### Response:\n", False),
        ("Red.$", True),
    ]
    ids, labels = hand_built(chat_tokenizer, pieces)
    assert (example.input_ids, example.labels) == (ids, labels)
    # The prompt of the second answer is the one the demo and the server build after the first exchange.
    answered = conversation_prompt(chat_tokenizer, [("Hi.", "Hello.")], "Name a colour.", 10_000, "alpaca")[0]
    assert answered == templates.prompt("alpaca", chat_tokenizer, TWO_TURNS[:3])
    assert answered.startswith(templates.HEADER_NO_INPUT) and answered.endswith("Response:\n")


def test_an_alpaca_row_encodes_as_before_templates_and_as_one_exchange_in_chat(chat_tokenizer):
    row = {"instruction": "Add.", "input": "1 2", "output": "3", "messages": None, "image": None}
    alpaca = encoding.encode(chat_tokenizer, row, 512, "alpaca")
    prompt = chat_tokenizer(templates.format_prompt("Add.", "1 2"))["input_ids"]
    assert alpaca.input_ids == prompt + chars(chat_tokenizer, "3$")
    assert alpaca.labels == [IGNORE_INDEX] * len(prompt) + chars(chat_tokenizer, "3$")
    chat = encoding.encode(chat_tokenizer, row, 512, "chat")
    assert chat.input_ids == [chat_tokenizer.bos_token_id] + chars(
        chat_tokenizer, "#user\nAdd.\n\n1 2$\n#assistant\n3$\n"
    )


def test_a_chat_template_that_writes_bos_itself_gives_one_bos():
    tokenizer = build_tokenizer()  # adds BOS itself, as LLaMA's tokenizers do
    tokenizer.chat_template = "{{ bos_token }}" + CHAT
    example = encoding.encode(tokenizer, conversation_row(TWO_TURNS[:2]), 512, "chat")
    assert example.input_ids == [tokenizer.bos_token_id] + chars(tokenizer, "#user\nHi.$\n#assistant\nHello.$\n")
    assert templates.prompt("chat", tokenizer, TWO_TURNS[:1]) == "#user\nHi.</s>\n#assistant\n"


def write_sources(folder, records: list[dict]) -> dict[str, str]:
    """The same records as JSONL, a JSON list, CSV (each conversation a JSON cell), Parquet and a saved dataset."""
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "rows.json").write_text(json.dumps(records))
    flat = [{key: json.dumps(value) if isinstance(value, list) else value for key, value in r.items()} for r in records]
    datasets.Dataset.from_list(flat).to_csv(folder / "rows.csv", index=False)
    datasets.Dataset.from_list(records).to_parquet(folder / "rows.parquet")
    datasets.Dataset.from_list(records).save_to_disk(folder / "saved")
    return {kind: str(folder / name) for kind, name in
            [("jsonl", "rows.jsonl"), ("json", "rows.json"), ("csv", "rows.csv"), ("parquet", "rows.parquet"),
             ("saved", "saved")]}  # fmt: skip


@pytest.mark.parametrize("shape", ["messages", "sharegpt"])
def test_conversations_read_alike_from_every_kind_of_source(tmp_path, shape):
    if shape == "messages":
        records = [{"messages": TWO_TURNS}, {"messages": [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:2]}]
    else:
        sharegpt = [
            {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in TWO_TURNS
        ]
        records = [
            {"conversations": sharegpt},
            {"conversations": [{"from": "system", "value": "Be brief."}] + sharegpt[:2]},
        ]
    expected = [TWO_TURNS, [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:2]]
    for kind, source in write_sources(tmp_path, records).items():
        rows = reading.load_rows(source)
        assert [json.loads(m) for m in rows["messages"]] == expected, kind
        assert rows["instruction"] == [None, None] and rows["image"] == [None, None], kind


def test_a_conversations_image_and_llavas_image_mark(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"")  # the path is kept; images are opened when encoded
    rows = reading.load_rows(write_sources(tmp_path, [
        {"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                               {"from": "gpt", "value": "A cat."}]},
        {"images": ["cat.png"], "messages": [{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "And this?"}]},
                                             {"role": "assistant", "content": "A cat."}]},
    ])["jsonl"])  # fmt: skip
    assert rows["image"] == [str(tmp_path / "cat.png")] * 2
    assert [json.loads(m)[0]["content"] for m in rows["messages"]] == ["What is it?", "And this?"]


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "user", "content": "Hi."}], r"row 0: field 'messages': the last message must be the assistant's"),
        (
            [{"role": "assistant", "content": "Hi."}],
            r"field 'messages'\[0\]: assistant message out of turn, where the user's comes",
        ),
        (
            TWO_TURNS[:1] * 2 + TWO_TURNS[1:2],
            r"field 'messages'\[1\]: user message out of turn, where the assistant's comes",
        ),
        ([{"role": "robot", "content": "Hi."}], r"field 'messages'\[0\]: role 'robot' is none of system, developer"),
        ([{"role": "user", "content": 5}] + TWO_TURNS[1:2], r"field 'messages'\[0\]: 'content' must be text"),
        (
            [TWO_TURNS[0], {"role": "assistant", "content": " "}],
            r"field 'messages'\[1\]: the assistant message is empty",
        ),
        ("[not json", r"field 'messages': not a JSON list of messages"),
        ([], r"field 'messages': expected a non-empty list of messages"),
    ],
)
def test_a_bad_conversation_is_refused_naming_its_row_and_message(tmp_path, messages, error):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": TWO_TURNS}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl: line 2: {error}".replace("row 0: ", "")):
        reading.load_rows(path)
    skipped = []
    assert len(reading.load_rows(path, skipped)) == 1 and len(skipped) == 1


def test_the_template_follows_the_data_and_the_base(chat_tokenizer):
    plain = build_tokenizer()
    assert templates.choose("auto", True, chat_tokenizer) == "chat"
    assert templates.choose("auto", False, chat_tokenizer) == "alpaca"
    assert templates.choose("auto", True, plain) == "alpaca"
    assert templates.choose("alpaca", True, chat_tokenizer) == "alpaca"
    assert templates.choose("chat", False, chat_tokenizer) == "chat"
    with pytest.raises(ValueError, match="--template chat: this base's tokenizer has no chat template"):
        templates.choose("chat", True, plain)


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    rewriting = build_tokenizer()
    rewriting.chat_template = "{{ '#' ~ messages | length ~ '\n' }}" + CHAT  # the count changes every prefix
    with pytest.raises(DataError, match="does not render a conversation's turns as prefixes of each other"):
        encoding.encode(rewriting, conversation_row(TWO_TURNS), 512, "chat")


def test_an_adapter_trained_on_chat_data_answers_in_the_chat_template_through_the_server(chat_tokenizer, tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(tiny_config(chat_tokenizer, initializer_range=0.3), attn_implementation="sdpa")
    base.save_pretrained(tmp_path / "base")
    chat_tokenizer.save_pretrained(tmp_path / "base")
    model = LlamaAdapterModel.from_base(str(tmp_path / "base"), AdapterConfig(adapter_len=2, adapter_layers=2))
    rows = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[2:]}]
    cfg = TrainConfig(data="chat rows", out=str(tmp_path / "run"), max_steps=2, val_fraction=0.0, lr=0.1)
    assert train(cfg, model.config, model, rows=rows)["template"] == "chat"
    loaded = LlamaAdapterModel.load(tmp_path / "run")
    assert loaded.template == "chat"
    spaced_answers(loaded.base)  # answers of max_tokens characters, whatever the prompt: the prompt alone differs
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    server = Server({"chat": loaded})
    try:
        for messages in (TWO_TURNS[:1], TWO_TURNS[:3]):
            served = server.client().chat.completions.create(
                model="chat", messages=messages, max_tokens=12, temperature=0
            )
            earlier = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
            prompt, _ = conversation_prompt(loaded.tokenizer, earlier, messages[-1]["content"], 10_000, "chat")
            assert prompt == chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ours = loaded.generate(messages[0]["content"], sampling=sampling) if len(messages) == 1 else None
            assert served.choices[0].message.content == generate_batch(loaded, [prompt], sampling)[0]
            assert ours is None or ours == served.choices[0].message.content
        alpaca = generate_batch(loaded, [templates.format_prompt(TWO_TURNS[0]["content"])], sampling)[0]
        assert alpaca != ours  # the template reaches the answer: the same words in Alpaca's prompt answer otherwise
    finally:
        server.stop()


def test_a_chat_adapter_is_refused_on_a_base_whose_tokenizer_has_no_chat_template(chat_tokenizer, tmp_path):
    base = LlamaForCausalLM._from_config(tiny_config(chat_tokenizer), attn_implementation="sdpa")
    model = LlamaAdapterModel(base, chat_tokenizer, AdapterConfig(adapter_len=2, adapter_layers=2))
    model.template = "chat"
    model.save(tmp_path / "chat")
    base.save_pretrained(tmp_path / "plain")
    build_tokenizer().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="trained in its base's chat template, which this base's tokenizer lacks"):
        LlamaAdapterModel.load(tmp_path / "chat", base=str(tmp_path / "plain"))
