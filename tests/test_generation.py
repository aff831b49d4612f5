"""generate/stream on the tiny model: determinism, streaming pieces, early stop, error propagation, sampling config."""

import copy
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from llama_adapter import AdapterConfig, cli
from llama_adapter.config import SamplingConfig
from llama_adapter.data.templates import format_conversation, format_prompt
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving.generation import (
    WORKER_NAME,
    answer_batch,
    conversation_prompt,
    generate_batch,
    generation_kwargs,
)
from llama_adapter.serving.logprobs import options_logprobs

NEW_TOKENS = 32


@pytest.fixture
def model(make_model, randomize_adapter):
    """An adapted tiny model that never emits a special token, so every run generates exactly max_new_tokens
    characters whatever the random weights are, and the number of decoding steps is observable."""
    # Larger random weights than the default: at 0.02 the tiny model's greedy output collapses into one
    # repeated character, which would make the comparisons below nearly vacuous.
    model = make_model(adapter_len=3, adapter_layers=2, initializer_range=0.3)
    randomize_adapter(model, seed=7)
    model.steps = 0

    def no_special_tokens(module, args, logits):
        model.steps += 1
        logits = logits.clone()
        logits[..., :4] = float("-inf")  # <unk> <pad> <s> </s>
        return logits

    model.base.lm_head.register_forward_hook(no_special_tokens)
    return model


def greedy(max_new_tokens=NEW_TOKENS):
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)


def _workers() -> int:
    """Generation threads alive; counted by name, since other tests' servers start and end threads of their own."""
    return sum(1 for thread in threading.enumerate() if thread.name == WORKER_NAME)


