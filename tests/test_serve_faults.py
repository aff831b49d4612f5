"""The server against careless and hostile clients: each request fails alone, in OpenAI's error shape, limits are
checked before the work they protect, a client that leaves frees its row, and SIGTERM stops the server.

The cases are the kinds a probe of the API found (issue 37); tests/test_serve_fuzz.py lets schemathesis look for more.
"""

import concurrent.futures
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import openai
import pytest
import torch
from conftest import free_port
from test_serve import NEW, ask, expected, idle, serve

from llama_adapter import SamplingConfig
from llama_adapter.data.templates import format_prompt
from llama_adapter.serving import rows
from llama_adapter.serving.generation import generate_batch
from llama_adapter.serving.rows import Job

pytestmark = pytest.mark.slow  # a real server: a second or so per test


@pytest.fixture(scope="module")
def api(served_folders):
    server = serve(served_folders)
    yield server
    server.stop()


def chat_body(**fields) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": NEW} | fields


@dataclass
class BadRequest:
    """A request the API refuses: where it goes, its body, and the status, param and message it gets."""

    name: str
    path: str  # after /v1
    body: bytes
    status: int
    param: str | None
    says: str


def chat(literal: str = "", **fields) -> bytes:
    """A chat request's body with `fields`, and `literal` (JSON text such as '"top_p": NaN') among them."""
    text = json.dumps(chat_body(**fields))
    return (text[:-1] + ", " + literal + "}" if literal else text).encode()


def completion(**fields) -> bytes:
    return json.dumps({"model": "base", "prompt": "Once", "max_tokens": NEW} | fields).encode()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}
