"""The server's batcher without the server: rows that join and leave a decoding batch, on every model type."""

import random

import pytest
import torch
from conftest import _randomize_adapter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig
from llama_adapter.base import structure
from llama_adapter.data.templates import format_prompt
from llama_adapter.serving.batcher import _Batch
from llama_adapter.serving.generation import generate_batch
from llama_adapter.serving.rows import Job, Row


@pytest.mark.parametrize("model_type", structure.MODEL_TYPES)
def test_a_batch_that_rows_join_and_leave_decodes_each_as_alone(tokenizer, model_type):
    """Rows joining a batch mid-decode and leaving it early change no row's greedy answer, on every model type the
    adapter takes. gpt_oss attends in a sliding window of 128 in half its layers, and mistral here in one of 64: the
    prompts are longer, so those layers' caches hold only the window, and the rows' windows end at different places."""
    window = {"mistral": {"sliding_window": 64}}.get(model_type, {})
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.2, **window,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
    _randomize_adapter(model)
    prompts = [format_prompt(text) for text in ("Hi.", "Name three colours of the sea at night.", "Count.")]
    lengths = (20, 6, 14)  # the second leaves first, while the others go on
    texts = ["", "", ""]

    def job(i: int) -> Job:
        def emit(text, finish=None, completion_tokens=None):
            texts[i] += text

        return Job("m", model.tokenizer(prompts[i])["input_ids"], SamplingConfig(max_new_tokens=lengths[i]), emit)

    assert all(len(model.tokenizer(p)["input_ids"]) > 128 for p in prompts)
    batch = _Batch({"m": model})
    with torch.no_grad():
        batch.admit([job(0), job(1)])
        for _ in range(4):
            batch.step()
        batch.admit([job(2)])  # joins two rows four tokens in
        while batch.rows:
            batch.step()
    for i, prompt in enumerate(prompts):
        assert texts[i] == generate_batch(model, [prompt], SamplingConfig(max_new_tokens=lengths[i]))[0], (
            model_type,
            i,
        )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level scheme (SmolLM2's) without merges: one token per byte, so "日" is three tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(["</s>", *alphabet])}, merges=[]))
    core.add_special_tokens(["</s>"])
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece's scheme (LLaMA's): words carry a leading "▁" that decodes as a space, except at the very start,
    so the decode of a run of tokens depends on where it starts."""
    words = ["</s>", "▁Hello", "▁world", ".", "▁The", "▁end", "!", "▁a", "b", "▁"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="▁"))
    core.add_special_tokens(["</s>"])
    core.decoder = decoders.Metaspace(prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


def run_row(tokenizer, tokens: list[int], stop=(), max_tokens=1000) -> tuple[list[str], list[str]]:
    """Feed tokens to a row one at a time, as the batcher does: the pieces it emits, and its finish if it ended."""
    pieces, finish = [], []

    def emit(text, finish=None, completion_tokens=None):
        (pieces if finish is None else finishes).append(text if finish is None else finish)

    finishes = finish
    row = Row(Job("m", [0], SamplingConfig(max_new_tokens=max_tokens), emit, stop=tuple(stop)), tokenizer)
    for token in tokens:
        row.take(token)
        if row.finish:
            break
    return pieces, finish


def random_tokens(tokenizer, rng: random.Random) -> list[int]:
    """Any word tokens; for bytes, the tokens of a random text of one-, two- and three-byte characters."""
    if tokenizer.decode([1]) != "!":
        return [rng.randrange(1, len(tokenizer)) for _ in range(rng.randrange(1, 30))]
    text = "".join(rng.choice(["a", "b", " ", ".", "é", "ß", "日", "本", "!"]) for _ in range(rng.randrange(1, 20)))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("make", [byte_tokenizer, word_tokenizer])
def test_a_row_sends_what_decoding_every_token_at_each_step_gives(make):
    """Random answers, stop strings cut from their text at random (across tokens, inside characters), random token
    limits: what a row sends always equals decoding all its tokens at every step, as the batcher once did."""
    tokenizer, rng = make(), random.Random(0)
    for _ in range(200):
        tokens = random_tokens(tokenizer, rng)
        text = tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
        stop = [text[i : i + rng.randrange(1, 6)] for i in rng.sample(range(len(text)), min(len(text), 2))]
        stop = rng.choice([[], stop[:1], stop + ["never"]])
        limit = rng.randrange(1, len(tokens) + 3)
        pieces, finish = run_row(tokenizer, tokens + [tokenizer.eos_token_id], stop, limit)
        # The answer ends at the first token after which the text holds a stop string, cut where the stop starts.
        texts = [tokenizer.decode(tokens[:k], clean_up_tokenization_spaces=False) for k in range(1, limit + 1)]
        cuts = (min(t.find(s) for s in stop if s in t) for t in texts if any(s in t for s in stop))
        cut = next(cuts, None)
        whole = texts[-1]
        want = (whole[:cut], ["stop"]) if cut is not None else (whole, ["length" if limit <= len(tokens) else "stop"])
        # Pieces only add to what was sent, so no piece held half a character or a stop string's start.
        assert ("".join(pieces), finish) == want, (tokens, stop, limit)


def test_a_stop_string_across_tokens_and_inside_a_character_ends_the_answer_before_it():
    tokenizer = byte_tokenizer()  # "語" is three tokens: the stop begins in the middle of the first
    pieces, finish = run_row(
        tokenizer, tokenizer("日本語 is Japanese.", add_special_tokens=False)["input_ids"], ["語 is"]
    )
    assert "".join(pieces) == "日本" and finish == ["stop"]  # the "語" of the stop string was never sent


def test_a_row_decodes_a_short_window_per_token_not_its_whole_text():
    """The cost of a token does not grow with the answer: each decode sees a few tokens, however long the answer."""
    tokenizer = byte_tokenizer()
    tokens = tokenizer("日本語 and é, " * 40, add_special_tokens=False)["input_ids"]
    decode, seen = tokenizer.decode, []
    tokenizer.decode = lambda ids, **kwargs: seen.append(len(ids)) or decode(ids, **kwargs)
    pieces, finish = run_row(tokenizer, tokens, stop=["never"])
    assert len(tokens) > 500 and max(seen) <= 8
    assert "".join(pieces) == decode(tokens)[: -len("never") + 1] and finish == []
