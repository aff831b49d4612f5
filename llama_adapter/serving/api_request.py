"""What one request to the OpenAI-compatible API asks (api.py), checked before any work is done for it: its
fields against the tables of api_fields.py, its model, its prompt's length, its image.

Everything here runs in a worker thread, never on the event loop: a request's JSON, images and tokens cost time in
proportion to its size, and the limits come first.
"""

import base64
import binascii
import functools
import io
import json
from dataclasses import dataclass
from typing import Any

import torch

from ..config import SamplingConfig
from ..data import sources, templates
from ..model import LlamaAdapterModel
from ..visual import load_image
from .api_fields import CHAT, COMPLETIONS, MAX_PROMPTS, REQUIRED, ApiError

MAX_IMAGE = 10 * 1024 * 1024  # one decoded image file


@dataclass
class Prompt:
    """What a request asks one model: the prompt's tokens, an image's CLIP features, how to answer."""

    model: str
    tokens: list[int]
    image: torch.Tensor | None
    sampling: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, and its k likeliest alternatives'
    text: str = ""  # a completion's prompt as text (given, or decoded from its token ids)
    echo: bool = False  # the answer repeats the prompt before its own text (completions' `echo`)
    prompt_only: bool = False  # `max_tokens` 0 with `echo`: the prompt's log-probabilities, no token of its own


def chat_prompt(raw: bytes, models: dict[str, LlamaAdapterModel]) -> Prompt:
    """The prompt of a chat request's body: its conversation in our multi-turn format, the latest image in it."""
    fields = _fields(raw, CHAT, REQUIRED["chat"])
    if "top_logprobs" in fields and not fields.get("logprobs", False):
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    name, model = _model(fields["model"], models)
    text, image = _conversation(fields["messages"], model)
    tokens = _tokens(text, model, "messages")
    features = None if image is None else model.encode_images([image])[0]
    logprobs = fields.get("top_logprobs", 0) if fields.get("logprobs", False) else None
    return _prompt(fields, name, model, tokens, features, logprobs=logprobs)


def completion_prompts(raw: bytes, models: dict[str, LlamaAdapterModel]) -> list[Prompt]:
    """The prompts of a completions request's body, each as given (text or token ids), no template."""
    fields = _fields(raw, COMPLETIONS, REQUIRED["completions"])
    echo = fields.get("echo", False)
    if fields.get("max_tokens") == 0 and not echo:
        raise ApiError(
            400,
            "'max_tokens' may be 0 only with 'echo': true (the prompt's log-probabilities alone)",
            param="max_tokens",
        )
    name, model = _model(fields["model"], models)
    return [
        _prompt(fields, name, model, tokens, None, logprobs=fields.get("logprobs"), text=text, echo=echo)
        for text, tokens in _completion_prompts(fields["prompt"], model)
    ]


def _completion_prompts(prompt, model: LlamaAdapterModel) -> list[tuple[str, list[int]]]:
    """Each prompt's text and tokens, from OpenAI's four forms: a string, a list of strings, a list of token ids, a
    list of lists of token ids."""
    if isinstance(prompt, str):
        return [(prompt, _text_tokens(prompt, model, "prompt"))]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, _PROMPT_FORMS, param="prompt")
    if all(isinstance(token, int) for token in prompt):
        return [_token_ids(prompt, model, "prompt")]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompt)} prompts, over the limit of {MAX_PROMPTS}", param="prompt")
    if all(isinstance(text, str) for text in prompt):
        return [(text, _text_tokens(text, model, f"prompt[{i}]")) for i, text in enumerate(prompt)]
    if all(isinstance(ids, list) for ids in prompt):
        return [_token_ids(ids, model, f"prompt[{i}]") for i, ids in enumerate(prompt)]
    raise ApiError(400, _PROMPT_FORMS, param="prompt")


def _text_tokens(text: str, model: LlamaAdapterModel, where: str) -> list[int]:
    if not text:
        raise ApiError(400, f"'{where}' is empty: give the text to continue", param=where)
    return _tokens(text, model, where)


_PROMPT_FORMS = "'prompt' must be a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _token_ids(ids: list, model: LlamaAdapterModel, where: str) -> tuple[str, list[int]]:
    """A prompt given as token ids, each one the tokenizer knows; its text, decoded."""
    if len(ids) >= model.context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. However, your prompt has "
            f"{len(ids):,} tokens. Please reduce the length of the prompt.",
            param=where,
        )
    vocabulary = len(model.tokenizer)
    bad = next((i for i, t in enumerate(ids) if not _integer(t) or not 0 <= t < vocabulary), None)
    if not ids or bad is not None:
        at = where if bad is None else f"{where}[{bad}]"
        raise ApiError(400, f"{at}: a prompt is one or more token ids from 0 to {vocabulary - 1}", param=where)
    return model.tokenizer.decode(ids), ids


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fields(raw: bytes, fields: dict, required: tuple[str, ...]) -> dict[str, Any]:
    """The body's fields, each checked; a null is a field left out."""
    body = _json(raw)
    unknown = next((key for key in body if key not in fields), None)
    if unknown is not None:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown}", param=unknown)
    checked = {key: fields[key].check(key, value) for key, value in body.items() if value is not None}
    for key in required:
        if key not in checked:
            raise ApiError(400, f"'{key}' is required", param=key)
    if "stream_options" in checked and not checked.get("stream", False):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    return checked


