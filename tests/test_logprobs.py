"""Token log-probabilities: the library's own (`serving.logprobs.token_logprobs`), a row's, and the server's in OpenAI's
chat and legacy completions shapes, on tiny random models. Every value the server gives is checked against the
library's for the same tokens, with and without an adapter."""

import json

import pytest
import torch
from conftest import _randomize_adapter, build_tokenizer, tiny_config, write_image
from test_batcher import byte_tokenizer
from test_serve import Server, data_url
from transformers import LlamaForCausalLM

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig
from llama_adapter.base import decoding
from llama_adapter.config import VisualConfig
from llama_adapter.data.templates import format_prompt
from llama_adapter.serving import logprobs
from llama_adapter.serving.batcher import _Batch
from llama_adapter.serving.logprobs import TokenLogprob
from llama_adapter.serving.rows import Job, Row

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def api(tiny_clip):
    """The tiny base, a text adapter and a multimodal one on it, served. At the usual initial scale (0.02): with the
    larger weights of the other server tests, even Hugging Face's own cached decoding differs from a whole forward
    pass by 3e-5 in float32, which would hide a real difference of that size."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(tiny_config(tokenizer), attn_implementation="sdpa").eval()
    text = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
    visual = LlamaAdapterModel(
        base, tokenizer, AdapterConfig(adapter_len=4, adapter_layers=3), VisualConfig(clip_model=tiny_clip)
    )
    for seed, model in enumerate([text, visual]):
        _randomize_adapter(model, seed)
    server = Server({"base": LlamaAdapterModel(base, tokenizer, AdapterConfig()), "text": text, "visual": visual})
    yield server
    server.stop()


def library(model, tokens: list[int], top: int = 0, image=None) -> list[TokenLogprob]:
    features = None if image is None else model.encode_images([str(image)])
    return logprobs.token_logprobs(model, [tokens], top, features)[0]


def ids_of(tokenizer, content: list) -> list[int]:
    """The token ids of chat's logprobs.content: the tiny tokenizer's tokens are single characters and specials, each
    its own vocabulary entry."""
    return tokenizer.convert_tokens_to_ids([entry.token for entry in content])


def assert_close(served: list[float | None], expected: list[TokenLogprob]):
    assert len(served) == len(expected)
    for value, entry in zip(served, expected):
        assert (value is None) == (entry.logprob is None)
        if value is not None:
            assert abs(value - entry.logprob) <= TOLERANCE, (value, entry)


# ---------------------------------------------------------------------------------------------------------------
# The library's own


def test_token_logprobs_sum_to_the_models_response_logprobs(make_model, tokenizer):
    """Against the library's training-side scoring (`response_logprobs`, which projects only the labelled positions)."""
    model = make_model()
    _randomize_adapter(model)
    tokens = tokenizer("### Response:\nthe answer is 4")["input_ids"]
    labels = torch.tensor([[-100] * 5 + tokens[5:]])
    ids = torch.tensor([tokens])
    expected = model.response_logprobs(ids, torch.ones_like(ids), labels)[0].item()
    scored = logprobs.token_logprobs(model, [tokens], top=3)[0]
    assert scored[0] == TokenLogprob(tokens[0], None, ())
    # The library sums in float32: the tolerance is per token summed.
    assert abs(sum(entry.logprob for entry in scored[5:]) - expected) <= TOLERANCE * len(scored[5:])
    for entry in scored[1:]:
        values = [value for _, value in entry.top]
        assert len(entry.top) == 3 and values == sorted(values, reverse=True) and entry.logprob <= values[0]


def test_sequences_scored_together_are_scored_as_alone(make_model, tokenizer):
    model = make_model()
    _randomize_adapter(model)
    sequences = [tokenizer(text)["input_ids"] for text in ("A longer sequence than the other.", "Short.")]
    together = logprobs.token_logprobs(model, sequences, top=2)
    for tokens, scored in zip(sequences, together):
        alone = logprobs.token_logprobs(model, [tokens], top=2)[0]
        assert [e.token for e in scored] == tokens and [[t for t, _ in e.top] for e in scored] == [
            [t for t, _ in e.top] for e in alone
        ]
        assert_close([e.logprob for e in scored], alone)


