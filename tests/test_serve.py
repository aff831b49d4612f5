"""`llama-adapter serve` driven by the official `openai` client, on tiny models served on a free loopback port.

Every greedy answer is checked against the library's own generation for the same prompt, so the server can only
pass by routing each request to the right model, prompt and image, batched or not.
"""

import base64
import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import spaced_answers, write_image

from llama_adapter import LlamaAdapterModel, SamplingConfig
from llama_adapter.config import ModelConfig
from llama_adapter.data.templates import format_conversation, format_prompt
from llama_adapter.serving import api_request
from llama_adapter.serving.api import ServerThread, build_app
from llama_adapter.serving.batcher import WORKER_NAME
from llama_adapter.serving.generation import generate_batch
from llama_adapter.serving.models import load_models

pytestmark = pytest.mark.slow  # a real server: a second or so per test

NEW = 12  # tokens per answer: enough to tell answers apart, quick on the tiny model


class Server(ServerThread):
    """The API over `models` in a thread, with what the tests ask of it."""

    def __init__(self, models, **settings):
        self.models = models
        self.app = build_app(models, **({"api_key": None, "max_batch": 8, "queue": 64} | settings))
        super().__init__(self.app)

    @property
    def batcher(self):
        return self.app.state.batcher

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
        """A raw request, for what the openai client will not send; (status, JSON body)."""
        request = urllib.request.Request(self.url + path, body, {"Content-Type": "application/json"} | (headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)


def serve(served_folders, **settings) -> Server:
    models = load_models(
        ModelConfig(base=served_folders.base, precision="fp32"), (served_folders.text, served_folders.visual), "base"
    )
    spaced_answers(models["base"].base)
    return Server(models, **settings)


@pytest.fixture(scope="module")
def api(served_folders):
    server = serve(served_folders)
    yield server
    server.stop()


def expected(model, prompt: str, image=None, max_new_tokens=NEW) -> str:
    """The library's own greedy answer to a formatted prompt."""
    features = model.encode_images([image]) if image else None
    return generate_batch(model, [prompt], SamplingConfig(max_new_tokens=max_new_tokens), features)[0]


def ask(api, text: str, model: str, **kwargs):
    messages = kwargs.pop("messages", [{"role": "user", "content": text}])
    return api.client().chat.completions.create(
        model=model, messages=messages, max_tokens=kwargs.pop("max_tokens", NEW), temperature=0, **kwargs
    )


def idle(batcher, within: float) -> bool:
    """Whether the batcher has no job decoding or waiting, now or before `within` seconds have passed."""
    deadline = time.time() + within
    while batcher.busy() and time.time() < deadline:
        time.sleep(0.02)
    return batcher.busy() == 0


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def test_models_lists_the_base_and_every_adapter(api, served_folders):
    listed = api.client().models.list()
    assert [model.id for model in listed.data] == ["base", served_folders.text, served_folders.visual]
    assert all(model.object == "model" for model in listed.data)


def test_a_chat_completion_is_the_librarys_greedy_answer(api, served_folders):
    reply = ask(api, "Name a colour.", served_folders.text)
    want = expected(api.models[served_folders.text], format_prompt("Name a colour."))
    assert reply.choices[0].message.content == want and want
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    prompt_tokens = len(api.models[served_folders.text].tokenizer(format_prompt("Name a colour."))["input_ids"])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, NEW)
    assert reply.model == served_folders.text and reply.object == "chat.completion"


def test_a_streamed_answer_assembled_equals_the_whole_one(api, served_folders):
    whole = ask(api, "Tell me more.", served_folders.text).choices[0].message.content
    chunks = list(ask(api, "Tell me more.", served_folders.text, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert len([p for p in pieces if p]) >= 3  # it streamed, a piece at a time
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == NEW and not chunks[-1].choices


def test_multi_turn_messages_make_our_conversation_prompt(api, served_folders):
    messages = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "And then?"},
    ]
    reply = ask(api, "", served_folders.text, messages=messages)
    prompt = format_conversation([("Hello there.", "Hi.")], "And then?")
    assert reply.choices[0].message.content == expected(api.models[served_folders.text], prompt)
    system = [{"role": "system", "content": "You are terse."}, *messages]
    prompt = format_conversation([("Hello there.", "Hi.")], "And then?", header="You are terse.\n\n")
    assert ask(api, "", served_folders.text, messages=system).choices[0].message.content == expected(
        api.models[served_folders.text], prompt
    )


