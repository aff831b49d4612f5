"""Continuous batching for `llama-adapter serve`: the requests for one model decode together, a token per step.

One thread owns the models. Each step it takes the next model with work (models take turns on their shared base),
admits that model's waiting requests into its batch up to `max_batch` (their prompts prefilled together, left-padded,
their key/value cache joined to the batch's), decodes one token for every row, and drops the rows that finished
(end-of-sequence, a stop string, their token limit) or whose client went away. Greedy rows pick the argmax, as
`generate` does, so a greedy answer is the one `LlamaAdapterModel.generate` gives for the same prompt.
"""

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import generation, hf
from .model import LlamaAdapterModel

WORKER_NAME = "llama-adapter-batcher"
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the server takes: the client should retry later."""


@dataclass
class Job:
    """One request: a prompt's tokens for a model, how to pick the answer's tokens, where its pieces go.

    `emit` is called from the batcher's thread with each new piece of text, then once with `finish` set: "stop" (end
    of sequence or a stop string), "length" (max_tokens or the context), "cancelled" or "error: ..."."""

    model: str
    prompt: list[int]
    max_tokens: int
    emit: Callable[..., None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    image: torch.Tensor | None = None  # CLIP features (clip_dim,) for a multimodal adapter
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Row:
    """A job in a batch: its tokens so far, their text, how much of it was sent, its random generator."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tokenizer = job, tokenizer
        self.tokens: list[int] = []
        self.text = ""  # the text of tokens[:read]
        self.read = 0
        self.context = 0  # tokens[context:read] are decoded again with the new ones, for the spacing between them
        self.sent = 0  # characters of the text emitted so far
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        self.finish: str | None = None

    def take(self, token: int) -> None:
        """Add a picked token: emit the text it completes, and finish the row when it should end."""
        if token == self.tokenizer.eos_token_id:
            return self.end("stop")
        self.tokens.append(token)
        checked = len(self.text)
        self.text += self.new_text()
        longest = max((len(s) for s in self.job.stop), default=0)
        # Only a stop string that ends in the new text can be new; the earlier text was searched already.
        start = max(0, checked - longest + 1)
        cut = min((i for i in (self.text.find(s, start) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self.end("stop", cut)
        if len(self.tokens) >= self.job.max_tokens:
            return self.end("length")
        safe = len(self.text) - max(longest - 1, 0)  # hold back what may be the start of a stop string
        if safe > self.sent:
            self.job.emit(self.text[self.sent : safe])
            self.sent = safe

    def new_text(self, final: bool = False) -> str:
        """The text that the tokens after `read` add, decoding only them and a few before (decoding the whole answer
        at every token would cost as much as the answer so far). Until `final`, a half character waits for the rest
        of its bytes: at most 4, after which they are not UTF-8 and the whole decode shows them as replaced too."""
        before = generation.answer_text(self.tokenizer, self.tokens[self.context : self.read])
        after = generation.answer_text(self.tokenizer, self.tokens[self.context :])
        if not final and after.endswith("\ufffd") and len(self.tokens) - self.read < 4:
            return ""
        self.context, self.read = self.read, len(self.tokens)
        return after[len(before) :]

    def end(self, reason: str, cut: int | None = None) -> None:
        """Send what is left of the text (up to `cut`, where a stop string starts), then the finish."""
        self.text = self.text[:cut] if cut is not None else self.text + self.new_text(final=True)
        if len(self.text) > self.sent:
            self.job.emit(self.text[self.sent :])
        self.finish = reason
        self.job.emit("", finish=reason, completion_tokens=len(self.tokens))


class _Batch:
    """The rows decoding together on one model, and their key/value cache."""

    def __init__(self, model: LlamaAdapterModel):
        self.model = model
        self.rows: list[_Row] = []
        self.cache = None
        self.mask = None  # (B, T): 1 where the cache holds a real token
        self.pending = None  # (B,): each row's last picked token, not yet in the cache
        self.images = None  # (B, clip_dim) features, zeros for rows without an image; None for a text-only model
        self.has_image = None  # (B,)

    def admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts together, pick each one's first token, and join them to the batch."""
        model = self.model
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
        longest = max(len(job.prompt) for job in jobs)
        ids = torch.tensor([[pad] * (longest - len(job.prompt)) + job.prompt for job in jobs])
        mask = torch.tensor([[0] * (longest - len(job.prompt)) + [1] * len(job.prompt) for job in jobs])
        images, has_image = self._images(jobs)
        with model.running(images, has_image) as image_kwargs:
            logits, cache = hf.prefill(model.base, ids.to(model.device), mask.to(model.device), image_kwargs)
        rows = [_Row(job, model.tokenizer) for job in jobs]
        first = _pick(logits, rows)
        for row, token in zip(rows, first.tolist()):
            row.take(token)
        mask = mask.to(model.device)
        if self.rows:
            self.cache, self.mask = hf.join_caches(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.pending = first if self.pending is None else torch.cat([self.pending, first])
        if images is not None:
            self.images = images if self.images is None else torch.cat([self.images, images])
            self.has_image = has_image if self.has_image is None else torch.cat([self.has_image, has_image])
        self.rows += rows
        self._drop_finished()

    def step(self) -> None:
        """Decode one token for every row, then drop the rows that finished."""
        model = self.model
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's real tokens so far: the new token's position
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with model.running(self.images, self.has_image) as image_kwargs:
            logits = hf.decode_step(model.base, self.pending[:, None], self.mask, positions, self.cache, image_kwargs)
        self.pending = _pick(logits, self.rows)
        for row, token, position in zip(self.rows, self.pending.tolist(), positions[:, 0].tolist()):
            if row.job.cancelled.is_set():
                row.finish = "cancelled"
                row.job.emit("", finish="cancelled", completion_tokens=len(row.tokens))
            else:
                row.take(token)
                if row.finish is None and position + 2 >= model.context_length:  # the next token would not fit
                    row.end("length")
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pending = self.images = self.has_image = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        hf.select_cache_rows(self.cache, index)
        self.mask, self.pending = self.mask[index], self.pending[index]
        if self.images is not None:
            self.images, self.has_image = self.images[index], self.has_image[index]
        # Columns no row needs any more (a long prompt that left) go too.
        unused = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if unused:
            hf.crop_cache_left(self.cache, unused)
            self.mask = self.mask[:, unused:]

    def _images(self, jobs: list[Job]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.model.multimodal:
            return None, None
        dim = self.model.image_encoder.clip_dim
        features = torch.stack([job.image if job.image is not None else torch.zeros(dim) for job in jobs])
        has_image = torch.tensor([job.image is not None for job in jobs])
        return features.to(self.model.device), has_image.to(self.model.device)


def _pick(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Each row's next token from its logits (B, vocab): the argmax when greedy, else a top-p sample."""
    picked = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.generator is not None:
            picked[i] = _sample(logits[i].float(), row.job.temperature, row.job.top_p, row.generator)
    return picked


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the smallest set whose probability reaches top_p
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])


class Batcher:
    """Runs the jobs of several models that share a base: the models take turns, a decode step each."""

    def __init__(self, models: dict[str, LlamaAdapterModel], max_batch: int, queue: int):
        self.models, self.max_batch, self.queue = models, max_batch, queue
        self.waiting: dict[str, collections.deque[Job]] = {name: collections.deque() for name in models}
        self.batches = {name: _Batch(model) for name, model in models.items()}
        self.turn = list(models)
        self.ready = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=WORKER_NAME, daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.ready:
            if sum(len(jobs) for jobs in self.waiting.values()) >= self.queue:
                raise QueueFull(f"{self.queue} requests are already waiting; try again shortly")
            self.waiting[job.model].append(job)
            self.ready.notify()

    def busy(self) -> int:
        """How many jobs are decoding or waiting."""
        with self.ready:
            return sum(len(jobs) for jobs in self.waiting.values()) + sum(len(b.rows) for b in self.batches.values())

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.closed or self._next_model() is not None)
                if self.closed:
                    return
                name = self._next_model()
                batch, waiting = self.batches[name], self.waiting[name]
                admitted = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(batch.rows)))]
            admitted = [job for job in admitted if not job.cancelled.is_set()]
            try:
                with torch.no_grad():
                    if admitted:
                        batch.admit(admitted)
                    elif batch.rows:
                        batch.step()
            except Exception as err:  # the batch's requests get the error; the server goes on
                log.exception("decoding a batch of %s failed", name)
                for row in [*batch.rows, *(_Row(job, batch.model.tokenizer) for job in admitted)]:
                    row.job.emit("", finish=f"error: {type(err).__name__}: {err}", completion_tokens=len(row.tokens))
                self.batches[name] = _Batch(batch.model)
            self.turn.append(self.turn.pop(self.turn.index(name)))  # the next model's turn

    def _next_model(self) -> str | None:
        """The first model, in turn order, that has rows decoding or jobs waiting."""
        return next((n for n in self.turn if self.batches[n].rows or self.waiting[n]), None)