def test_a_rows_echo_scores_its_prompt_and_a_prompt_only_row_ends_there(make_model, tokenizer):
    """The Row side of the batcher's echo call, given the prompt's logits as the prefill makes them."""
    model = make_model()
    _randomize_adapter(model)
    prompt = tokenizer("Name a colour.")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0]  # (P, vocab)
    calls = []

    def emit(text, finish=None, completion_tokens=0, **scores):
        calls.append((text, finish, completion_tokens, scores))

    job = Job("m", prompt, SamplingConfig(max_new_tokens=1), emit, echo=True, logprobs=2, prompt_only=True)
    row = Row(job, tokenizer)
    row.score_prompt(logits)
    assert row.advance(5, logits[-1]) == 5 and row.tokens == []  # ended: the batcher's pick is not taken
    (_, _, _, first), *rest = calls
    expected = logprobs.token_logprobs(model, [prompt], top=2)[0]
    assert [e.token for e in first["prompt_logprobs"]] == prompt
    assert_close([e.logprob for e in first["prompt_logprobs"]], expected)
    assert [finish for _, finish, _, _ in rest] == ["length"] and rest[-1][2] == 0


@pytest.mark.parametrize(
    "settings, says",
    [({"logprobs": 21}, "logprobs must be None or an integer"), ({"prompt_only": True}, "needs echo")],
)
def test_a_job_is_checked_for_its_scores(settings, says):
    with pytest.raises(ValueError, match=says):
        Job("m", [1], SamplingConfig(), print, **settings)


def test_a_rows_logprobs_go_out_with_the_text_of_their_tokens_and_stop_at_a_stop_string(tokenizer):
    """Each emitted piece carries the tokens whose text it completes; a stop string drops the tokens after it."""
    pieces = []

    def emit(text, finish=None, completion_tokens=0, logprobs=None):
        pieces.append((text, [tokenizer.decode([e.token]) for e in logprobs]))

    row = Row(Job("m", [1], SamplingConfig(max_new_tokens=50), emit, stop=("xyz",), logprobs=0), tokenizer)
    vocab = len(tokenizer)
    for char in "ab xyzcd":
        logits = torch.zeros(vocab)
        row.advance(tokenizer.convert_tokens_to_ids(char), logits)
        if row.finish:
            break
    assert "".join(text for text, _ in pieces) == "ab "
    assert [token for _, tokens in pieces for token in tokens] == ["a", "b", " "]
    assert all(len(text) == len(tokens) for text, tokens in pieces[:-1])  # the text and its tokens go together


def test_byte_level_tokens_keep_their_exact_bytes():
    """A byte-level token may hold part of a character: its bytes are its own, not those of U+FFFD."""
    tokenizer = byte_tokenizer()
    ids = tokenizer("日本")["input_ids"]
    written = logprobs.Written(tokenizer)
    content = written.chat([TokenLogprob(t, -1.0, ((t, -1.0),)) for t in ids])
    assert len(content) == 6 and b"".join(bytes(entry["bytes"]) for entry in content) == "日本".encode()
    assert content[0]["top_logprobs"] == [{"token": content[0]["token"], "logprob": -1.0, "bytes": content[0]["bytes"]}]


# ---------------------------------------------------------------------------------------------------------------
# The server: chat


def chat(api, model: str, text: str = "Name a colour.", **kwargs):
    messages = kwargs.pop("messages", [{"role": "user", "content": text}])
    return api.client().chat.completions.create(
        model=model, messages=messages, max_tokens=kwargs.pop("max_tokens", 8), temperature=0, **kwargs
    )


