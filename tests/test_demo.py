"""The Gradio demo driven through its HTTP API with gradio_client, on tiny random models served on localhost.

Every answer is checked against the library's own generation on the same model and prompt, so the demo can
only pass by routing each request to the right adapter, prompt and image.
"""

import threading
import time

import pytest
import torch
from conftest import build_tokenizer, spaced_answers, tiny_config
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from transformers import LlamaForCausalLM

from llama_adapter.config import ModelConfig, SamplingConfig
from llama_adapter.data import format_conversation, format_prompt
from llama_adapter.demo import BASE_CHOICE, load_choices
from llama_adapter.generation import WORKER_NAME, conversation_prompt, stream

pytestmark = pytest.mark.slow  # a real server: seconds per test, not milliseconds

NEW = 12  # new tokens per answer: enough to tell answers apart, quick on the tiny model


def greedy(max_new_tokens=NEW) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens)


@pytest.fixture
def client(served):
    return Client(served.url, verbose=False, download_files=False)  # a fresh session: an empty conversation


def say(client, text, choice, files=(), max_new_tokens=NEW, **sampling):
    """One chat turn; returns (chat messages, notes)."""
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    settings = {"temperature": 0.0, "top_p": 1.0} | sampling
    messages, notes, _ = client.predict(
        message, choice, settings["temperature"], settings["top_p"], max_new_tokens, api_name="/chat"
    )
    return messages, notes


def answer_text(messages) -> str:
    return squash(_text(messages[-1]))


def squash(text: str) -> str:
    """Whitespace runs as one space: the chat display trims a message and tidies its blank lines."""
    return " ".join(text.split())


def _text(message) -> str:
    content = message["content"]
    parts = content if isinstance(content, list) else [content]
    return "".join(p["text"] for p in parts if isinstance(p, dict) and p.get("type") == "text") or (
        content if isinstance(content, str) else ""
    )


def generated(model, prompt, image=None, max_new_tokens=NEW) -> str:
    """The library's own greedy answer, as the demo keeps it for later turns."""
    features = model.encode_images([image]) if image else None
    return "".join(stream(model, prompt, greedy(max_new_tokens), features))


def expected(model, prompt, image=None, max_new_tokens=NEW) -> str:
    """The same answer as the chat shows it."""
    return squash(generated(model, prompt, image, max_new_tokens))


@pytest.fixture
def shape_png(tmp_path):
    path = tmp_path / "shape.png"
    image = Image.new("RGB", (40, 40), "white")
    image.paste((200, 30, 30), (8, 8, 30, 30))
    image.save(path)
    return path


def test_text_turn_streams_the_adapters_greedy_answer(served, client):
    job = client.submit({"text": "Name a colour.", "files": []}, served.text, 0.0, 1.0, NEW, api_name="/chat")
    final = job.result()
    want = expected(served.choices[served.text], format_prompt("Name a colour."))
    assert answer_text(final[0]) == want and want
    # Streamed: the answer grew over several updates, each a prefix of the final one.
    partial = [answer_text(out[0]) for out in job.outputs() if out[0]]
    assert len({p for p in partial if p}) >= 3
    assert all(want.startswith(p) for p in partial)


def test_second_turn_sees_the_first_exchange(served, client):
    model = served.choices[served.text]
    first = generated(model, format_prompt("Hello there."))
    assert answer_text(say(client, "Hello there.", served.text)[0]) == squash(first)
    messages, notes = say(client, "And then?", served.text)
    assert answer_text(messages) == expected(model, format_conversation([("Hello there.", first)], "And then?"))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert notes == ""


def test_oldest_turns_leave_the_prompt_when_the_context_is_full(served, client):
    model = served.choices[served.text]
    budget = 40  # the tiny model has 256 positions (characters): the template alone takes about 140 of the rest
    room = model.context_length - budget
    history, shown = [], []
    for question in ["First question here?", "Second question here?", "Third question here?"]:
        messages, notes = say(client, question, served.text, max_new_tokens=budget)
        shown.append((answer_text(messages), notes))
        prompt, left_out = conversation_prompt(model.tokenizer, history, question, room)
        history.append((question, generated(model, prompt, max_new_tokens=budget)))
    assert left_out >= 1 and len(model.tokenizer(prompt)["input_ids"]) <= room
    assert f"the {left_out} oldest exchange(s) are left out" in shown[-1][1]
    assert [answer for answer, _ in shown] == [squash(answer) for _, answer in history]


