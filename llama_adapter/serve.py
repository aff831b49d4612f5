"""`llama-adapter serve`: an OpenAI-compatible HTTP API over the models, decoded in batches (batcher.py).

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, streamed as server-sent events when
asked. Every error is OpenAI's error JSON with the status that fits, never a stack trace. Images come only inline
(data: URLs): the server fetches nothing.
"""

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import data
from .batcher import Batcher, Job, QueueFull
from .config import ServeConfig
from .model import LlamaAdapterModel
from .visual import load_image

log = logging.getLogger(__name__)
MAX_BODY = 20 * 1024 * 1024  # a request, images included
MAX_IMAGE = 10 * 1024 * 1024  # one decoded image file


class ApiError(Exception):
    """A request the API refuses: its HTTP status, OpenAI's error type and the message the client sees."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class Prompt:
    """What a request asks one model: the prompt's text and tokens, an image's CLIP features, how to answer."""

    model: str
    text: str
    tokens: list[int]
    image: torch.Tensor | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def build_app(models: dict[str, LlamaAdapterModel], api_key: str | None, max_batch: int, queue: int) -> FastAPI:
    """The API over `models` (id -> model, all on one base); the batcher starts with the app and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(models, max_batch, queue)
        yield
        app.state.batcher.close()

    app = FastAPI(title="llama-adapter", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The API key, then the body's size, before anything else reads the request."""
        try:
            if api_key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    raise ApiError(
                        401, "Incorrect or missing API key: send Authorization: Bearer <key>", "authentication_error"
                    )
            length = request.headers.get("content-length")
            if length is not None and int(length) > MAX_BODY:
                raise ApiError(413, f"Request body of {int(length):,} bytes is over the limit of {MAX_BODY:,}")
        except ApiError as err:
            return err.response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def refused(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"Internal error: {type(err).__name__}", "server_error").response()

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [_model_card(name, created) for name in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json_body(request)
        model = _model(body, models)
        text, image = _chat_prompt(body, models[model])
        if image is not None:  # CLIP runs in a worker thread: the event loop keeps streaming the other answers
            image = (await asyncio.to_thread(models[model].encode_images, [image]))[0]
        prompt = _prompt(body, model, models[model], (text, image))
        return await _answer(request, app.state.batcher, prompt, "chat.completion")

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await _json_body(request)
        model = _model(body, models)
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
        return await _answer(
            request, app.state.batcher, _prompt(body, model, models[model], (text, None)), "text_completion"
        )

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llama-adapter"}


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"Request body of {len(raw):,} bytes is over the limit of {MAX_BODY:,}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"The body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


def _model(body: dict, models: dict) -> str:
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' is required: one of " + ", ".join(models), param="model")
    if name not in models:
        raise ApiError(
            404, f"The model {name!r} does not exist; this server has " + ", ".join(models), "not_found_error", "model"
        )
    return name


def _chat_prompt(body: dict, model: LlamaAdapterModel):
    """The conversation in our multi-turn prompt format, and the latest image in it (PIL), if any."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    header, turns, image = data.HEADER_NO_INPUT, [], None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}: each message needs a role: system, user or assistant", param=where)
        text, images = _content(message.get("content"), where)
        if images and message["role"] != "user":
            raise ApiError(400, f"{where}: only a user message may carry an image", param=where)
        if message["role"] == "system":
            if i != 0:
                raise ApiError(400, f"{where}: a system message may only come first", param=where)
            header = text.strip() + "\n\n"
        elif message["role"] == "user":
            if turns and turns[-1][1] is None:
                raise ApiError(
                    400, f"{where}: two user messages in a row; put an assistant message between", param=where
                )
            turns.append([text, None])
            image = images[-1] if images else image  # the adapter sees one image: the latest
        else:
            if not turns or turns[-1][1] is not None:
                raise ApiError(400, f"{where}: an assistant message must answer a user message", param=where)
            turns[-1][1] = text
    if not turns or turns[-1][1] is not None:
        raise ApiError(400, "the last message must be the user's", param="messages")
    if image is not None and not model.multimodal:
        raise ApiError(
            400, "this model has no image encoder: send text only, or use a multimodal adapter", param="messages"
        )
    *earlier, (instruction, _) = turns
    return data.format_conversation([tuple(t) for t in earlier], instruction, header=header), image


def _content(content, where: str) -> tuple[str, list]:
    """A message's text, and its images (PIL), from a string or a list of OpenAI content parts."""
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
            images.append(_decoded_image(url, at))
        else:
            raise ApiError(
                400,
                f"{at}: a content part is {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}}",
                param=at,
            )
    return "\n".join(texts), images


def _decoded_image(url, where: str):
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
    try:
        raw = base64.b64decode(payload, validate=True)
        return load_image(io.BytesIO(raw))
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{where}: not a readable image ({str(err).split(': ', 1)[-1]})", param=where) from None


def _prompt(body: dict, model_name: str, model: LlamaAdapterModel, asked: tuple[str, torch.Tensor | None]) -> Prompt:
    text, image = asked
    try:
        data.check_text(text, "the prompt")
    except data.DataError as err:
        raise ApiError(400, str(err), param="messages") from None
    tokens = model.tokenizer(text)["input_ids"]
    room = model.context_length - len(tokens)
    max_tokens = _number(body, "max_tokens", int, None, 1) or _number(body, "max_completion_tokens", int, None, 1)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens. However, you requested "
            f"{len(tokens) + (max_tokens or 1)} tokens ({len(tokens)} in the prompt, {max_tokens or 1} for the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
        )
    if body.get("n", 1) != 1:
        raise ApiError(
            400, "'n' must be 1: one answer per request (send several requests; they are batched)", param="n"
        )
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    options = body.get("stream_options") or {}
    return Prompt(
        model=model_name,
        text=text,
        tokens=tokens,
        image=image,
        max_tokens=max_tokens or room,
        temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, above=True),
        seed=_number(body, "seed", int, None),
        stop=tuple(stop),
        stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def _number(body: dict, key: str, kind, default, low=None, high=None, above=False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        raise ApiError(400, f"'{key}' must be in {'(' if above else '['}{low}, {high}]", param=key)
    return kind(value)


async def _answer(request: Request, batcher: Batcher, prompt: Prompt, kind: str):
    """Queue the prompt; stream its pieces as server-sent events, or gather them into one response."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

    def emit(text: str, finish: str | None = None, completion_tokens: int = 0) -> None:  # the batcher's thread
        loop.call_soon_threadsafe(pieces.put_nowait, (text, finish, completion_tokens))

    job = Job(
        model=prompt.model, prompt=prompt.tokens, max_tokens=prompt.max_tokens, emit=emit,
        temperature=prompt.temperature, top_p=prompt.top_p, seed=prompt.seed, stop=prompt.stop, image=prompt.image,
    )  # fmt: skip
    try:
        batcher.submit(job)
    except QueueFull as err:
        raise ApiError(429, f"The server is busy: {err}", "rate_limit_error") from None
    reply = _Reply(kind, prompt)
    if prompt.stream:
        return StreamingResponse(_events(reply, job, pieces), media_type="text/event-stream")
    text, finish, completion = "", None, 0
    try:
        while finish is None:
            try:
                piece, finish, completion = await asyncio.wait_for(pieces.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return None
                continue
            text += piece
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    if finish.startswith("error"):
        raise ApiError(500, f"Generation failed: {finish.removeprefix('error: ')}", "server_error")
    return reply.whole(text, finish, completion)


async def _events(reply, job: Job, pieces: asyncio.Queue):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; a client that leaves cancels the job."""
    try:
        yield _sse(reply.chunk(role=True))
        while True:
            piece, finish, completion = await pieces.get()
            if piece:
                yield _sse(reply.chunk(piece))
            if finish is not None:
                if finish.startswith("error"):
                    error = {"message": f"Generation failed: {finish.removeprefix('error: ')}", "type": "server_error"}
                    yield _sse({"error": error})
                else:
                    yield _sse(reply.chunk(finish=finish))
                    if reply.prompt.include_usage:
                        yield _sse(reply.chunk(usage=completion))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()  # a no-op once finished; frees the row of a client that went away


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request, in the shape of OpenAI's chat.completion or text_completion."""

    def __init__(self, kind: str, prompt: Prompt):
        self.kind, self.prompt = kind, prompt
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _usage(self, completion: int) -> dict:
        prompt = len(self.prompt.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.prompt.model}

    def whole(self, text: str, finish: str, completion: int) -> dict:
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        return self._head(self.kind) | {
            "choices": [choice | {"finish_reason": finish}],
            "usage": self._usage(completion),
        }

    def chunk(self, text: str = "", finish: str | None = None, role: bool = False, usage: int | None = None) -> dict:
        if usage is not None:
            chunk_kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
            return self._head(chunk_kind) | {"choices": [], "usage": self._usage(usage)}
        if self.kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}


class ServerThread:
    """An app served by uvicorn in a background thread, for a notebook, a test or a benchmark; port 0 takes a free one.

    `url` is the API's base URL (http://host:port/v1), which the `openai` client takes as `base_url`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="llama-adapter-serve", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise OSError(f"could not serve on {host}:{port} (see the log above)")
            time.sleep(0.02)
        self.url = f"http://{host}:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


def serve(models: dict[str, LlamaAdapterModel], cfg: ServeConfig) -> None:
    """Serve the API until interrupted; warns when it listens beyond this machine without an API key."""
    unbatchable = [name for name, model in models.items() if not model.method.tokens_only]
    if unbatchable:
        raise ValueError(
            f"serve cannot batch {', '.join(unbatchable)}: prefix, P-tuning v2 and prompt tuning put virtual tokens "
            "before every sequence; use `llama-adapter chat` or `demo` for them"
        )
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(
            f"WARNING: serving on {cfg.host} without --api-key: anyone who reaches this port can use the models",
            file=sys.stderr,
        )
    app = build_app(models, cfg.api_key, cfg.max_batch, cfg.queue)
    print(f"Serving {', '.join(models)} on http://{cfg.host}:{cfg.port}/v1 (OpenAI API)", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
