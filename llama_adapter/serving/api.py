"""`llama-adapter serve`: an OpenAI-compatible HTTP API over the models, decoded in batches (batcher.py).

Endpoints: GET /v1/models (and /v1/models/{id}), POST /v1/chat/completions, POST /v1/completions (several prompts
in one request too), streamed as server-sent events when asked, with token log-probabilities when asked; GET /health;
GET /openapi.json, the schema of it all. Every error is OpenAI's error
JSON with the status that fits, never a stack trace. A request is read and checked in a worker thread
(api_request.py), its limits before its work; images come only inline (data: URLs): the server fetches nothing.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import sys
import threading
import time
import uuid
from typing import NamedTuple

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..config import ServeConfig
from ..model import LlamaAdapterModel
from . import api_fields, api_request, logprobs
from .api_fields import ApiError
from .api_request import Prompt
from .batcher import Batcher, QueueFull, Stopped, check_batchable
from .logprobs import TokenLogprob
from .rows import Job

log = logging.getLogger(__name__)
MAX_BODY = 20 * 1024 * 1024  # a request, images included
GRACE = 10.0  # seconds the answers under way have to finish once the server is told to stop


def build_app(models: dict[str, LlamaAdapterModel], api_key: str | None, max_batch: int, queue: int) -> FastAPI:
    """The API over `models` (id -> model, all on one base); the batcher starts with the app and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(models, max_batch, queue)
        yield
        app.state.batcher.close()

    app = FastAPI(title="llama-adapter", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key)

    @app.exception_handler(ApiError)
    async def refused(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, err: HTTPException) -> JSONResponse:
        """Routing's own answers (no such path, a method the path does not take) in OpenAI's shape."""
        message = f"Invalid URL ({request.method} {request.url.path})"
        if err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; it takes {err.headers.get('Allow')}"
        return _error_response(ApiError(err.status_code, message), headers=err.headers)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error_response(ApiError(500, f"Internal error: {type(err).__name__}", "server_error"))

    @app.get("/health")
    async def health():
        failure = app.state.batcher.failure
        if failure is not None:
            message = f"the decoding thread stopped: {type(failure).__name__}: {failure}; restart the server"
            raise ApiError(503, message, "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [_model_card(name, created) for name in models]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        if model not in models:
            raise ApiError(404, f"The model {model!r} does not exist", "not_found_error", "model")
        return _model_card(model, int(time.time()))

    ids = list(models)

    @app.post("/v1/chat/completions", openapi_extra=_request_body(api_fields.CHAT, "chat", ids))
    async def chat(request: Request):
        prompt = await asyncio.to_thread(api_request.chat_prompt, await request.body(), models)
        return await _answer(request, app.state.batcher, [prompt], _Reply("chat.completion", [prompt], models))

    @app.post("/v1/completions", openapi_extra=_request_body(api_fields.COMPLETIONS, "completions", ids))
    async def complete(request: Request):
        prompts = await asyncio.to_thread(api_request.completion_prompts, await request.body(), models)
        return await _answer(request, app.state.batcher, prompts, _Reply("text_completion", prompts, models))

    return app


def _request_body(fields: dict, endpoint: str, models: list[str]) -> dict:
    schema = api_fields.body_schema(fields, api_fields.REQUIRED[endpoint], models)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error_response(err: ApiError, headers=None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class _Guard:
    """ASGI middleware: the API key, then the body's size, counted as it arrives, before the app reads it whole.
    (Pure ASGI, not Starlette's BaseHTTPMiddleware, behind which an endpoint never sees its client disconnect.)"""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(scope)
        except ApiError as err:
            return await _error_response(err)(scope, receive, send)
        received = 0

        async def receive_at_most():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:  # a chunked body says no length in advance
                raise ApiError(413, f"Request body is over the limit of {MAX_BODY:,} bytes")
            return message

        await self.app(scope, receive_at_most, send)

    def _check(self, scope) -> None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                raise ApiError(
                    401, "Incorrect or missing API key: send Authorization: Bearer <key>", "authentication_error"
                )
        length = int(headers.get(b"content-length", 0))  # the HTTP server has checked that it is a number
        if length > MAX_BODY:
            raise ApiError(413, f"Request body of {length:,} bytes is over the limit of {MAX_BODY:,}")


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llama-adapter"}


class _Piece(NamedTuple):
    """What a job's row emitted (rows.Job), and which of the request's prompts it answers."""

    index: int
    text: str
    finish: str | None
    completion_tokens: int
    logprobs: list[TokenLogprob] | None  # the answer's tokens in this piece
    prompt_logprobs: list[TokenLogprob] | None  # the prompt's tokens (echo), in a piece of their own


async def _answer(request: Request, batcher: Batcher, prompts: list[Prompt], reply: "_Reply"):
    """Queue the prompts; stream their pieces as server-sent events, or gather them into one response."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [_job(prompt, index, loop, pieces) for index, prompt in enumerate(prompts)]
    for submitted, job in enumerate(jobs):
        try:
            batcher.submit(job)
        except (QueueFull, Stopped) as err:
            for queued in jobs[:submitted]:
                queued.cancelled.set()
            if isinstance(err, QueueFull):
                raise ApiError(429, f"The server is busy: {err}", "rate_limit_error") from None
            raise ApiError(503, f"The server cannot answer: {err}", "server_error") from None
    if prompts[0].stream:
        return StreamingResponse(_events(reply, jobs, pieces), media_type="text/event-stream")
    watch = asyncio.create_task(_cancel_when_gone(request, jobs))
    answers = [_Answer() for _ in prompts]
    try:
        while any(answer.finish is None for answer in answers):
            piece = await pieces.get()
            failure = None if piece.finish is None else _failure(piece.finish)
            if failure is not None:
                raise failure
            answers[piece.index].add(piece)
    finally:
        watch.cancel()
        for job in jobs:
            job.cancelled.set()  # a no-op once finished; frees the rows if this task was cancelled or one failed
    return await asyncio.to_thread(reply.whole, answers)  # the log-probabilities' texts cost time per token


def _job(prompt: Prompt, index: int, loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue) -> Job:
    def emit(text, finish=None, completion_tokens=0, logprobs=None, prompt_logprobs=None) -> None:  # batcher's thread
        piece = _Piece(index, text, finish, completion_tokens, logprobs, prompt_logprobs)
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    return Job(
        model=prompt.model, prompt=prompt.tokens, sampling=prompt.sampling, emit=emit, seed=prompt.seed,
        stop=prompt.stop, image=prompt.image, logprobs=prompt.logprobs,
        # The prompt's logits are kept only to score it, or to end a row that answers nothing.
        echo=prompt.echo and (prompt.logprobs is not None or prompt.prompt_only), prompt_only=prompt.prompt_only,
    )  # fmt: skip


class _Answer:
    """One prompt's answer gathered: its text, its tokens' log-probabilities (the prompt's first, with echo)."""

    def __init__(self):
        self.text, self.finish, self.completion_tokens = "", None, 0
        self.scored: list[TokenLogprob] = []

    def add(self, piece: _Piece) -> None:
        self.text += piece.text
        self.scored += (piece.prompt_logprobs or []) + (piece.logprobs or [])
        self.finish, self.completion_tokens = piece.finish, piece.completion_tokens


async def _cancel_when_gone(request: Request, jobs: list[Job]) -> None:
    """Cancel the jobs when their client disconnects: a non-streamed answer writes nothing until it is whole, so
    nothing else would notice, and its rows would decode on for nobody."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancelled.set()


def _failure(finish: str) -> ApiError | None:
    """The error of an answer that did not end as asked (None for "stop" and "length")."""
    if finish.startswith("error: "):
        return ApiError(500, f"Generation failed: {finish.removeprefix('error: ')}", "server_error")
    if finish == "shutdown":
        return ApiError(503, "The server is shutting down: send the request again once it is back", "server_error")
    if finish == "cancelled":  # the client left: nobody reads this
        return ApiError(499, "The client closed the request")
    return None


async def _events(reply: "_Reply", jobs: list[Job], pieces: asyncio.Queue):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; a client that leaves cancels the jobs.
    Each chunk's choice carries its prompt's `index`, and the log-probabilities of the tokens in its text."""
    try:
        for index in range(len(jobs)):
            yield _sse(reply.chunk(index, start=True))
        completion = [None] * len(jobs)
        while None in completion:
            piece = await pieces.get()
            failure = None if piece.finish is None else _failure(piece.finish)
            if failure is not None:
                yield _sse(failure.body())
                yield "data: [DONE]\n\n"
                return
            if piece.prompt_logprobs:  # the whole prompt's at once: written in a worker thread
                yield _sse(await asyncio.to_thread(reply.chunk, piece.index, scored=piece.prompt_logprobs))
            if piece.text or piece.logprobs or piece.finish is not None:
                yield _sse(reply.chunk(piece.index, piece.text, piece.logprobs, piece.finish))
            if piece.finish is not None:
                completion[piece.index] = piece.completion_tokens
        if reply.prompts[0].include_usage:
            yield _sse(reply.chunk(usage=sum(completion)))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancelled.set()  # a no-op once finished; frees the rows of a client that went away


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request, in the shape of OpenAI's chat.completion or text_completion."""

    def __init__(self, kind: str, prompts: list[Prompt], models: dict[str, LlamaAdapterModel]):
        self.kind, self.prompts = kind, prompts
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.written = logprobs.written(models[prompts[0].model].tokenizer)
        # Where each answer's next token starts in its text (the legacy text_offset): the prompt's, with echo.
        self.offsets = [0 if prompt.echo else len(prompt.text) for prompt in prompts]

    def _usage(self, completion: int) -> dict:
        prompt = sum(len(prompt.tokens) for prompt in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.prompts[0].model}

    def _logprobs(self, index: int, scored: list[TokenLogprob]) -> dict | None:
        """A choice's `logprobs` for these tokens (None where the request asked for none)."""
        if self.prompts[index].logprobs is None:
            return None
        if self.kind == "chat.completion":
            return {"content": self.written.chat(scored), "refusal": None}
        written, self.offsets[index] = self.written.legacy(scored, self.offsets[index])
        return written

    def whole(self, answers: list[_Answer]) -> dict:
        choices = []
        for index, answer in enumerate(answers):
            choice = {"index": index, "logprobs": self._logprobs(index, answer.scored)}
            if self.kind == "chat.completion":
                choice["message"] = {"role": "assistant", "content": answer.text}
            else:
                prompt = self.prompts[index]
                choice["text"] = prompt.text + answer.text if prompt.echo else answer.text
            choices.append(choice | {"finish_reason": answer.finish})
        completion = sum(answer.completion_tokens for answer in answers)
        return self._head(self.kind) | {"choices": choices, "usage": self._usage(completion)}

    def chunk(
        self, index: int = 0, text: str = "", scored: list[TokenLogprob] | None = None, finish: str | None = None,
        start: bool = False, usage: int | None = None,
    ) -> dict:  # fmt: skip
        """A stream's chunk: a choice's `start` (chat's role; a completion's echoed prompt), a piece of its text with
        its tokens' log-probabilities (`scored`), its finish; or the `usage` of all."""
        chat = self.kind == "chat.completion"
        if usage is not None:
            return self._head("chat.completion.chunk" if chat else "text_completion") | {
                "choices": [],
                "usage": self._usage(usage),
            }
        written = self._logprobs(index, scored) if scored else None
        if chat:
            delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": written, "finish_reason": finish}
            return self._head("chat.completion.chunk") | {"choices": [choice]}
        if start and self.prompts[index].echo:
            text = self.prompts[index].text
        choice = {"index": index, "text": text, "logprobs": written, "finish_reason": finish}
        return self._head("text_completion") | {"choices": [choice]}


class _Server(uvicorn.Server):
    """uvicorn's server with a grace: told to stop (SIGTERM, Ctrl-C, `ServerThread.stop`), it takes no new
    connections and gives the answers under way GRACE seconds to finish; then they end with a 503."""

    def __init__(self, app: FastAPI, host: str, port: int):
        # uvicorn's own limit is a backstop only: by then every answer has ended.
        super().__init__(uvicorn.Config(app, host, port, log_level="warning", timeout_graceful_shutdown=int(GRACE) + 5))
        self.app = app

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(GRACE, self.app.state.batcher.shut_down)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


class ServerThread:
    """An app served by uvicorn in a background thread, for a notebook, a test or a benchmark; port 0 takes a free one.

    `url` is the API's base URL (http://host:port/v1), which the `openai` client takes as `base_url`.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = _Server(app, host, port)
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
    """Serve the API until SIGTERM or Ctrl-C; warns when it listens beyond this machine without an API key."""
    check_batchable(models)  # before the server starts, whose thread would only log it
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(
            f"WARNING: serving on {cfg.host} without --api-key: anyone who reaches this port can use the models",
            file=sys.stderr,
        )
    app = build_app(models, cfg.api_key, cfg.max_batch, cfg.queue)
    print(f"Serving {', '.join(models)} on http://{cfg.host}:{cfg.port}/v1 (OpenAI API)", file=sys.stderr)
    # uvicorn raises the signal it stopped for again once it has stopped; caught here, a SIGTERM (a stop that was
    # asked for, not a failure) ends the process with status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        _Server(app, cfg.host, cfg.port).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