API_CASES = [
    # values that passed the checks, then broke decoding or the batcher
    BadRequest("temperature NaN", "/chat/completions", chat('"temperature": NaN'), 400, None, "NaN is no JSON number"),
    BadRequest("top_p NaN", "/chat/completions", chat('"top_p": NaN'), 400, None, "NaN is no JSON number"),
    BadRequest("temperature Infinity", "/chat/completions", chat('"temperature": Infinity'), 400, None, "Infinity"),
    BadRequest("seed -Infinity", "/chat/completions", chat('"seed": -Infinity'), 400, None, "-Infinity"),
    BadRequest("seed 2^64", "/chat/completions", chat(seed=2**64, temperature=1), 400, "seed", "'seed' must be in"),
    BadRequest("seed below -2^63", "/chat/completions", chat(seed=-(2**63) - 1), 400, "seed", "'seed' must be in"),
    BadRequest("empty prompt", "/completions", completion(prompt=""), 400, "prompt", "'prompt' is empty"),
    BadRequest("body nested 100,000 deep", "/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "nested"),
    # OpenAI's fields this server does not offer, and fields OpenAI does not know
    BadRequest("logprobs not a boolean", "/chat/completions", chat(logprobs=1), 400, "logprobs", "true or false"),
    BadRequest(
        "top_logprobs without logprobs", "/chat/completions", chat(top_logprobs=2), 400, "top_logprobs", "needs"
    ),
    BadRequest(
        "top_logprobs 21", "/chat/completions", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "[0, 20]"
    ),
    BadRequest("tools", "/chat/completions", chat(tools=[TOOL]), 400, "tools", "calls no tools"),
    BadRequest("tool_choice", "/chat/completions", chat(tool_choice="auto"), 400, "tool_choice", "calls no tools"),
    BadRequest(
        "response_format json_object",
        "/chat/completions",
        chat(response_format={"type": "json_object"}),
        400,
        "response_format",
        "plain text",
    ),
    BadRequest(
        "presence_penalty", "/chat/completions", chat(presence_penalty=0.5), 400, "presence_penalty", "no penalties"
    ),
    BadRequest(
        "frequency_penalty", "/chat/completions", chat(frequency_penalty=-1), 400, "frequency_penalty", "no penalties"
    ),
    BadRequest("logit_bias", "/chat/completions", chat(logit_bias={"5": 10}), 400, "logit_bias", "no logit biases"),
    BadRequest("n 2", "/chat/completions", chat(n=2), 400, "n", "'n' must be 1"),
    BadRequest("stream as a string", "/chat/completions", chat(stream="false"), 400, "stream", "true or false"),
    BadRequest(
        "stream_options not an object of booleans",
        "/chat/completions",
        chat(stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options",
        "true or false",
    ),
    BadRequest(
        "stream_options without stream",
        "/chat/completions",
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        "only allowed with 'stream': true",
    ),
    BadRequest("unknown field", "/chat/completions", chat(no_such_field=1), 400, "no_such_field", "Unrecognized"),
    BadRequest(
        "a message field besides role and content",
        "/chat/completions",
        chat(messages=[{"role": "user", "content": "Hi.", "name": "me"}]),
        400,
        "messages[0]",
        "messages[0].name",
    ),
    BadRequest("echo not a boolean", "/completions", completion(echo="yes"), 400, "echo", "true or false"),
    BadRequest("completion logprobs 21", "/completions", completion(logprobs=21), 400, "logprobs", "[0, 20]"),
    BadRequest("max_tokens 0 without echo", "/completions", completion(max_tokens=0), 400, "max_tokens", "'echo'"),
    BadRequest(
        "a token id outside the vocabulary", "/completions", completion(prompt=[1, 10**6]), 400, "prompt", "token ids"
    ),
    BadRequest("best_of 2", "/completions", completion(best_of=2), 400, "best_of", "must be 1"),
    BadRequest("suffix", "/completions", completion(suffix="end"), 400, "suffix", "no text after the answer"),
    BadRequest(
        "a chat field in a completion", "/completions", completion(messages=[]), 400, "messages", "Unrecognized"
    ),
]


def assert_openai_error(reply: dict) -> None:
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert isinstance(reply["error"]["message"], str) and "Traceback" not in reply["error"]["message"]


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 30) -> tuple[int, dict]:
    """Send `head` (the request line and headers) and `body` on a fresh connection; (status, JSON body)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    received = b""
    while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(received):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _length(received: bytes) -> int:
    for line in received.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 60


# ----------------------------------------------------------------------------------------------------------
# Bad requests: each refused alone, with a 400 in OpenAI's shape that names the field (docs/bad-input.md lists them)


@pytest.mark.parametrize("case", API_CASES, ids=lambda case: case.name)
def test_a_bad_request_is_refused_naming_what_is_wrong(api, case):
    code, reply = api.post(case.path, case.body)
    assert (code, reply["error"]["param"]) == (case.status, case.param) and case.says in reply["error"]["message"], (
        reply
    )
    assert_openai_error(reply)


# ----------------------------------------------------------------------------------------------------------
# 1. Sampling values that pass validation but broke decoding


@pytest.mark.parametrize("temperature", [1e-300, 1e-6])
def test_a_tiny_temperature_is_greedy_in_the_api(api, served_folders, temperature):
    reply = api.client().chat.completions.create(
        model=served_folders.text, messages=[{"role": "user", "content": "Hi."}], max_tokens=NEW,
        temperature=temperature, seed=1,
    )  # fmt: skip
    assert reply.choices[0].message.content == expected(api.models[served_folders.text], format_prompt("Hi."))


def test_a_tiny_temperature_is_greedy_in_the_library(make_model):
    model = make_model(adapter_len=2, adapter_layers=2)
    greedy = generate_batch(model, ["Hi."], SamplingConfig(max_new_tokens=8))
    assert generate_batch(model, ["Hi."], SamplingConfig(max_new_tokens=8, temperature=1e-300)) == greedy
    streamed = "".join(model.stream("Hi.", sampling=SamplingConfig(max_new_tokens=8, temperature=1e-300)))
    assert streamed == model.generate("Hi.", sampling=SamplingConfig(max_new_tokens=8))


def test_the_smallest_sampling_temperature_samples_without_overflow(make_model):
    """Just above the greedy threshold, logits / temperature is large but the sampler stays finite."""
    model = make_model(adapter_len=2, adapter_layers=2)
    torch.manual_seed(0)
    answer = generate_batch(model, ["Hi."], SamplingConfig(max_new_tokens=8, temperature=SamplingConfig.GREEDY_BELOW))
    assert isinstance(answer[0], str)


def test_the_smallest_top_p_keeps_the_likeliest_token():
    """top_p 5e-324 (found by the fuzzer: a 500) is 0 in float32: the nucleus still holds the likeliest token."""
    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    sampling = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=5e-324)
    assert {rows._sample(logits, sampling, torch.Generator().manual_seed(s)) for s in range(5)} == {1}


# ----------------------------------------------------------------------------------------------------------
# 2. One request must not break others


def test_a_job_refuses_a_seed_no_generator_takes():
    with pytest.raises(ValueError, match="seed"):
        Job(model="base", prompt=[5], sampling=SamplingConfig(temperature=1.0), emit=print, seed=2**64)


def collect(results: dict, name: str, **fields) -> Job:
    """A job on `batcher` whose pieces and finish go to results[name]."""
    done = threading.Event()
    results[name] = {"text": "", "finish": None, "done": done}

    def emit(text, finish=None, completion_tokens=0):
        results[name]["text"] += text
        if finish is not None:
            results[name]["finish"] = finish
            done.set()

    return Job(emit=emit, model="base", sampling=SamplingConfig(max_new_tokens=NEW), **fields)


def test_a_job_that_fails_at_prefill_fails_alone(served_folders):
    """An out-of-vocabulary token fails the embedding lookup of the batch it joins: it alone gets the error."""
    server = serve(served_folders)
    try:
        model = server.models["base"]
        tokens = model.tokenizer(format_prompt("Hi."))["input_ids"]
        results = {}
        with server.batcher.ready:  # admitted together, in one prefill
            for name, prompt in [("good", tokens), ("bad", tokens[:-1] + [10**6]), ("also good", tokens)]:
                server.batcher.waiting[server.batcher.batch_of["base"]].append(collect(results, name, prompt=prompt))
            server.batcher.ready.notify()
        assert all(r["done"].wait(30) for r in results.values())
        assert results["bad"]["finish"].startswith("error: ")
        want = expected(model, format_prompt("Hi."))
        for name in ("good", "also good"):
            assert (results[name]["text"], results[name]["finish"]) == (want, "length")
    finally:
        server.stop()


def test_a_row_whose_client_breaks_mid_answer_fails_alone(served_folders):
    """A consumer that raises (its event loop gone) ends its own row; the rows decoding beside it finish."""
    server = serve(served_folders)
    try:
        model = server.models["base"]
        tokens = model.tokenizer(format_prompt("Hi."))["input_ids"]
        results = {}
        good = collect(results, "good", prompt=tokens)
        broken = collect(results, "broken", prompt=tokens)
        calls = []

        def emit_then_break(text, finish=None, completion_tokens=0):
            calls.append(text)
            if len(calls) == 3:
                raise RuntimeError("Event loop is closed")

        broken.emit = emit_then_break
        with server.batcher.ready:
            server.batcher.waiting[server.batcher.batch_of["base"]].extend([good, broken])
            server.batcher.ready.notify()
        assert results["good"]["done"].wait(30)
        assert (
            results["good"]["text"] == expected(model, format_prompt("Hi.")) and results["good"]["finish"] == "length"
        )
        assert idle(server.batcher, within=5) and len(calls) == 3  # the broken row left; nothing more was sent to it
        assert ask(server, "Hi.", "base").choices[0].finish_reason == "length"
    finally:
        server.stop()


def test_a_dead_batcher_is_reported_on_health_and_requests_fail_at_once(served_folders, caplog):
    server = serve(served_folders)
    try:
        code, reply = raw_request(server.url, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close")
        assert code == 200 and reply == {"status": "ok"}

        def broken():
            raise RuntimeError("the loop itself broke")

        server.batcher._next_batch = broken
        with server.batcher.ready:
            server.batcher.ready.notify()
        server.batcher.thread.join(10)
        started = time.time()
        code, reply = server.post("/chat/completions", json.dumps(chat_body()).encode())
        assert code == 503 and "the loop itself broke" in reply["error"]["message"] and time.time() - started < 5
        code, reply = raw_request(server.url, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close")
        assert code == 503 and "the loop itself broke" in reply["error"]["message"]
        assert "decoding thread stopped" in caplog.text
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------------
# 3. Clients that leave, and SIGTERM


def slowed(server, seconds=0.1):
    return server.models["base"].base.register_forward_hook(lambda *args: time.sleep(seconds))


def test_a_non_streamed_client_that_leaves_frees_its_row(served_folders):
    server = serve(served_folders, max_batch=1)
    slow = slowed(server)
    try:
        body = json.dumps(chat_body(max_tokens=200)).encode()  # 20 s if it were left to run
        host, port = server.url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.time() + 10
            while not server.batcher.busy() and time.time() < deadline:
                time.sleep(0.02)
            assert server.batcher.busy() == 1
        assert idle(server.batcher, within=3), "the answer went on decoding after its client left"
    finally:
        slow.remove()
        server.stop()


SERVE_SLOWLY = """
import sys, time
from llama_adapter.config import ModelConfig, ServeConfig
from llama_adapter.serving import api
from llama_adapter.serving.models import load_models
models = load_models(ModelConfig(base=sys.argv[1], precision="fp32"), (), "base")


def slowly_and_without_end(module, args, output):
    time.sleep(0.1)
    output.logits[..., :4] = float("-inf")  # <unk> <pad> <s> </s>: random weights must not end the answer early
    return output


models["base"].base.register_forward_hook(slowly_and_without_end)
api.GRACE = 2.0
api.serve(models, ServeConfig(port=int(sys.argv[2])))
"""


@pytest.mark.parametrize("client", ["leaves", "stays"])
def test_sigterm_stops_the_server_with_status_0(served_folders, client):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SLOWLY, served_folders.base, str(port)],
        stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        for line in process.stderr:
            if "Serving" in line:
                break
        time.sleep(0.5)  # uvicorn binds after printing
        body = json.dumps(chat_body(max_tokens=300)).encode()  # 30 s to decode in full
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(1)
        if client == "leaves":
            sock.close()
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        if client == "stays":
            code, reply = read_response(sock)  # cancelled within the grace, with an answer in OpenAI's shape
            assert code == 503 and "shutting down" in reply["error"]["message"]
            sock.close()
    finally:
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------------------------------------
# 4. Limits before the work


class RecordingTokenizer:
    """The model's tokenizer, noting the length of each text it encodes and the thread it encodes it on."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.calls.append((len(text), threading.current_thread().name))
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_prompt_is_refused_before_it_is_tokenised(api, monkeypatch):
    model = api.models["base"]
    recording = RecordingTokenizer(model.tokenizer)
    monkeypatch.setattr(model.shared, "tokenizer", recording)
    code, reply = api.post("/completions", json.dumps({"model": "base", "prompt": "word " * 2_000_000}).encode())
    assert code == 400 and "maximum context length" in reply["error"]["message"]
    assert not [length for length, _ in recording.calls if length > 100_000], "the huge prompt was tokenised"


def test_no_prompt_is_tokenised_on_the_event_loop(api, monkeypatch):
    model = api.models["base"]
    recording = RecordingTokenizer(model.tokenizer)
    monkeypatch.setattr(model.shared, "tokenizer", recording)
    assert ask(api, "Hi.", "base").choices[0].finish_reason == "length"
    assert recording.calls and all(thread != api.thread.name for _, thread in recording.calls)


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(api, monkeypatch):
    from llama_adapter.serving import api as serve_module

    monkeypatch.setattr(serve_module, "MAX_BODY", 4000)
    host, port = api.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(5):  # 5,000 bytes, and the body never ends: only the limit can answer it
            sock.sendall(b"3e8\r\n" + b" " * 1000 + b"\r\n")
        sock.settimeout(5)
        code, reply = read_response(sock)
    assert code == 413 and "over the limit of 4,000" in reply["error"]["message"]


# ----------------------------------------------------------------------------------------------------------
# 5. Every status in OpenAI's error shape


def test_a_model_is_retrieved_by_id(api, served_folders):
    model = api.client().models.retrieve(served_folders.text)
    assert model.id == served_folders.text and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        api.client().models.retrieve("nope")
    assert_openai_error(raised.value.response.json())


@pytest.mark.parametrize(
    "request_line, status",
    [
        ("GET /v1/chat/completions", 405),
        ("PUT /v1/models", 405),
        ("GET /v1/nowhere", 404),
        ("GET /", 404),
        ("POST /v1/models/base", 405),
    ],
)
def test_other_routes_and_methods_answer_in_openais_error_shape(api, request_line, status):
    code, reply = raw_request(api.url, f"{request_line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0")
    assert code == status
    assert_openai_error(reply)


# ----------------------------------------------------------------------------------------------------------
# 6. OpenAI's fields: supported, or refused naming them


@pytest.mark.parametrize(
    "fields",
    [
        {"n": None, "logprobs": False, "stream": False, "tools": None, "presence_penalty": 0, "frequency_penalty": 0},
        {"response_format": {"type": "text"}, "user": "someone", "stop": None, "seed": None, "temperature": None},
    ],
)
def test_neutral_values_of_openai_fields_are_accepted(api, fields):
    code, reply = api.post("/chat/completions", json.dumps(chat_body(**fields)).encode())
    assert code == 200 and reply["choices"][0]["finish_reason"] == "length", reply


def test_many_bad_requests_at_once_leave_the_good_ones_right(api, served_folders):
    """Bad requests of every kind above, sent while good ones decode: each good answer is the library's."""
    bad = [chat_body(seed=2**64), chat_body(temperature=math.inf), chat_body(n=3), {"model": "base", "prompt": ""}]
    bodies = [json.dumps(b, allow_nan=True).encode() for b in bad] * 3
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(ask, api, f"Question {i}?", served_folders.text) for i in range(6)]
        codes = list(
            pool.map(lambda b: api.post("/completions" if b"prompt" in b else "/chat/completions", b)[0], bodies)
        )
        answers = [g.result().choices[0].message.content for g in good]
    assert set(codes) == {400}
    assert answers == [expected(api.models[served_folders.text], format_prompt(f"Question {i}?")) for i in range(6)]
