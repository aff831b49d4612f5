"""The Gradio demo driven through its HTTP API with gradio_client, on tiny random models served on localhost.

Every answer is checked against the library's own generation on the same model and prompt, so the demo can
only pass by routing each request to the right adapter, prompt and image. The last tests call the demo's
functions directly: what the chat shows (safe_markdown) and what its errors say, without a server.
"""

import inspect
import json
import re
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from conftest import build_tokenizer, no_step_for, spaced_answers, tiny_config
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LlamaForCausalLM

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.config import ModelConfig, SamplingConfig, VisualConfig
from llama_adapter.data.templates import format_conversation, format_prompt
from llama_adapter.serving import demo
from llama_adapter.serving.demo import BASE_CHOICE, load_choices, safe_markdown
from llama_adapter.serving.generation import conversation_prompt, stream

slow = pytest.mark.slow  # a real server: seconds per test, not milliseconds (the tests without one are quick)

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


@slow
def test_text_turn_streams_the_adapters_greedy_answer(served, client):
    job = client.submit({"text": "Name a colour.", "files": []}, served.text, 0.0, 1.0, NEW, api_name="/chat")
    final = job.result()
    want = expected(served.choices[served.text], format_prompt("Name a colour."))
    assert answer_text(final[0]) == want and want
    # Streamed: the answer grew over several updates, each a prefix of the final one.
    partial = [answer_text(out[0]) for out in job.outputs() if out[0]]
    assert len({p for p in partial if p}) >= 3
    assert all(want.startswith(p) for p in partial)


@slow
def test_second_turn_sees_the_first_exchange(served, client):
    model = served.choices[served.text]
    first = generated(model, format_prompt("Hello there."))
    assert answer_text(say(client, "Hello there.", served.text)[0]) == squash(first)
    messages, notes = say(client, "And then?", served.text)
    assert answer_text(messages) == expected(model, format_conversation([("Hello there.", first)], "And then?"))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert notes == ""


@slow
def test_oldest_turns_leave_the_prompt_when_the_context_is_full(served, client):
    model = served.choices[served.text]
    # Positions are characters on the tiny model and the template alone takes about 140: with answers a quarter of
    # the context long, the third question cannot have both earlier exchanges in its prompt.
    budget = model.context_length // 4
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


@slow
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


@slow
def test_image_to_a_text_only_adapter_answers_from_text_and_says_so(served, client, shape_png):
    messages, notes = say(client, "Describe it.", served.text, files=[shape_png])
    assert answer_text(messages) == expected(served.choices[served.text], format_prompt("Describe it."))
    assert "no visual encoder" in notes


@slow
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


@slow
def test_adapter_panel_shows_gates_config_and_parameter_count(served, client):
    summary, plot, config = client.predict(served.visual, api_name="/describe")
    model = served.choices[served.visual]
    assert f"{model.num_trainable_parameters():,} trainable parameters" in summary and "CLIP" in summary
    assert config["trainable_parameters"] == model.num_trainable_parameters()
    assert config["visual"]["clip_model"] == model.visual_config.clip_model
    assert plot is not None
    summary, plot, config = client.predict(BASE_CHOICE, api_name="/describe")
    assert "no prompts" in summary and plot is None


@slow
def test_gate_figure_holds_tanh_of_every_gate(served):
    from llama_adapter.serving.demo import gate_figure

    model = served.choices[served.text]
    image = gate_figure(model).axes[0].images[0]
    gates = model.gates()
    assert image.get_array().shape == (len(gates), model.base.config.num_attention_heads)
    assert torch.allclose(torch.tensor(image.get_array()), torch.stack([gates[i] for i in sorted(gates)]))


@slow
def test_retry_regenerates_the_last_answer(served, client):
    first = answer_text(say(client, "Tell me a fact.", served.text)[0])
    messages, _ = client.predict(served.text, 0.0, 1.0, NEW, api_name="/retry")
    assert answer_text(messages) == first and len(messages) == 2  # replaced, not appended


@slow
def test_sampled_retry_gives_a_new_answer(served, client):
    first = answer_text(say(client, "Tell me a story.", served.text, temperature=1.5, max_new_tokens=30)[0])
    retried = [answer_text(client.predict(served.text, 1.5, 1.0, 30, api_name="/retry")[0]) for _ in range(3)]
    assert any(r != first for r in retried)


