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

import torch

from ..base import decoding
from ..data import batching
from ..model import LlamaAdapterModel
from .rows import Job, Row

WORKER_NAME = "llama-adapter-batcher"
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the server takes: the client should retry later."""


class Stopped(Exception):
    """The decoding thread has stopped (the server is closing, or the thread failed): no job is taken."""


class _Batch:
    """The rows decoding together on one model, and their key/value cache."""

    def __init__(self, model: LlamaAdapterModel):
        self.model = model
        self.clear()

    def clear(self) -> None:
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None  # (B, T): 1 where the cache holds a real token
        self.pending = None  # (B,): each row's last picked token, not yet in the cache
        self.images = None  # (B, clip_dim) features, zeros for rows without an image; None for a text-only model
        self.has_image = None  # (B,)

    def admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts together, pick each one's first token, and join them to the batch. When the
        prefill fails, each job is tried alone, so that only the one at fault gets the error."""
        try:
            logits, cache, mask, images, has_image = self._prefill(jobs)
        except Exception as err:  # noqa: BLE001 - whose fault it was is found by trying each alone
            if len(jobs) > 1:
                for job in jobs:
                    self.admit([job])
            else:
                Row(jobs[0], self.model.tokenizer).fail(err)
            return
        rows = [Row(job, self.model.tokenizer) for job in jobs]
        joined, self.rows = bool(self.rows), self.rows + rows  # from here, a failure of the batch ends them too
        first = self._advance(rows, logits)
        if joined:
            self.cache, self.mask = decoding.join_caches(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        self.pending = first if self.pending is None else torch.cat([self.pending, first])
        if images is not None:
            self.images = images if self.images is None else torch.cat([self.images, images])
            self.has_image = has_image if self.has_image is None else torch.cat([self.has_image, has_image])
        self._drop_finished()

    def _prefill(self, jobs: list[Job]):
        """The jobs' prompts run together, left-padded: the last logits, their cache, mask and image features."""
        model = self.model
        ids, mask = batching.left_padded([job.prompt for job in jobs], batching.pad_id(model.tokenizer))
        ids, mask = ids.to(model.device), mask.to(model.device)
        images, has_image = self._images(jobs)
        with model.running(images, has_image):
            logits, cache = decoding.prefill(model.base, ids, mask)
        return logits, cache, mask, images, has_image

    def step(self) -> None:
        """Decode one token for every row, then drop the rows that finished."""
        model = self.model
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's real tokens so far: the new token's position
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with model.running(self.images, self.has_image):
            logits = decoding.decode_step(model.base, self.pending[:, None], self.mask, positions, self.cache)
        self.pending = self._advance(self.rows, logits)
        for row, position in zip(self.rows, positions[:, 0].tolist()):
            if row.finish is None and position + 2 >= model.context_length:  # the next token would not fit
                row.end("length")
        self._drop_finished()

    def fail(self, err: BaseException) -> None:
        """End every row with `err` (the batch's own work failed, not one row's part) and start afresh."""
        for row in self.rows:
            row.fail(err)
        self.clear()

    @staticmethod
    def _advance(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row picks and takes its next token from its logits (B, vocab); (B,) the tokens picked."""
        greedy = logits.argmax(dim=-1)
        picked = [row.advance(g, logits[i]) for i, (row, g) in enumerate(zip(rows, greedy.tolist()))]
        return torch.tensor(picked, device=logits.device)

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return self.clear()
        index = torch.tensor(keep, device=self.mask.device)
        decoding.select_cache_rows(self.cache, index)
        self.mask, self.pending = self.mask[index], self.pending[index]
        if self.images is not None:
            self.images, self.has_image = self.images[index], self.has_image[index]
        # Columns no row needs any more (a long prompt that left) go too.
        unused = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if unused:
            decoding.crop_cache_left(self.cache, unused)
            self.mask = self.mask[:, unused:]

    def _images(self, jobs: list[Job]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.model.multimodal:
            return None, None
        dim = self.model.image_encoder.clip_dim
        features = torch.stack([job.image if job.image is not None else torch.zeros(dim) for job in jobs])
        has_image = torch.tensor([job.image is not None for job in jobs])
        return features.to(self.model.device), has_image.to(self.model.device)


def check_batchable(models: dict[str, LlamaAdapterModel]) -> None:
    """Refuse the methods whose virtual tokens come before the whole sequence: rows here are the prompt's tokens alone."""
    unbatchable = [name for name, model in models.items() if not model.method.tokens_only]
    if unbatchable:
        raise ValueError(
            f"cannot batch {', '.join(unbatchable)}: prefix, P-tuning v2 and prompt tuning put virtual tokens "
            "before every sequence; use `llama-adapter chat` or `demo` for them"
        )


class Batcher:
    """Runs the jobs of several models that share a base: the models take turns, a decode step each.

    A failure while decoding ends the jobs it concerns (one row's, or one batch's step) and the thread goes on. Should
    the thread itself ever fail, every job gets the error, `failure` says why, and `submit` refuses new jobs."""

    def __init__(self, models: dict[str, LlamaAdapterModel], max_batch: int, queue: int):
        check_batchable(models)
        self.models, self.max_batch, self.queue = models, max_batch, queue
        self.waiting: dict[str, collections.deque[Job]] = {name: collections.deque() for name in models}
        self.batches = {name: _Batch(model) for name, model in models.items()}
        self.turn = list(models)
        self.ready = threading.Condition()
        self.closed = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=WORKER_NAME, daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.ready:
            if self.failure is not None:
                raise Stopped(f"the decoding thread stopped: {type(self.failure).__name__}: {self.failure}")
            if self.closed:
                raise Stopped("the server is shutting down")
            if sum(len(jobs) for jobs in self.waiting.values()) >= self.queue:
                raise QueueFull(f"{self.queue} requests are already waiting; try again shortly")
            self.waiting[job.model].append(job)
            self.ready.notify()

    def busy(self) -> int:
        """How many jobs are decoding or waiting."""
        with self.ready:
            return sum(len(jobs) for jobs in self.waiting.values()) + sum(len(b.rows) for b in self.batches.values())

    def shut_down(self) -> None:
        """Take no more jobs, and end those under way with the finish "shutdown" at the next step."""
        with self.ready:
            self.closed = True
            self.ready.notify()

    def close(self) -> None:
        self.shut_down()
        self.thread.join()

    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as err:  # said on /health and to every job, instead of leaving them waiting
            log.critical("the decoding thread stopped: %s: %s", type(err).__name__, err, exc_info=err)
            with self.ready:
                self.failure = err
            failure = err
            self._end_all(lambda row: row.fail(failure))
            return
        self._end_all(lambda row: row.end("shutdown", cut=row.sent))

    def _turn(self) -> bool:
        """One model's turn: admit its waiting jobs or decode a step of its batch. False once closed."""
        with self.ready:
            self.ready.wait_for(lambda: self.closed or self._next_model() is not None)
            if self.closed:
                return False
            name = self._next_model()
            batch, waiting = self.batches[name], self.waiting[name]
            admitted = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(batch.rows)))]
        for job in [job for job in admitted if job.cancelled.is_set()]:  # their clients left while they waited
            Row(job, batch.model.tokenizer).end("cancelled")
        admitted = [job for job in admitted if not job.cancelled.is_set()]
        try:
            with torch.no_grad():
                if admitted:
                    batch.admit(admitted)
                elif batch.rows:
                    batch.step()
        except Exception as err:  # the batch's own work failed: its rows get the error
            log.exception("decoding a batch of %s failed", name)
            batch.fail(err)
        self.turn.append(self.turn.pop(self.turn.index(name)))  # the next model's turn
        return True

    def _end_all(self, end: Callable[[Row], None]) -> None:
        """End every job, waiting or decoding, the same way (the thread is leaving)."""
        with self.ready:
            waiting = {name: list(jobs) for name, jobs in self.waiting.items()}
            for jobs in self.waiting.values():
                jobs.clear()
        for name, batch in self.batches.items():
            for row in batch.rows + [Row(job, batch.model.tokenizer) for job in waiting[name]]:
                end(row)
            batch.clear()

    def _next_model(self) -> str | None:
        """The first model, in turn order, that has rows decoding or jobs waiting."""
        return next((n for n in self.turn if self.batches[n].rows or self.waiting[n]), None)