def _wait_for_threads(count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while _workers() > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _workers()


def test_generate_returns_the_greedy_continuation(model, tokenizer):
    text = model.generate("Name three colours.", sampling=greedy())
    assert isinstance(text, str) and len(text) == NEW_TOKENS
    assert model.generate("Name three colours.", sampling=greedy()) == text  # greedy is deterministic

    # The same continuation straight from Hugging Face generate, without the streamer: nothing lost or added.
    encoded = tokenizer(format_prompt("Name three colours."), return_tensors="pt")
    with torch.no_grad(), model.use():
        tokens = model.base.generate(
            **encoded, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert text == tokenizer.decode(tokens[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def test_input_field_changes_the_prompt(model):
    assert model.generate("Translate.", "bonjour", greedy()) != model.generate("Translate.", "", greedy())


def test_stream_pieces_concatenate_to_generate(model):
    pieces = list(model.stream("Write a poem.", sampling=greedy()))
    assert all(isinstance(p, str) for p in pieces)
    assert sum(1 for p in pieces if p) > 1, "expected the text to arrive in several pieces"
    assert "".join(pieces) == model.generate("Write a poem.", sampling=greedy())


def test_seeded_sampling_is_reproducible(model):
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    first = model.generate("Surprise me.", sampling=sampling)
    torch.manual_seed(0)
    assert model.generate("Surprise me.", sampling=sampling) == first
    assert len(first) == NEW_TOKENS


def test_closing_the_stream_stops_generation(model):
    threads_before = _workers()
    budget = 400
    stream = model.stream("Write a long essay.", sampling=greedy(budget))
    next(stream)
    assert _workers() == threads_before + 1  # the worker is running
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 2.0
    # close() joins the worker, so it must already be gone, not merely on its way out.
    assert _workers() == threads_before
    assert model.steps < budget // 4, f"worker kept generating after close ({model.steps} of {budget} steps)"


def test_exception_in_generation_reaches_the_consumer(model, monkeypatch):
    threads_before = _workers()

    def broken_generate(**kwargs):
        raise RuntimeError("generation exploded")

    monkeypatch.setattr(model.base, "generate", broken_generate)
    with pytest.raises(RuntimeError, match="generation exploded"):
        model.generate("Anything.", sampling=greedy())
    assert _wait_for_threads(threads_before) == threads_before


def test_exception_mid_stream_arrives_after_the_pieces_before_it(model):
    """A failure in the model's forward pass after a few tokens: the consumer sees those tokens, then the error."""
    threads_before = _workers()

    def fail_on_fifth_step(module, args, output):
        if model.steps >= 5:
            raise FloatingPointError("bad step")

    model.base.lm_head.register_forward_hook(fail_on_fifth_step)
    received = []
    with pytest.raises(FloatingPointError, match="bad step"):
        for piece in model.stream("Anything.", sampling=greedy()):
            received.append(piece)  # noqa: PERF402 - must keep what arrived before the error
    assert len(received) >= 3
    assert _wait_for_threads(threads_before) == threads_before


# ----------------------------------------------------------------------------------------------------------
# Sampling configuration


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_sampling_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_boundaries():
    SamplingConfig(max_new_tokens=1, temperature=0.0, top_p=1.0)


def test_generation_kwargs_greedy_and_sampling():
    tok = SimpleNamespace(eos_token_id=3, pad_token_id=1)
    greedy_kwargs = generation_kwargs(SamplingConfig(max_new_tokens=5), tok, room=100)
    assert greedy_kwargs["do_sample"] is False and greedy_kwargs["max_new_tokens"] == 5
    # None overrides whatever sampling settings the base's generation_config carries.
    assert greedy_kwargs["temperature"] is None and greedy_kwargs["top_p"] is None and greedy_kwargs["top_k"] is None
    assert greedy_kwargs["eos_token_id"] == 3 and greedy_kwargs["pad_token_id"] == 1

    sampled = generation_kwargs(SamplingConfig(temperature=0.7, top_p=0.9), tok, room=1000)
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert sampled["top_k"] == 0  # pure nucleus sampling, no top-k cut
    # past the end of its context a model answers garbage: the answer stops where the context is full
    assert generation_kwargs(SamplingConfig(max_new_tokens=10**12), tok, room=7)["max_new_tokens"] == 7


def test_base_without_pad_token_pads_with_eos(make_base, tokenizer, tmp_path):
    """LLaMA tokenizers ship no pad token; loading one leaves it so, and batched generation pads with EOS."""
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    make_base().save_pretrained(tmp_path)
    no_pad.save_pretrained(tmp_path)
    model = LlamaAdapterModel.from_base(str(tmp_path))
    assert model.tokenizer.pad_token is None
    prompts = [format_prompt("Hi."), format_prompt("A much longer question?")]
    batched = generate_batch(model, prompts, greedy(5))
    assert batched == [generate_batch(model, [p], greedy(5))[0] for p in prompts]


def test_answers_say_whether_the_model_ended_them(make_model):
    """EOS made the likeliest token at one step: an answer that stops there; a row cut at the limit does not stop."""
    model = make_model()
    prompts = [format_prompt("Hi."), format_prompt("A much longer question?")]
    free = answer_batch(model, prompts, greedy(6))
    assert [(a.tokens, a.stopped) for a in free] == [(6, False)] * 2  # the tiny model never picks EOS by itself
    assert [a.text for a in free] == generate_batch(model, prompts, greedy(6))
    eos = model.tokenizer.eos_token_id
    calls = []

    def eos_at_third_step(module, args, logits):
        calls.append(None)
        if len(calls) == 3:  # the forward pass that picks the third new token
            logits[..., -1, eos] = 1e4
        return logits

    hook = model.base.lm_head.register_forward_hook(eos_at_third_step)
    try:
        stopped = answer_batch(model, prompts, greedy(6))
    finally:
        hook.remove()
    assert [(a.tokens, a.stopped) for a in stopped] == [(3, True)] * 2
    assert all(f.text.startswith(s.text) and len(s.text) < len(f.text) for f, s in zip(free, stopped))


def test_conversation_prompt_leaves_out_the_oldest_exchanges_first(tokenizer):
    earlier = [("First?", "One."), ("Second?", "Two."), ("Third?", "Three.")]
    full = format_conversation(earlier, "Fourth?")
    length = len(tokenizer(full)["input_ids"])  # characters plus BOS with the test tokenizer
    assert conversation_prompt(tokenizer, earlier, "Fourth?", length) == (full, 0)
    prompt, left_out = conversation_prompt(tokenizer, earlier, "Fourth?", length - 1)
    assert (prompt, left_out) == (format_conversation(earlier[1:], "Fourth?"), 1)
    alone = len(tokenizer(format_prompt("Fourth?"))["input_ids"])
    assert conversation_prompt(tokenizer, earlier, "Fourth?", alone) == (format_prompt("Fourth?"), 3)
    with pytest.raises(ValueError, match=f"the message is {alone} tokens .* room for {alone - 1}"):
        conversation_prompt(tokenizer, earlier, "Fourth?", alone - 1)


def tokenizer_state(tokenizer):
    backend = tokenizer.backend_tokenizer
    return (tokenizer.pad_token, tokenizer.padding_side, backend.padding, backend.truncation)


def test_generation_leaves_the_tokenizer_as_it_was(make_model, randomize_adapter):
    """Padding by hand: the tokenizer's padding settings are state that every thread shares (R8)."""
    model = make_model()
    randomize_adapter(model)
    before = tokenizer_state(model.tokenizer)
    sampling = SamplingConfig(max_new_tokens=2)
    calls = {
        "generate_batch": lambda: generate_batch(model, [format_prompt("Hi."), format_prompt("Longer?")], sampling),
        "stream": lambda: "".join(model.stream("Hi.", sampling=sampling)),
        "options_logprobs": lambda: options_logprobs(model, [format_prompt("Hi.")], [["a", "bb"]]),
    }
    for name, call in calls.items():
        call()
        assert tokenizer_state(model.tokenizer) == before, name


def test_generate_batch_and_stream_from_two_threads_at_once(make_model, randomize_adapter):
    model = make_model()
    randomize_adapter(model, seed=1)
    sampling = SamplingConfig(max_new_tokens=3)
    prompts = [format_prompt("Count to three, slowly and clearly."), format_prompt("Hi.")]
    expected = {
        "batch": generate_batch(model, prompts, sampling),
        "stream": "".join(model.stream("Poem?", sampling=sampling)),
    }
    calls = {
        "batch": lambda: generate_batch(model, prompts, sampling),
        "stream": lambda: "".join(model.stream("Poem?", sampling=sampling)),
    }
    results, failures = {"batch": [], "stream": []}, []

    def run(kind):
        try:
            for _ in range(40):
                results[kind].append(calls[kind]())
        except Exception as err:  # noqa: BLE001 - reported below
            failures.append(repr(err))

    threads = [threading.Thread(target=run, args=(kind,)) for kind in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(result == expected[kind] for kind in calls for result in results[kind])


def test_merge_exports_the_tokenizer_unchanged(make_base, tokenizer, tmp_path):
    """`merge` writes the base's tokenizer as it was loaded: no padding token added to it."""
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    make_base().save_pretrained(tmp_path / "base")
    no_pad.save_pretrained(tmp_path / "base")
    LlamaAdapterModel.from_base(str(tmp_path / "base"), AdapterConfig(method="lora", lora_rank=2)).save(
        tmp_path / "lora"
    )
    cli.main(["merge", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").pad_token is None