def test_an_image_conditions_the_multimodal_adapter(api, served_folders, tmp_path):
    image = write_image(tmp_path / "red.png", "red")
    content = [{"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    reply = ask(api, "", served_folders.visual, messages=[{"role": "user", "content": content}])
    want = expected(api.models[served_folders.visual], format_prompt("What colour?"), str(image))
    assert reply.choices[0].message.content == want
    assert want != expected(api.models[served_folders.visual], format_prompt("What colour?"))  # the image changed it


def test_a_plain_completion_continues_the_prompt_as_given(api, served_folders):
    reply = api.client().completions.create(model="base", prompt="Once upon", max_tokens=NEW, temperature=0)
    assert reply.choices[0].text == expected(api.models["base"], "Once upon")
    streamed = api.client().completions.create(
        model="base", prompt="Once upon", max_tokens=NEW, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_stop_strings_end_the_answer_before_them(api, served_folders):
    whole = ask(api, "Name a colour.", served_folders.text).choices[0].message.content
    stop = whole.split()[2]  # a word in the middle of the answer
    reply = ask(api, "Name a colour.", served_folders.text, stop=[stop])
    assert reply.choices[0].message.content == whole[: whole.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = ask(api, "Name a colour.", served_folders.text, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole[: whole.index(stop)]


def test_a_seed_makes_a_sampled_answer_repeat(api, served_folders):
    def sampled(seed):
        return api.client().chat.completions.create(
            model=served_folders.text, messages=[{"role": "user", "content": "Go."}], max_tokens=NEW, temperature=1.0,
            seed=seed,
        ).choices[0].message.content  # fmt: skip

    assert sampled(1) == sampled(1) != sampled(2)


def test_twenty_concurrent_clients_each_get_their_own_answer(api, served_folders):
    questions = [
        (f"Question number {i}?", [served_folders.text, served_folders.visual, "base"][i % 3]) for i in range(20)
    ]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda q: ask(api, *q).choices[0].message.content, questions))
    assert replies == [expected(api.models[model], format_prompt(text)) for text, model in questions]


def test_a_client_that_leaves_mid_stream_stops_its_generation(api, served_folders):
    model = api.models[served_folders.text]
    slow = model.base.register_forward_hook(lambda *args: time.sleep(0.1))
    try:
        stream = ask(api, "Go on.", served_folders.text, stream=True, max_tokens=150)  # 15 s if it were left to run
        next(iter(stream)), next(iter(stream))
        stream.close()
        assert idle(api.batcher, within=5), "the generation went on after the client left"
    finally:
        slow.remove()


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "'model' is required"),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "does not exist"),
        (json.dumps({"model": "base", "messages": []}).encode(), 400, "non-empty list"),
        (json.dumps({"model": "base", "messages": [{"role": "bot", "content": "hi"}]}).encode(), 400, "messages[0]"),
        (json.dumps({"model": "base", "messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, "must answer"),
        (json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400, "'temperature' must be a number"),
        (json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), 400, "'max_tokens'"),
        (json.dumps({"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}).encode(), 400, "'stop'"),
        (json.dumps({"model": "base", "prompt": 3}).encode(), 400, "'prompt' must be a string"),
        (json.dumps({"model": "base", "prompt": "hi", "n": 2}).encode(), 400, "'n' must be 1"),
    ],
)  # fmt: skip
def test_malformed_requests_get_openais_error_shape(api, body, status, says):
    path = "/completions" if b'"prompt"' in body else "/chat/completions"
    code, reply = api.post(path, body)
    assert code == status and says in reply["error"]["message"]
    assert set(reply["error"]) == {"message", "type", "param", "code"} and "Traceback" not in json.dumps(reply)


def test_too_long_for_the_context_says_the_numbers(api, served_folders):
    context = api.models["base"].context_length
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {context} tokens"):
        ask(api, "Hi.", "base", max_tokens=context)


def test_an_image_to_a_text_only_model_is_refused(api, served_folders, tmp_path):
    image = write_image(tmp_path / "red.png", "red")
    content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    with pytest.raises(openai.BadRequestError, match="no image encoder"):
        ask(api, "", served_folders.text, messages=[{"role": "user", "content": content}])


@pytest.mark.parametrize(
    "url, says",
    [
        ("https://example.com/cat.png", "fetches nothing"),
        ("data:image/png;base64,bm90IGFuIGltYWdl", "not a readable image"),
        ("data:image/png,raw", "must be base64"),
    ],
)
def test_images_come_inline_and_readable(api, served_folders, url, says):
    content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError, match=says):
        ask(api, "", served_folders.visual, messages=[{"role": "user", "content": content}])


def test_too_large_bodies_and_images_are_refused_with_413(api, served_folders, monkeypatch):
    from llama_adapter.serving import api as serve_module

    monkeypatch.setattr(serve_module, "MAX_BODY", 4000)  # small: the whole body fits in the socket's buffers
    code, reply = api.post("/chat/completions", b" " * 4001)
    assert code == 413 and "over the limit of 4,000" in reply["error"]["message"]
    monkeypatch.setattr(api_request, "MAX_IMAGE", 100)
    big = "data:image/png;base64," + base64.b64encode(b"x" * 1000).decode()
    content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": big}}]
    with pytest.raises(openai.APIStatusError) as raised:
        ask(api, "", served_folders.visual, messages=[{"role": "user", "content": content}])
    assert raised.value.status_code == 413


def test_a_full_queue_turns_requests_away_with_429(served_folders):
    server = serve(served_folders, max_batch=1, queue=1)
    slow = server.models["base"].base.register_forward_hook(lambda *args: time.sleep(0.05))
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(ask, server, "Go.", "base", max_tokens=30) for _ in range(4)]
            outcomes = []
            for job in jobs:
                try:
                    outcomes.append(job.result().choices[0].finish_reason)
                except openai.RateLimitError as err:
                    outcomes.append(err.status_code)
        assert 429 in outcomes and "length" in outcomes
    finally:
        slow.remove()
        server.stop()


def test_an_api_key_is_required_when_set(served_folders):
    server = serve(served_folders, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        code, reply = server.post("/chat/completions", b"{}")
        assert code == 401 and "API key" in reply["error"]["message"]
        assert server.client(api_key="s3cret").models.list().data[0].id == "base"
    finally:
        server.stop()


def test_no_generation_thread_outlives_the_server(served_folders):
    server = serve(served_folders)
    worker = server.batcher.thread
    assert worker.is_alive() and worker.name == WORKER_NAME
    server.stop()
    assert not worker.is_alive()


def test_the_serve_command_serves_the_base_and_adapters_it_is_given(served_folders, monkeypatch, capsys):
    from llama_adapter import cli
    from llama_adapter.serving import api as serve_module

    served = {}
    monkeypatch.setattr(
        serve_module._Server, "run", lambda self: served.update(host=self.config.host, port=self.config.port)
    )
    cli.main(
        [
            "serve",
            "--base",
            served_folders.base,
            "--adapter",
            served_folders.text,
            "--host",
            "0.0.0.0",
            "--port",
            "8123",
        ]
    )
    assert served == {"host": "0.0.0.0", "port": 8123}
    err = capsys.readouterr().err
    assert "without --api-key" in err and f"Serving {served_folders.base}, {served_folders.text} on" in err


def test_the_serve_command_refuses_a_virtual_token_adapter(served_folders, tmp_path):
    from llama_adapter import AdapterConfig, cli

    prefix = LlamaAdapterModel.from_base(
        served_folders.base, AdapterConfig(method="prefix", adapter_len=2), device="cpu"
    )
    prefix.save(tmp_path / "prefix")
    with pytest.raises(SystemExit, match="cannot batch .*prefix.*virtual tokens"):
        cli.main(["serve", "--base", served_folders.base, "--adapter", str(tmp_path / "prefix")])
