"""Streaming generation on top of Hugging Face `generate` (KV cache, sampling, stopping are theirs)."""

import contextvars
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..base import routing
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
    model, earlier: list[tuple[str, str]], instruction: str, sampling: SamplingConfig, image=None, batcher=None
) -> tuple[Iterator[str], int]:
    """Stream the answer to `instruction` after the earlier (instruction, answer) exchanges, about `image` if given.

    The oldest exchanges are left out when the prompt and `sampling.max_new_tokens` would overflow the model's
    context; returns the answer's pieces and how many exchanges were left out. `batcher`: (a `Batcher` that runs the
    model, its name there): the answer decodes in the batcher's batch, beside other callers' rows, whatever their
    adapters; without one, in a `generate` of its own.
    """
    room = model.context_length - sampling.max_new_tokens
    prompt, left_out = conversation_prompt(model.tokenizer, earlier, instruction, room, model.template)
    features = model.encode_images([image]) if image is not None else None
    if batcher is None:
        return stream(model, prompt, sampling, features), left_out
    runner, name = batcher
    image_row = None if features is None else features[0]
    return runner.stream(name, prompt_tokens(model, [prompt])[0], sampling, image_row), left_out


def conversation_prompt(
    tokenizer, earlier: list[tuple[str, str]], instruction: str, room: int, template: str = "alpaca"
) -> tuple[str, int]:
    """The prompt for `instruction` after the earlier (instruction, answer) exchanges, in at most `room` tokens, in
    `template` (templates.TEMPLATES).

    The oldest exchanges are left out until it fits; returns the prompt and how many were left out.
    """
    templates.check_text(instruction, "the message")
    for left_out in range(len(earlier) + 1):
        messages = [
            {"role": role, "content": text}
            for exchange in earlier[left_out:]
            for role, text in zip(("user", "assistant"), exchange)
        ]
        prompt = templates.prompt(template, tokenizer, messages + [{"role": "user", "content": instruction}])
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
    on_row_done: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to several formatted prompts at once: left-padded so every row's answer starts at the same column.

    `model`: one model for every prompt, or a list of models one per prompt: the (adapter, prompt) pairs of
    `zip(model, prompts)`, which run together in one batch when their adapters share a base object (each row answers
    what its adapter alone would). `image_features` (N, clip_dim) and `has_image` (N,): row n's image, if it has one.
    `on_row_done(count)`: told, during generation, how many more rows have finished (all N in the end; a progress bar).
    """
    answers = answer_batch(model, prompts, sampling, image_features, has_image, on_row_done)
    return [answer.text for answer in answers]


@dataclass
class Answer:
    text: str
    tokens: int  # how many the model generated, the end-of-sequence token included
    stopped: bool  # ended with the end-of-sequence token, not at the token limit or a full context


@torch.no_grad()
def answer_batch(
    model,
    prompts: list[str],
    sampling: SamplingConfig,
    image_features: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
    on_row_done: Callable[[int], None] | None = None,
) -> list[Answer]:
    """generate_batch's answers, each with its length and whether the model ended it."""
    models = list(model) if isinstance(model, (list, tuple)) else [model] * len(prompts)
    if len(models) != len(prompts):
        raise ValueError(f"{len(models)} models for {len(prompts)} prompts: give one model, or one per prompt")
    check_mixable(models)
    features = list(image_features) if image_features is not None else [None] * len(prompts)
    images = [None if has_image is not None and not has_image[i] else row for i, row in enumerate(features)]
    # Each adapter's rows side by side (adapters in the order they first come), so that they are one part of the call.
    first_row = {m: i for i, m in reversed(list(enumerate(models)))}
    by_model = sorted(range(len(prompts)), key=lambda i: first_row[models[i]])
    first, tokenizer = models[0], models[0].tokenizer
    ids, mask = batching.left_padded(prompt_tokens(first, [prompts[i] for i in by_model]), batching.pad_id(tokenizer))
    inputs = first.method.generation_inputs(ids.to(first.device), mask.to(first.device))
    kwargs = generation_kwargs(sampling, tokenizer, room(first, ids))
    finished = None if on_row_done is None else _CountFinished(tokenizer.eos_token_id, on_row_done)
    if finished is not None:  # only then: the check costs every step something
        kwargs["stopping_criteria"] = StoppingCriteriaList([finished])
    with first.shared.reserved():
        parts = parts_of([models[i] for i in by_model], [images[i] for i in by_model])
        with first.shared.running(parts):
            out = first.base.generate(**inputs, **kwargs)
    if finished is not None:
        finished.tell(len(prompts))  # the rows the length limit ended
    answers = [None] * len(prompts)
    for i, row in zip(by_model, out[:, inputs["input_ids"].shape[1] :].tolist()):
        stopped = tokenizer.eos_token_id in row
        row = row[: row.index(tokenizer.eos_token_id) + 1] if stopped else row  # a finished row is padded after
        answers[i] = Answer(answer_text(tokenizer, row), len(row), stopped)
    return answers


def check_mixable(models: list) -> None:
    """Refuse rows of several adapters that cannot run in one call: on different base objects, or with virtual tokens
    (prefix and prompt tuning put theirs before every row, which the others' rows do not have)."""
    distinct = list(dict.fromkeys(models))
    if len(distinct) == 1:
        return
    if len({model.shared for model in distinct}) > 1:
        raise ValueError("rows of one batch must run on one base object: load the adapters alongside one another")
    virtual = [model.method.name for model in distinct if not model.method.tokens_only]
    if virtual:
        raise ValueError(
            f"a {virtual[0]} adapter's rows cannot share a batch with other adapters': it adds virtual tokens"
        )


def parts_of(models: list, images: list[torch.Tensor | None]) -> list[routing.Part]:
    """The parts of a call whose row n runs `models[n]` about `images[n]` (CLIP features (clip_dim,), or None); the rows
    of each model must be side by side."""
    runs = [
        (model, [image for _, image in run]) for model, run in itertools.groupby(zip(models, images), lambda p: p[0])
    ]
    if len(runs) > len(set(models)):
        raise ValueError("the rows of each model must be side by side")
    parts, start = [], 0
    for model, run in runs:
        rows, start = slice(start, start + len(run)), start + len(run)
        given = [image for image in run if image is not None]
        if not given:
            parts.append(model.part(rows))
            continue
        features = torch.stack([given[0].new_zeros(given[0].shape) if image is None else image for image in run])
        has_image = torch.tensor([image is not None for image in run])
        parts.append(model.part(rows, features.to(model.device), has_image.to(model.device)))
    return parts


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


class _CountFinished(StoppingCriteria):
    """Tells `on_row_done` how many rows have newly ended with EOS at each step; never stops a row itself."""

    def __init__(self, eos_token_id: int, on_row_done: Callable[[int], None]):
        self.eos_token_id, self.on_row_done = eos_token_id, on_row_done
        self.done: torch.Tensor | None = None  # (N,) rows already counted: a finished row goes on as padding
        self.count = 0

    def __call__(self, input_ids, scores, **kwargs):
        ended = input_ids[:, -1] == self.eos_token_id
        self.done = ended if self.done is None else self.done | ended
        self.tell(int(self.done.sum()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def tell(self, count: int) -> None:
        """`count` rows have finished in all: pass on how many of them are new."""
        if count > self.count:
            self.on_row_done(count - self.count)
            self.count = count
