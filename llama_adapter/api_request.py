"""What one request to the OpenAI-compatible API asks (serve.py), checked before any work is done for it.

Each field of OpenAI's chat and completions requests is supported (its type and range checked here), neutral (taken
only at a value that asks for nothing, such as `"logprobs": false` or `"n": 1`, because this server offers nothing
else) or unknown (refused, as OpenAI refuses it). A null is a field left out. The same tables give the JSON schema
of the request bodies, which the OpenAPI document publishes for clients and for the fuzz tests.

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

from . import data
from .batcher import SEEDS
from .config import SamplingConfig
from .model import LlamaAdapterModel
from .visual import load_image

MAX_IMAGE = 10 * 1024 * 1024  # one decoded image file
MAX_STOPS = 4


class ApiError(Exception):
    """A request the API refuses: its HTTP status, OpenAI's error type and the message the client sees."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


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


# ----------------------------------------------------------------------------------------------------------
# The fields: each checks a value (never null: null is a field left out) and says its JSON schema.


@dataclass(frozen=True)
class Number:
    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    above: bool = False  # low itself is out

    def check(self, key: str, value):
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not (integer or (self.kind is float and isinstance(value, float))):
            raise ApiError(400, f"'{key}' must be {'an integer' if self.kind is int else 'a number'}", param=key)
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        if not low_ok or (self.high is not None and value > self.high):
            bounds = f"{'(' if self.above else '['}{self.low}, {self.high}]"
            raise ApiError(400, f"'{key}' must be in {bounds}, got {value}", param=key)
        return self.kind(value)

    def schema(self) -> dict:
        schema = {"type": "integer" if self.kind is int else "number"}
        if self.low is not None:
            schema["exclusiveMinimum" if self.above else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return schema


@dataclass(frozen=True)
class Flag:
    def check(self, key: str, value) -> bool:
        if not isinstance(value, bool):
            raise ApiError(400, f"'{key}' must be true or false, got {json.dumps(value)[:40]}", param=key)
        return value

    def schema(self) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Text:
    def check(self, key: str, value) -> str:
        if not isinstance(value, str):
            raise ApiError(400, f"'{key}' must be a string", param=key)
        return value

    def schema(self) -> dict:
        return {"type": "string"}


@dataclass(frozen=True)
class Neutral:
    """A field of OpenAI's that this server does not offer: taken only at a value that asks for nothing."""

    values: tuple
    rule: str  # what the client is told, after the field's name

    def check(self, key: str, value):
        # True == 1 and 0 == False in Python: a value is neutral only with the neutral value's own type.
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values):
            raise ApiError(400, f"'{key}' {self.rule}", param=key)
        return value

    def schema(self) -> dict:
        return {"enum": list(self.values)}


@dataclass(frozen=True)
class Stops:
    def check(self, key: str, value) -> tuple[str, ...]:
        stops = (value,) if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
            raise ApiError(400, f"'{key}' must be a string or a list of up to {MAX_STOPS} non-empty strings", param=key)
        return tuple(stops)

    def schema(self) -> dict:
        text = {"type": "string", "minLength": 1}
        return {"anyOf": [text, {"type": "array", "items": text, "maxItems": MAX_STOPS}]}