def test_image_turn_conditions_the_multimodal_adapter(served, client, shape_png):
    model = served.choices[served.visual]
    messages, notes = say(client, "What colour is the shape?", served.visual, files=[shape_png])
    prompt = format_prompt("What colour is the shape?")
    with_image = generated(model, prompt, str(shape_png))
    assert answer_text(messages) == squash(with_image) != expected(model, prompt)
    assert any(isinstance(m["content"], dict | list) and "file" in str(m["content"]) for m in messages[:-1])
    assert notes == ""
    # A text-only follow-up still answers about the conversation's image.
    messages, _ = say(client, "Are you sure?", served.visual)
    followup = format_conversation([("What colour is the shape?", with_image)], "Are you sure?")
    assert answer_text(messages) == expected(model, followup, str(shape_png))


def test_image_to_a_text_only_adapter_answers_from_text_and_says_so(served, client, shape_png):
    messages, notes = say(client, "Describe it.", served.text, files=[shape_png])
    assert answer_text(messages) == expected(served.choices[served.text], format_prompt("Describe it."))
    assert "no visual encoder" in notes


def test_switching_adapters_answers_with_each_and_the_base_alone(served, client):
    prompt = format_prompt("Say something.")
    answers = {}
    for choice in [served.text, BASE_CHOICE, served.visual, served.text]:
        answers.setdefault(choice, []).append(
            answer_text(say(Client(served.url, verbose=False), "Say something.", choice)[0])
        )
    assert answers[served.text][0] == answers[served.text][1] == expected(served.choices[served.text], prompt)
    assert answers[served.visual][0] == expected(served.choices[served.visual], prompt)
    # The base alone is the plain Hugging Face model: no prompts of the other adapters leak into it.
    plain = LlamaForCausalLM.from_pretrained(served.root / "base")
    spaced_answers(plain)
    tokenizer = served.choices[BASE_CHOICE].tokenizer
    ids = tokenizer(prompt, return_tensors="pt")
    out = plain.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain_answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answers[BASE_CHOICE][0] == squash(plain_answer)
    assert len(set(answers[served.text][:1] + answers[BASE_CHOICE] + answers[served.visual])) == 3


def test_adapter_panel_shows_gates_config_and_parameter_count(served, client):
    summary, plot, config = client.predict(served.visual, api_name="/describe")
    model = served.choices[served.visual]
    assert f"{model.num_trainable_parameters():,} trainable parameters" in summary and "CLIP" in summary
    assert config["trainable_parameters"] == model.num_trainable_parameters()
    assert config["visual"]["clip_model"] == model.visual_config.clip_model
    assert plot is not None
    summary, plot, config = client.predict(BASE_CHOICE, api_name="/describe")
    assert "no prompts" in summary and plot is None


def test_gate_figure_holds_tanh_of_every_gate(served):
    from llama_adapter.demo import gate_figure

    model = served.choices[served.text]
    image = gate_figure(model).axes[0].images[0]
    gates = model.gates()
    assert image.get_array().shape == (len(gates), model.base.config.num_attention_heads)
    assert torch.allclose(torch.tensor(image.get_array()), torch.stack([gates[i] for i in sorted(gates)]))


def test_retry_regenerates_the_last_answer(served, client):
    first = answer_text(say(client, "Tell me a fact.", served.text)[0])
    messages, _ = client.predict(served.text, 0.0, 1.0, NEW, api_name="/retry")
    assert answer_text(messages) == first and len(messages) == 2  # replaced, not appended


def test_sampled_retry_gives_a_new_answer(served, client):
    first = answer_text(say(client, "Tell me a story.", served.text, temperature=1.5, max_new_tokens=30)[0])
    retried = [answer_text(client.predict(served.text, 1.5, 1.0, 30, api_name="/retry")[0]) for _ in range(3)]
    assert any(r != first for r in retried)