@pytest.mark.parametrize("which", ["base", "text"])
def test_chat_logprobs_are_the_librarys(api, which):
    name = which
    model = api.models[name]
    reply = chat(api, name, logprobs=True, top_logprobs=4)
    content = reply.choices[0].logprobs.content
    prompt = model.tokenizer(format_prompt("Name a colour."))["input_ids"]
    answer = ids_of(model.tokenizer, content)
    expected = library(model, prompt + answer, top=4)[len(prompt) :]
    assert_close([entry.logprob for entry in content], expected)
    assert model.tokenizer.decode(answer, skip_special_tokens=True) == reply.choices[0].message.content
    for entry, want in zip(content, expected):
        assert len(entry.top_logprobs) == 4
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert ids_of(model.tokenizer, entry.top_logprobs) == [token for token, _ in want.top]
        assert entry.top_logprobs[0].token == entry.token  # greedy: the token picked is the likeliest
        assert entry.bytes == list(entry.token.encode())


def test_chat_logprobs_with_an_image_are_the_multimodal_adapters(api, tmp_path):
    image = write_image(tmp_path / "red.png", "red")
    content = [{"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
    reply = chat(api, "visual", messages=[{"role": "user", "content": content}], logprobs=True)
    model = api.models["visual"]
    scored = reply.choices[0].logprobs.content
    prompt = model.tokenizer(format_prompt("What colour?"))["input_ids"]
    expected = library(model, prompt + ids_of(model.tokenizer, scored), image=image)[len(prompt) :]
    assert_close([entry.logprob for entry in scored], expected)
    assert all(entry.top_logprobs == [] for entry in scored)  # top_logprobs left out: none


def test_no_logprobs_unless_asked(api):
    assert chat(api, "base").choices[0].logprobs is None
    reply = api.client().completions.create(model="base", prompt="Once", max_tokens=3, temperature=0)
    assert reply.choices[0].logprobs is None


def test_streamed_chat_logprobs_joined_are_the_whole_answers(api):
    whole = chat(api, "text", logprobs=True, top_logprobs=2).choices[0]
    chunks = list(chat(api, "text", logprobs=True, top_logprobs=2, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content


# ---------------------------------------------------------------------------------------------------------------
# The server: completions, as lm-evaluation-harness asks them


def harness_body(model: str, prompts: list[list[int]], max_tokens: int = 1) -> bytes:
    """The loglikelihood request of lm-eval's `local-completions` (openai_completions.py): token ids, a batch."""
    return json.dumps(
        {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1, "seed": 1234,
         "echo": True}
    ).encode()  # fmt: skip


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("which", ["base", "text"])
def test_echoed_prompts_logprobs_are_the_librarys(api, which, max_tokens):
    name = which
    model = api.models[name]
    prompts = [model.tokenizer(text)["input_ids"] for text in ("The sky is blue", "Two and two make four.", "Hi")]
    status, reply = api.post("/completions", harness_body(name, prompts, max_tokens))
    assert status == 200, reply
    assert [choice["index"] for choice in reply["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, reply["choices"]):
        scored = choice["logprobs"]
        assert len(scored["tokens"]) == len(prompt) + max_tokens == len(scored["text_offset"])
        assert scored["top_logprobs"][0] is None and all(len(top) in (1, 2) for top in scored["top_logprobs"][1:])
        expected = library(model, prompt, top=1)
        assert_close(scored["token_logprobs"][: len(prompt)], expected)
        for entry, top in zip(expected[1:], scored["top_logprobs"][1 : len(prompt)]):
            assert abs(max(top.values()) - entry.top[0][1]) <= TOLERANCE  # the harness's is_greedy reads this
        assert choice["text"].startswith(model.tokenizer.decode(prompt))
        assert choice["finish_reason"] == "length"
    assert reply["usage"]["prompt_tokens"] == sum(map(len, prompts))
    assert reply["usage"]["completion_tokens"] == max_tokens * len(prompts)


def test_a_string_prompt_echoes_as_given_and_its_answer_scores_follow(api):
    model = api.models["base"]
    reply = api.client().completions.create(
        model="base", prompt="Once upon", max_tokens=4, temperature=0, logprobs=3, echo=True
    )
    choice = reply.choices[0]
    prompt = model.tokenizer("Once upon")["input_ids"]
    answer = model.tokenizer.convert_tokens_to_ids(choice.logprobs.tokens[len(prompt) :])
    assert choice.text == "Once upon" + model.tokenizer.decode(answer, skip_special_tokens=True)
    assert_close(choice.logprobs.token_logprobs, library(model, prompt + answer, top=3))
    assert all(3 <= len(top) <= 4 for top in choice.logprobs.top_logprobs[1:])  # the top 3 and the token itself
    offsets = choice.logprobs.text_offset
    assert offsets == [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(len(offsets))]


def test_streamed_completion_logprobs_joined_are_the_whole_answers(api):
    settings = {"model": "base", "prompt": ["Once upon", "A time"], "max_tokens": 5, "temperature": 0,
                "logprobs": 2, "echo": True}  # fmt: skip
    whole = api.client().completions.create(**settings)
    streamed = {0: [], 1: []}
    texts = {0: "", 1: ""}
    for chunk in api.client().completions.create(**settings, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                streamed[choice.index].append(choice.logprobs)
    for choice in whole.choices:
        joined = {key: [v for part in streamed[choice.index] for v in getattr(part, key)] for key in
                  ("tokens", "token_logprobs", "top_logprobs", "text_offset")}  # fmt: skip
        assert joined == choice.logprobs.model_dump()
        assert texts[choice.index] == choice.text


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/chat/completions", {"logprobs": 1}, "logprobs"),
        ("/completions", {"logprobs": 21}, "logprobs"),
        ("/completions", {"logprobs": True}, "logprobs"),
        ("/completions", {"max_tokens": 0}, "max_tokens"),
        ("/completions", {"echo": "yes"}, "echo"),
        ("/completions", {"prompt": [[1, 2], []]}, "prompt[1]"),
        ("/completions", {"prompt": [1, 10**6]}, "prompt"),
        ("/completions", {"prompt": [[1, 2], "text"]}, "prompt"),
        ("/completions", {"prompt": ["a"] * 33}, "prompt"),
    ],
)
def test_bad_logprob_fields_are_refused_naming_the_field(api, path, body, param):
    base = {"model": "base"} | (
        {"messages": [{"role": "user", "content": "Hi"}]} if path == "/chat/completions" else {"prompt": "Hi"}
    )
    status, reply = api.post(path, json.dumps(base | body).encode())
    assert status == 400 and reply["error"]["param"] == param, reply
    assert reply["error"]["message"].startswith((f"'{param}'", f"{param}:", f"{param}["))


def test_a_refused_batch_leaves_nothing_decoding(api):
    """A prompt that cannot be answered refuses the whole request before any of its prompts is queued."""
    status, reply = api.post("/completions", json.dumps({"model": "base", "prompt": [[1, 2], [1] * 10_000]}).encode())
    assert status == 400 and reply["error"]["param"] == "prompt[1]"
    assert api.batcher.busy() == 0


def test_prompts_scored_at_every_position_are_prefilled_one_at_a_time(make_model, tokenizer, monkeypatch):
    """A prompt's logits at every position are its length times the vocabulary (8,191 x 49,152 floats, 1.6 GB, for
    a full SmolLM2 context): echoed prompts are prefilled alone, so that one request of many long prompts cannot ask
    for many times that at once. The others still go together."""
    model = make_model()
    widths = []
    prefill = decoding.prefill
    monkeypatch.setattr(
        decoding, "prefill", lambda *a, **k: widths.append((a[1].shape[0], k["every_position"])) or prefill(*a, **k)
    )
    tokens = tokenizer(format_prompt("Hi."))["input_ids"]

    def job(echo: bool) -> Job:
        return Job("m", tokens, SamplingConfig(max_new_tokens=2), lambda *a, **k: None, echo=echo, logprobs=0)

    batch = _Batch({"m": model})
    with torch.no_grad():
        batch.admit([job(True), job(False), job(True), job(False), job(True)])
    assert sorted(widths) == [(1, True), (1, True), (1, True), (2, False)]
    assert len(batch.rows) == 5