@slow
def test_clear_starts_a_fresh_conversation(served, client):
    say(client, "Remember this.", served.text)
    client.predict(api_name="/clear")
    messages, _ = say(client, "What did I say?", served.text)
    assert len(messages) == 2
    assert answer_text(messages) == expected(served.choices[served.text], format_prompt("What did I say?"))


@slow
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
    with pytest.raises(AppError, match=message) as caught:
        say(client, text, served.visual, files=paths)
    assert_no_paths(str(caught.value))  # the upload lies in Gradio's folder, /tmp/gradio/<hash>/ by default


@slow
def test_decompression_bomb_is_refused(served, client, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 megapixels in a few kilobytes
    assert bomb.stat().st_size < 100_000
    with pytest.raises(AppError, match="too many pixels"):
        say(client, "What is this?", served.visual, files=[bomb])


@slow
def test_oversized_upload_is_refused(served, client, tmp_path):
    big = tmp_path / "big.bmp"
    Image.effect_noise((2000, 2000), 64).convert("RGB").save(big)  # 12 MB, over the 10 MB limit
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        say(client, "What is this?", served.visual, files=[big])


@slow
def test_answer_length_and_message_length_are_bounded_by_the_context(served, client):
    context = served.choices[served.text].context_length
    with pytest.raises(AppError, match=f"greater than maximum value {context // 2}"):  # the slider's end: half of it
        say(client, "Hi.", served.text, max_new_tokens=context // 2 + 1)
    with pytest.raises(AppError, match=rf"the message is \d+ tokens .* room for {context - NEW}"):
        say(client, "Tell me more. " * (context // 14), served.text)  # the context's length in characters


@slow
def test_sessions_on_different_adapters_decode_in_one_batch(served):
    """Two browser sessions, each talking to another adapter: their answers are each adapter's own, and they were
    decoded together, rows of both in the same forward passes."""
    base = served.choices[BASE_CHOICE].base
    rows = []
    hook = base.register_forward_hook(
        lambda module, args, kwargs, out: rows.append((kwargs["input_ids"].shape[0], time.sleep(0.05))),
        with_kwargs=True,
    )
    try:
        jobs = {
            choice: Client(served.url, verbose=False).submit(
                {"text": "Say something.", "files": []}, choice, 0.0, 1.0, NEW, api_name="/chat"
            )
            for choice in (served.text, served.visual)
        }
        answers = {choice: answer_text(job.result()[0]) for choice, job in jobs.items()}
    finally:
        hook.remove()
    for choice, answer in answers.items():
        assert answer == expected(served.choices[choice], format_prompt("Say something.")), choice
    assert max(batch for batch, _ in rows) == 2


@slow
def test_stop_ends_generation_on_the_server(served, client):
    base = served.choices[BASE_CHOICE].base
    steps = []
    slow = base.register_forward_hook(lambda *args: steps.append(time.sleep(0.05)))  # ~20 tokens/s: time to Stop
    try:
        job = client.submit({"text": "Go on.", "files": []}, served.text, 0.0, 1.0, 100, api_name="/chat")
        deadline = time.time() + 30  # Stop once the first words are out: a busy machine may take seconds to get there
        while not any(answer_text(out[0]) for out in job.outputs() if out[0]) and time.time() < deadline:
            time.sleep(0.05)
        job.cancel()
        deadline = time.time() + 2.5  # the whole answer would take 5 s more: Stop must end it well before
        while not (stopped := no_step_for(steps, 0.4)) and time.time() < deadline:
            pass
        assert stopped, "generation went on after Stop"
    finally:
        slow.remove()
    streamed = [answer_text(out[0]) for out in job.outputs() if out[0]]
    assert 0 < len(streamed[-1]) < 90


@slow
def test_waiting_users_each_get_their_answer(served):
    questions = [f"Question number {i}?" for i in range(4)]
    jobs = [
        Client(served.url, verbose=False).submit({"text": q, "files": []}, served.text, 0.0, 1.0, NEW, api_name="/chat")
        for q in questions
    ]
    got = [answer_text(job.result(timeout=120)[0]) for job in jobs]
    assert got == [expected(served.choices[served.text], format_prompt(q)) for q in questions]


@slow
def test_demo_refuses_an_adapter_for_another_base(served, tmp_path):
    torch.manual_seed(1)
    tokenizer = build_tokenizer()
    other = LlamaForCausalLM._from_config(tiny_config(tokenizer, hidden_size=32, intermediate_size=64))
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different base model"):
        load_choices(ModelConfig(base=str(tmp_path / "other"), precision="fp32"), (served.text,))


@slow
def test_base_choice_alone_without_adapters(served):
    choices = load_choices(ModelConfig(base=str(served.root / "base"), precision="fp32"), ())
    assert list(choices) == [BASE_CHOICE]
    assert all(g.abs().max() == 0 for g in choices[BASE_CHOICE].gates().values())


def component(config: dict, **props) -> dict:
    """The page's component whose props hold these values (from the config gradio_client reads)."""
    return next(c for c in config["components"] if props.items() <= c.get("props", {}).items())


@slow
def test_with_no_adapter_given_the_demo_opens_with_the_shelfs_alpaca(shelf_served):
    config = Client(shelf_served.url, verbose=False).config
    chooser = component(config, elem_id="adapter")["props"]
    assert chooser["value"] == "alpaca"
    assert [choice[0] for choice in chooser["choices"]] == [BASE_CHOICE, "alpaca", "shapes"]


@slow
def test_each_example_selects_its_adapter_and_the_image_ones_select_shapes(shelf_served):
    client = Client(shelf_served.url, verbose=False, download_files=False)
    samples = component(client.config, label="Examples")["props"]["samples"]
    adapters = {(message["text"], bool(message["files"])): adapter for message, adapter in samples}
    assert set(adapters.values()) == {"alpaca", "shapes"}
    assert all(adapter == ("shapes" if has_image else "alpaca") for (_, has_image), adapter in adapters.items())
    # The image example, sent to the adapter it selects, is answered from the image.
    message, adapter = next(sample for sample in samples if sample[1] == "shapes")
    image = demo.EXAMPLES / Path(message["files"][0]["path"]).name
    messages, notes = say(client, message["text"], adapter, files=[image])
    want = expected(shelf_served.choices["shapes"], format_prompt(message["text"]), str(image))
    assert answer_text(messages) == want and not notes
    assert want != expected(shelf_served.choices["shapes"], format_prompt(message["text"]))


@slow
def test_adapters_given_come_first_and_the_shelfs_follow(served, shelf_served):
    choices = load_choices(ModelConfig(base=str(served.root / "base"), precision="fp32"), (served.text,))
    assert list(choices) == [BASE_CHOICE, served.text, "alpaca", "shapes"]
    examples = demo._examples(choices, served.text)
    assert {adapter for message, adapter in examples if not message["files"]} == {served.text}
    assert {adapter for message, adapter in examples if message["files"]} == {"shapes"}
    text_only = {BASE_CHOICE: choices[BASE_CHOICE], served.text: choices[served.text]}
    assert all(not message["files"] for message, _ in demo._examples(text_only, served.text))


@slow
def test_dylora_rank_applies_to_the_adapters_given_not_the_shelfs(served, shelf_served):
    dylora = LlamaAdapterModel.from_base(str(served.root / "base"), AdapterConfig(method="dylora", lora_rank=4))
    dylora.save(served.root / "dylora")
    model_cfg = ModelConfig(base=str(served.root / "base"), precision="fp32", dylora_rank=2)
    choices = load_choices(model_cfg, (str(served.root / "dylora"),))
    assert list(choices)[2:] == ["alpaca", "shapes"]
    assert {lora.rank for lora in choices[str(served.root / "dylora")].method.adapters} == {2}


@slow
def test_a_message_that_is_not_unicode_text_gets_a_clear_error_through_the_json_api(served):
    """gradio_client cannot even send "\\ud800"; Gradio's JSON API takes it, as any HTTP client may send it."""
    body = json.dumps({"data": [{"text": "hi \ud800", "files": []}, served.text, 0.0, 1.0, NEW]}).encode()
    call = urllib.request.Request(f"{served.url}gradio_api/call/chat", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=30) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{served.url}gradio_api/call/chat/{event}", timeout=30) as response:
        stream = response.read().decode()
    assert "event: error" in stream
    assert "Your message: not valid Unicode text (a lone surrogate '\\\\ud800' at character 3)" in stream


# ----------------------------------------------------------------------------------------------------------
# What the chat shows: safe_markdown. Gradio's chat renders Markdown and keeps <img>, <video>, srcset and
# style attributes, so the text it is given must hold nothing that loads (tests/test_demo_browser.py shows it
# in a browser).

# The Markdown that still loads something, read as marked.js (Gradio's renderer) reads code fences: a closing
# fence may carry more fence characters. Inside code, nothing loads; outside, a tag, an image, a diagram.
# "<code>" and "</code>" are safe_markdown's own, around inline code that held one of them.
LOADER_IN_TEXT = re.compile(r"<[A-Za-z/!?]|!\[|```mermaid")
FENCE_OPENING = re.compile(r" {0,3}(`{3,}(?=[^`]*$)|~{3,})(.*)")


def loading_markup(shown: str) -> list[str]:
    found, fence = [], None
    for line in re.split(r"\r\n|\r|\n", shown):
        if fence:
            if re.fullmatch(rf" {{0,3}}{re.escape(fence)}[`~]* *", line):
                fence = None
        elif opening := FENCE_OPENING.fullmatch(line):
            fence = opening[1]
            found += [line] if opening[2].strip().startswith("mermaid") else []
        else:
            found += LOADER_IN_TEXT.findall(line.replace("<code>", "").replace("</code>", ""))
    return found


URLS = st.builds(
    "{}//{}/{}".format,
    st.sampled_from(["http:", "https:", "", "HTTP:"]),
    st.sampled_from(["198.51.100.7", "example.com", "x.test:8080"]),
    st.text("abc./?=&%", max_size=8),
)
LOADERS = st.one_of(
    URLS.map(form.format)
    for form in [
        "![a]({})",
        "![a][r]\n\n[r]: {}",
        '<img src="{}">',
        "<IMG SRC={}>",
        "<img\nsrc={}>",
        '<video poster="{0}" src="{0}"></video>',
        "<audio src={} autoplay>",
        "<iframe src='{}'>",
        '<div style="background:url({})">',
        '<picture><source srcset="{}"></picture>',
        '<svg><image href="{}"/></svg>',
        "<{}>",
        "{0}<img src={0}>",  # a bare URL right before a tag
        "`<img src={}>`",
        '```mermaid\ngraph TD; A["<img src={}>"]\n```',
    ]
)
MARKUP = st.sampled_from(
    ["```", "~~~", "````", "```mermaid", "   ```", "    ```", "\n", "\r\n", "\r", "\n\n", "> ", "- ", "1. "]
    + ["\\", "`", "``", "$$", "<", "!", "[", "]", "(", ")", "a < b", "&lt;", "\t", " ", "|", "<code>", "</code>"]
)
# Whole fence lines, and lines that close a fence for marked.js but not for CommonMark ("```~").
FENCE_LINES = st.sampled_from(["```", "~~~", "````", "```~", "~~~`", "  ```", "```python", "```mermaid"]).map(
    "\n{}\n".format
)
MIXED = st.lists(st.one_of(st.text(max_size=10), LOADERS, MARKUP, FENCE_LINES), max_size=20).map("".join)


@settings(deadline=None, derandomize=True, database=None, max_examples=200)
@given(MIXED)
def test_safe_markdown_leaves_nothing_that_loads(text):
    shown = safe_markdown(text)
    assert loading_markup(shown) == []
    assert inspect.cleandoc(shown) == shown  # what Gradio does to a chat message changes nothing more


@settings(deadline=None, derandomize=True, database=None, max_examples=200)
@given(st.text().filter(lambda t: not re.search(r"<[A-Za-z/!?]|!\[|`|~", t)))
def test_safe_markdown_shows_plain_text_unchanged(text):
    assert safe_markdown(text) == inspect.cleandoc(text)  # Gradio tidies white space in any case


def test_safe_markdown_keeps_code_lists_and_comparisons_as_written():
    answer = "If a < b:\n\n```python\nif a < b:\n    print('<b>bold</b>', x<y)\n```\n\n- one\n- two"
    assert safe_markdown(answer) == answer
    # A fence in a list item moves to the left margin, where no list can take in a line of it.
    assert safe_markdown("1. Make it:\n   ```html\n   <img src=x>\n   ```\n2. Done.") == (
        "1. Make it:\n```html\n<img src=x>\n```\n2. Done."
    )
    assert safe_markdown("````\n```\n<img src=x>\n") == "````\n```\n<img src=x>\n````"  # unclosed: closed
    assert safe_markdown("Use `vector<int>`, `a < b` or ![x](y).") == (
        "Use <code>vector&lt;int\\></code>, `a < b` or !\\[x](y)."
    )
    assert safe_markdown("Inline ```mermaid``` too") == "Inline <code>mermaid</code> too"


# ----------------------------------------------------------------------------------------------------------
# What the demo's errors and notes say: file names, never a path on the server.

GREEDY = (0.0, 1.0, 4)  # temperature, top_p, max new tokens


@pytest.fixture
def chat(make_model, tiny_clip, tmp_path):
    """The demo's event handlers over a text-only and a multimodal tiny adapter, chosen by absolute folder."""
    adapters = tmp_path / "my adapters"  # a space: a path is reduced whole all the same
    folders = SimpleNamespace(text=str(adapters / "text"), visual=str(adapters / "visual"))
    models = {folders.text: make_model(), folders.visual: make_model(visual=VisualConfig(clip_model=tiny_clip))}
    return SimpleNamespace(handlers=demo._Chat(models), **vars(folders))


@pytest.fixture
def upload(tmp_path):
    """Where Gradio keeps an upload: <its temporary folder>/<hash>/<the file's name>."""
    folder = tmp_path / "gradio" / "0f5d370fec7490769d3a2f4c0b90b570"
    folder.mkdir(parents=True)
    return folder / "my photo.png"


def error(handler) -> str:
    with pytest.raises(gr.Error) as caught:
        list(handler)
    return caught.value.message


def assert_no_paths(message: str, *paths) -> None:
    """No absolute path, and no folder of the paths given (the file's own name may be there)."""
    assert message
    assert not re.search(r"(^|[\s'\"(=])([A-Za-z]:)?[/\\]\w", message), message
    for path in paths:
        assert not any(folder in message for folder in Path(path).parent.parts[1:]), message


def send(chat, text, choice, files=(), turns=()):
    return chat.handlers.send({"text": text, "files": [{"path": str(f)} for f in files]}, list(turns), choice, *GREEDY)


def not_an_image(chat, upload):
    upload.write_text("these are not pixels")
    return error(send(chat, "What is it?", chat.visual, [upload]))


def cut_short(chat, upload):
    upload.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return error(send(chat, "What is it?", chat.visual, [upload]))


def gone(chat, upload):
    return error(send(chat, "What is it?", chat.visual, [upload]))


def gone_since_an_earlier_turn(chat, upload):  # the library's own error, from encoding the image
    earlier = {"text": "What is it?", "image": str(upload), "answer": "A cat."}
    return error(send(chat, "Are you sure?", chat.visual, turns=[earlier]))


@pytest.mark.parametrize("make_error", [not_an_image, cut_short, gone, gone_since_an_earlier_turn])
def test_an_image_that_cannot_be_read_is_named_by_its_file_name(chat, upload, make_error):
    message = make_error(chat, upload)
    assert "photo.png" in message
    assert_no_paths(message, upload)


def test_an_unknown_adapter_is_told_the_adapters_by_name(chat, tmp_path):
    message = error(send(chat, "Hi.", str(tmp_path / "elsewhere" / "other")))
    assert message == "Unknown adapter 'other'; choose one of ['text', 'visual']."


def test_generation_errors_name_no_server_folder(chat, monkeypatch):
    path = f"{chat.text}/adapter.safetensors"

    def refuses(*args):
        raise ValueError(f"{path}: prompts of another base")

    def breaks_half_way(*args):
        def pieces():
            yield "Half an"
            raise OSError(f"{path}: file vanished")

        return pieces(), 0

    monkeypatch.setattr(demo, "stream_conversation", refuses)
    assert error(send(chat, "Hi.", chat.text)) == "adapter.safetensors: prompts of another base"
    monkeypatch.setattr(demo, "stream_conversation", breaks_half_way)
    assert error(send(chat, "Hi.", chat.text)) == "Generation failed: OSError: adapter.safetensors: file vanished"


def test_image_to_a_text_only_adapter_is_noted_without_its_path(chat, upload):
    Image.new("RGB", (8, 8), "red").save(upload)
    *_, (_, turns, notes, _) = send(chat, "What is it?", chat.text, [upload])
    assert "no visual encoder" in notes
    assert_no_paths(notes, upload)
    assert turns[-1]["image"] == str(upload)  # kept for a later multimodal turn, and shown as the upload itself


def test_a_message_that_is_not_unicode_text_says_so(chat):
    message = error(send(chat, "hi \ud800", chat.text))
    assert message == "Your message: not valid Unicode text (a lone surrogate '\\ud800' at character 3)"
