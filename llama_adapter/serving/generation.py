"""Streaming generation on top of Hugging Face `generate` (KV cache, sampling, stopping are theirs)."""

import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..config import SamplingConfig
from ..data import batching, templates

WORKER_NAME = "llama-adapter-generate"  # the generation thread's name: a stopped stream leaves none behind


def stream(model, prompt: str, sampling: SamplingConfig, image_features: torch.Tensor | None = None) -> Iterator[str]:
    """Generate after a formatted prompt in a worker thread and yield text as it arrives.

    `image_features`: (1, clip_dim) or None.

    Closing the iterator early (a Stop button, Ctrl-C) stops the worker at the next token; an exception in
    the worker is re-raised here instead of leaving the consumer waiting. The worker runs in a copy of the caller's
    context: inside the caller's `disabled()` block, for one, it generates with the plain model.
    """
    tokenizer = model.tokenizer
    ids, mask = batching.left_padded(prompt_tokens(model, [prompt]), batching.pad_id(tokenizer))
    inputs = model.method.generation_inputs(ids.to(model.device), mask.to(model.device))
    streamer = TextIteratorStreamer(
        tokenizer, skip_prompt=True, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    stop = threading.Event()
    failure: list[BaseException] = []

    def work():
        try:
            with torch.no_grad(), model.running(image_features):
                model.base.generate(
                    **inputs,
                    **generation_kwargs(sampling, tokenizer, room(model, ids)),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                )
        except BaseException as err:  # noqa: BLE001 - every failure, interrupts too, is re-raised to the consumer
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name=WORKER_NAME, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]


def stream_conversation(
    model, earlier: list[tuple[str, str]], instruction: str, sampling: SamplingConfig, image=None
) -> tuple[Iterator[str], int]:
    """Stream the answer to `instruction` after the earlier (instruction, answer) exchanges, about `image` if given.

    The oldest exchanges are left out when the prompt and `sampling.max_new_tokens` would overflow the model's
    context; returns the answer's pieces and how many exchanges were left out.
    """
    room = model.context_length - sampling.max_new_tokens
    prompt, left_out = conversation_prompt(model.tokenizer, earlier, instruction, room)
    features = model.encode_images([image]) if image is not None else None
    return stream(model, prompt, sampling, features), left_out


def conversation_prompt(tokenizer, earlier: list[tuple[str, str]], instruction: str, room: int) -> tuple[str, int]:
    """The prompt for `instruction` after the earlier (instruction, answer) exchanges, in at most `room` tokens.

    The oldest exchanges are left out until it fits; returns the prompt and how many were left out.
    """
    templates.check_text(instruction, "the message")
    for left_out in range(len(earlier) + 1):
        prompt = templates.format_conversation(earlier[left_out:], instruction)
        length = len(tokenizer(prompt)["input_ids"])
        if length <= room:
            return prompt, left_out
    raise ValueError(f"the message is {length} tokens with the prompt template; the context has room for {room}")


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[str],
    sampling: SamplingConfig,
    image_features: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
) -> list[str]:
    """Answers to several formatted prompts at once: left-padded so every row's answer starts at the same column."""
    return [answer.text for answer in answer_batch(model, prompts, sampling, image_features, has_image)]


@dataclass
class Answer:
    text: str
    tokens: int  # how many the model generated, the end-of-sequence token included
    stopped: bool  # ended with the end-of-sequence token, not at the token limit or a full context


def answer_batch(
    model,
    prompts: list[str],
    sampling: SamplingConfig,
    image_features: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
) -> list[Answer]:
    """generate_batch's answers, each with its length and whether the model ended it."""
    tokenizer = model.tokenizer
    ids, mask = batching.left_padded(prompt_tokens(model, prompts), batching.pad_id(tokenizer))
    inputs = model.method.generation_inputs(ids.to(model.device), mask.to(model.device))
    with model.running(image_features, has_image):
        out = model.base.generate(**inputs, **generation_kwargs(sampling, tokenizer, room(model, ids)))
    answers = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        stopped = tokenizer.eos_token_id in row
        row = row[: row.index(tokenizer.eos_token_id) + 1] if stopped else row  # a finished row is padded after
        answers.append(Answer(answer_text(tokenizer, row), len(row), stopped))
    return answers


def answer_text(tokenizer, tokens: list[int]) -> str:
    """The text of answer tokens as the model wrote them, special tokens left out. Spaces are never "cleaned up" (a
    BERT-era option that turns " ," into ","): the text stays the model's, and the decode of a run of tokens stays the
    end of the decode of a longer run, which the server's streaming relies on."""
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def prompt_tokens(model, prompts: list[str]) -> list[list[int]]:
    """Each prompt's tokens; a prompt that is not text, or that leaves no room in the context to answer, is refused
    (past its context a model answers garbage, slowly)."""
    tokens = []
    for prompt in prompts:
        templates.check_text(prompt, "the prompt")
        tokens.append(model.tokenizer(prompt)["input_ids"])
        if len(tokens[-1]) >= model.context_length:
            raise ValueError(
                f"the prompt is {len(tokens[-1]):,} tokens; the model's context holds {model.context_length:,} "
                "with the answer: shorten it"
            )
    return tokens


def room(model, ids: torch.Tensor) -> int:
    """How many tokens the answer can have before the context is full."""
    return model.context_length - ids.shape[1] - model.method.virtual_tokens


def generation_kwargs(sampling: SamplingConfig, tokenizer, room: int) -> dict:
    """Arguments for Hugging Face `generate`, overriding whatever the base's generation_config suggests; the answer
    stops at `max_new_tokens` or where the context is full, whichever comes first."""
    kwargs = {
        "max_new_tokens": max(1, min(sampling.max_new_tokens, room)),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": batching.pad_id(tokenizer),
    }
    if not sampling.greedy:
        return kwargs | {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    return kwargs | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