def test_clear_starts_a_fresh_conversation(served, client):
    say(client, "Remember this.", served.text)
    client.predict(api_name="/clear")
    messages, _ = say(client, "What did I say?", served.text)
    assert len(messages) == 2
    assert answer_text(messages) == expected(served.choices[served.text], format_prompt("What did I say?"))


@pytest.mark.parametrize(
    ("text", "files", "message"),
    [
        ("", [], "Type a message first"),
        ("   ", [], "Type a message first"),
        ("", ["shape"], "an image alone asks nothing"),
        ("What is this?", ["notes.txt"], "Invalid file type"),  # Gradio's own check of the file's type
        ("What is this?", ["text-named.png"], "text-named.png cannot be used as an image"),
        ("What is this?", ["broken.png"], "broken.png cannot be used as an image"),
    ],
)
def test_bad_messages_get_a_clear_error(served, client, shape_png, tmp_path, text, files, message):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "text-named.png").write_text("not an image either")
    (tmp_path / "broken.png").write_bytes(shape_png.read_bytes()[:60])  # a PNG cut short
    paths = [shape_png if f == "shape" else tmp_path / f for f in files]
    with pytest.raises(AppError, match=message):
        say(client, text, served.visual, files=paths)


def test_decompression_bomb_is_refused(served, client, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels in a few kilobytes
    assert bomb.stat().st_size < 100_000
    with pytest.raises(AppError, match="too many pixels"):
        say(client, "What is this?", served.visual, files=[bomb])


def test_oversized_upload_is_refused(served, client, tmp_path):
    big = tmp_path / "big.bmp"
    Image.effect_noise((2000, 2000), 64).convert("RGB").save(big)  # 12 MB, over the 10 MB limit
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        say(client, "What is this?", served.visual, files=[big])


def test_answer_length_and_message_length_are_bounded_by_the_context(served, client):
    with pytest.raises(AppError, match="greater than maximum value 128"):  # the slider stops at half the context
        say(client, "Hi.", served.text, max_new_tokens=129)
    with pytest.raises(AppError, match="the message is 3[0-9][0-9] tokens .* room for 244"):
        say(client, "Tell me more. " * 16, served.text)


def test_stop_ends_generation_on_the_server(served, client):
    base = served.choices[BASE_CHOICE].base
    slow = base.register_forward_hook(lambda *args: time.sleep(0.05))  # ~20 tokens/s: time to press Stop
    try:
        job = client.submit({"text": "Go on.", "files": []}, served.text, 0.0, 1.0, 100, api_name="/chat")
        deadline = time.time() + 30  # Stop once the first words are out: a busy machine may take seconds to get there
        while not any(answer_text(out[0]) for out in job.outputs() if out[0]) and time.time() < deadline:
            time.sleep(0.05)
        job.cancel()
        deadline = time.time() + 2.5  # the whole answer would take 5 s more: Stop must end it well before
        while any(t.name == WORKER_NAME for t in threading.enumerate()) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(t.name == WORKER_NAME for t in threading.enumerate()), "generation went on after Stop"
    finally:
        slow.remove()
    streamed = [answer_text(out[0]) for out in job.outputs() if out[0]]
    assert 0 < len(streamed[-1]) < 90


def test_waiting_users_each_get_their_answer(served):
    questions = [f"Question number {i}?" for i in range(4)]
    jobs = [
        Client(served.url, verbose=False).submit({"text": q, "files": []}, served.text, 0.0, 1.0, NEW, api_name="/chat")
        for q in questions
    ]
    got = [answer_text(job.result(timeout=120)[0]) for job in jobs]
    assert got == [expected(served.choices[served.text], format_prompt(q)) for q in questions]


def test_demo_refuses_an_adapter_for_another_base(served, tmp_path):
    torch.manual_seed(1)
    tokenizer = build_tokenizer()
    other = LlamaForCausalLM._from_config(tiny_config(tokenizer, hidden_size=32, intermediate_size=64))
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different base model"):
        load_choices(ModelConfig(base=str(tmp_path / "other"), precision="fp32"), (served.text,))


def test_base_choice_alone_without_adapters(served):
    choices = load_choices(ModelConfig(base=str(served.root / "base"), precision="fp32"), ())
    assert list(choices) == [BASE_CHOICE]
    assert all(g.abs().max() == 0 for g in choices[BASE_CHOICE].gates().values())