def _json(raw: bytes) -> dict:
    def not_a_number(name: str):
        raise ApiError(400, f"The body is not valid JSON: {name} is no JSON number")

    try:
        body = json.loads(raw, parse_constant=not_a_number)
    except RecursionError:
        raise ApiError(400, "The body is not valid JSON here: it is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, f"The body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


def _model(name: str, models: dict[str, LlamaAdapterModel]) -> tuple[str, LlamaAdapterModel]:
    if name not in models:
        raise ApiError(
            404, f"The model {name!r} does not exist; this server has " + ", ".join(models), "not_found_error", "model"
        )
    return name, models[name]


def _tokens(text: str, model: LlamaAdapterModel, param: str) -> list[int]:
    """The prompt's tokens; a prompt that cannot fit the context is refused by its length in characters first, so
    that a huge one is never tokenised."""
    try:
        templates.check_text(text, "the prompt")
    except sources.DataError as err:
        raise ApiError(400, str(err), param=param) from None
    at_least = -(-len(text) // _most_characters_per_token(model.tokenizer))
    if at_least >= model.context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. However, your prompt's "
            f"{len(text):,} characters make at least {at_least:,} tokens. Please reduce the length of the prompt.",
            param=param,
        )
    tokens = model.tokenizer(text)["input_ids"]
    if not tokens:
        raise ApiError(400, "the prompt makes no tokens: give some text", param=param)
    return tokens


@functools.cache
def _most_characters_per_token(tokenizer) -> int:
    """An upper bound on the characters one token stands for: its longest vocabulary entry (a byte-level entry holds
    a character per byte, at least as many as the text it decodes to)."""
    return max(map(len, tokenizer.get_vocab()))


def _prompt(fields: dict, name: str, model: LlamaAdapterModel, tokens: list[int], image, **scores) -> Prompt:
    """The request's settings for one prompt; `scores`: its `logprobs`, and a completion's `text` and `echo`."""
    room = model.context_length - len(tokens)
    max_tokens = fields.get("max_tokens", fields.get("max_completion_tokens"))
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. However, you requested "
            f"{len(tokens) + (max_tokens or 1)} tokens ({len(tokens)} in the prompt, {max_tokens or 1} for the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages" if "messages" in fields else "prompt",
        )
    sampling = SamplingConfig(
        max_new_tokens=1 if max_tokens == 0 else max_tokens or room,  # with 0 the row ends before it picks one
        temperature=fields.get("temperature", 1.0),
        top_p=fields.get("top_p", 1.0),
    )
    return Prompt(
        model=name,
        tokens=tokens,
        image=image,
        sampling=sampling,
        seed=fields.get("seed"),
        stop=fields.get("stop", ()),
        stream=fields.get("stream", False),
        include_usage=fields.get("stream_options", False),
        prompt_only=max_tokens == 0,
        **scores,
    )


def _conversation(messages, model: LlamaAdapterModel):
    """The conversation as a prompt in the model's template, and the latest image in it (PIL), if any."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    system, turns, image_url = [], [], None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where}: each message needs a role: system, user or assistant", param=where)
        extra = sorted(key for key, value in message.items() if key not in ("role", "content") and value is not None)
        if extra:
            raise ApiError(400, f"{where}.{extra[0]} is not supported: a message has a role and a content", param=where)
        text, urls = _content(message.get("content"), where)
        if urls and role != "user":
            raise ApiError(400, f"{where}: only a user message may carry an image", param=where)
        if role in ("system", "developer"):  # OpenAI's newer name for the system message
            if i != 0:
                raise ApiError(400, f"{where}: a {role} message may only come first", param=where)
            system = [{"role": "system", "content": text}]
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise ApiError(
                    400, f"{where}: two user messages in a row; put an assistant message between", param=where
                )
            turns.append([text, None])
            image_url = urls[-1] if urls else image_url  # the adapter sees one image: the latest
        else:
            if not turns or turns[-1][1] is not None:
                raise ApiError(400, f"{where}: an assistant message must answer a user message", param=where)
            turns[-1][1] = text
    if not turns or turns[-1][1] is not None:
        raise ApiError(400, "the last message must be the user's", param="messages")
    if image_url is not None and not model.multimodal:
        raise ApiError(
            400, "this model has no image encoder: send text only, or use a multimodal adapter", param="messages"
        )
    conversation = system + [
        {"role": role, "content": text}
        for turn in turns
        for role, text in zip(("user", "assistant"), turn)
        if text is not None
    ]
    image = None if image_url is None else _decoded_image(*image_url)
    return templates.prompt(model.template, model.tokenizer, conversation), image


def _content(content, where: str) -> tuple[str, list[tuple[str, str]]]:
    """A message's text, and its images' data as (base64 payload, where), from a string or OpenAI's content parts.
    Each image is checked for its form and size here; only the one the adapter sees is decoded."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", param=where)
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            images.append((_image_payload(url, at), at))
        else:
            raise ApiError(
                400,
                f"{at}: a content part is {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}}",
                param=at,
            )
    return "\n".join(texts), images


def _image_payload(url, where: str) -> str:
    if not isinstance(url, str):
        raise ApiError(400, f"{where}: image_url.url must be a string", param=where)
    if not url.startswith("data:"):
        raise ApiError(
            400, f"{where}: only data: URLs (base64 PNG or JPEG) are taken; this server fetches nothing", param=where
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ApiError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where)
    if len(payload) * 3 // 4 > MAX_IMAGE:
        raise ApiError(413, f"{where}: the image is over {MAX_IMAGE:,} bytes", param=where)
    return payload


def _decoded_image(payload: str, where: str):
    try:
        return load_image(io.BytesIO(base64.b64decode(payload, validate=True)))
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{where}: not a readable image ({str(err).split(': ', 1)[-1]})", param=where) from None