@dataclass(frozen=True)
class StreamOptions:
    def check(self, key: str, value) -> bool:
        """Whether the stream ends with a chunk of usage."""
        if not isinstance(value, dict) or set(value) - {"include_usage"}:
            raise ApiError(400, f"'{key}' must be an object with at most the key 'include_usage'", param=key)
        usage = value.get("include_usage", False)
        if not isinstance(usage, bool):
            raise ApiError(400, f"'{key}.include_usage' must be true or false", param=key)
        return usage

    def schema(self) -> dict:
        return {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": False}


@dataclass(frozen=True)
class Shaped:
    """A field read by its own function below (the messages, the prompt): here only its JSON schema."""

    shape: dict

    def check(self, key: str, value):
        return value

    def schema(self) -> dict:
        return self.shape


TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
IMAGE_PART = {
    "type": "object",
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {
            "type": "object",
            "properties": {"url": {"type": "string"}, "detail": {"enum": ["auto", "low", "high"]}},
            "required": ["url"],
        },
    },
    "required": ["type", "image_url"],
}
MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [TEXT_PART, IMAGE_PART]}}]},
    },
    "required": ["role", "content"],
}
NO_TOOLS = "is not supported: this server calls no tools; leave it out"
NO_LOGPROBS = "is not supported yet: no log-probabilities; leave it out"
COMMON = {
    "model": Text(),
    "max_tokens": Number(int, 1),
    "temperature": Number(float, 0, 2),
    "top_p": Number(float, 0, 1, above=True),
    "seed": Number(int, SEEDS.start, SEEDS.stop - 1),
    "stop": Stops(),
    "stream": Flag(),
    "stream_options": StreamOptions(),
    "user": Text(),  # who the end user is, for the caller's own records: nothing to do here
    "n": Neutral((1,), "must be 1: one answer per request (send several requests; they are batched)"),
    "presence_penalty": Neutral((0,), "is not supported: no penalties; leave it out or 0"),
    "frequency_penalty": Neutral((0,), "is not supported: no penalties; leave it out or 0"),
    "logit_bias": Neutral(({},), "is not supported: no logit biases; leave it out"),
}
CHAT = COMMON | {
    "messages": Shaped({"type": "array", "items": MESSAGE, "minItems": 1}),
    "max_completion_tokens": Number(int, 1),
    "logprobs": Neutral((False,), NO_LOGPROBS + " or false"),
    "top_logprobs": Neutral((), NO_LOGPROBS),
    "tools": Neutral(([],), NO_TOOLS),
    "tool_choice": Neutral(("none",), NO_TOOLS),
    "response_format": Neutral(({"type": "text"},), "is not supported: answers are plain text; leave it out"),
}
COMPLETIONS = COMMON | {
    "prompt": Shaped(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
            ]
        }
    ),
    "echo": Neutral((False,), "is not supported yet: the prompt is not echoed; leave it out or false"),
    "logprobs": Neutral((), NO_LOGPROBS),
    "best_of": Neutral((1,), "must be 1: one answer per request"),
    "suffix": Neutral(("",), "is not supported: no text after the answer; leave it out"),
}
REQUIRED = {"chat": ("model", "messages"), "completions": ("model", "prompt")}


def body_schema(fields: dict, required: tuple[str, ...], models: list[str]) -> dict:
    """The JSON schema of a request body with these fields (each also null, for left out), for the OpenAPI document."""
    properties = {key: {"anyOf": [field.schema(), {"type": "null"}]} for key, field in fields.items()}
    properties["model"] = {"enum": models}
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# ----------------------------------------------------------------------------------------------------------
# Reading a request


def chat_prompt(raw: bytes, models: dict[str, LlamaAdapterModel]) -> Prompt:
    """The prompt of a chat request's body: its conversation in our multi-turn format, the latest image in it."""
    fields = _fields(raw, CHAT, REQUIRED["chat"])
    name, model = _model(fields["model"], models)
    text, image = _conversation(fields["messages"], model)
    tokens = _tokens(text, model, "messages")
    features = None if image is None else model.encode_images([image])[0]
    return _prompt(fields, name, model, tokens, features)


def completion_prompt(raw: bytes, models: dict[str, LlamaAdapterModel]) -> Prompt:
    """The prompt of a completions request's body: its text as given, no template."""
    fields = _fields(raw, COMPLETIONS, REQUIRED["completions"])
    name, model = _model(fields["model"], models)
    text = fields["prompt"]
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    if not text:
        raise ApiError(400, "'prompt' is empty: give the text to continue", param="prompt")
    return _prompt(fields, name, model, _tokens(text, model, "prompt"), None)


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
        data.check_text(text, "the prompt")
    except data.DataError as err:
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


def _prompt(fields: dict, name: str, model: LlamaAdapterModel, tokens: list[int], image) -> Prompt:
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
        max_new_tokens=max_tokens or room, temperature=fields.get("temperature", 1.0), top_p=fields.get("top_p", 1.0)
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
    )


def _conversation(messages, model: LlamaAdapterModel):
    """The conversation in our multi-turn prompt format, and the latest image in it (PIL), if any."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    header, turns, image_url = data.HEADER_NO_INPUT, [], None
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
            header = text.strip() + "\n\n"
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
    *earlier, (instruction, _) = turns
    image = None if image_url is None else _decoded_image(*image_url)
    return data.format_conversation([tuple(t) for t in earlier], instruction, header=header), image


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
