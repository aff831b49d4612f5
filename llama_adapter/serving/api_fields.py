"""The fields of OpenAI's chat and completions requests, each with what this server takes of it.

Each field is supported (its type and range checked), neutral (taken only at a value that asks for nothing, such as
`"n": 1` or `"best_of": 1`, because this server offers nothing else) or unknown (refused, as OpenAI refuses it).
A null is a field left out. The same tables give the JSON schema of the request bodies, which the OpenAPI document
publishes for clients and for the fuzz tests.
"""

import json
from dataclasses import dataclass

from .logprobs import MAX_TOP
from .rows import SEEDS

MAX_STOPS = 4
MAX_PROMPTS = 32  # prompts in one completions request (lm-evaluation-harness sends its --batch_size at once)


class ApiError(Exception):
    """A request the API refuses: its HTTP status, OpenAI's error type and the message the client sees."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}


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
TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}  # a prompt as token ids
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
    "logprobs": Flag(),
    "top_logprobs": Number(int, 0, MAX_TOP),
    "tools": Neutral(([],), NO_TOOLS),
    "tool_choice": Neutral(("none",), NO_TOOLS),
    "response_format": Neutral(({"type": "text"},), "is not supported: answers are plain text; leave it out"),
}
COMPLETIONS = COMMON | {
    "prompt": Shaped(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
                TOKENS,
                {"type": "array", "items": TOKENS, "minItems": 1, "maxItems": MAX_PROMPTS},
            ]
        }
    ),
    "max_tokens": Number(int, 0),  # 0 only with echo: the prompt's log-probabilities alone
    "echo": Flag(),
    "logprobs": Number(int, 0, MAX_TOP),
    "best_of": Neutral((1,), "must be 1: one answer per request"),
    "suffix": Neutral(("",), "is not supported: no text after the answer; leave it out"),
}
REQUIRED = {"chat": ("model", "messages"), "completions": ("model", "prompt")}


def body_schema(fields: dict, required: tuple[str, ...], models: list[str]) -> dict:
    """The JSON schema of a request body with these fields (each also null, for left out), for the OpenAPI document."""
    properties = {key: {"anyOf": [field.schema(), {"type": "null"}]} for key, field in fields.items()}
    properties["model"] = {"enum": models}
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}
