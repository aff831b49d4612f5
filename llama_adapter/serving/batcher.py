"""Continuous batching for `llama-adapter serve` and the demo: the requests for the models on one base decode
together, a token per step, whichever adapter each one asks for.

One thread owns the models. Each step it takes the next base with work (models on different base objects, such as
PEFT's, which rewrite their base, take turns), admits that base's waiting requests into its batch up to `max_batch`
(their prompts prefilled together, left-padded, their key/value cache joined to the batch's), decodes one token for
every row, and drops the rows that finished (end-of-sequence, a stop string, their token limit) or whose client went
away. The rows of each model sit side by side in the batch, so that each model's rows are one part of the call
(`routing.Part`): the base's matmuls run once for all rows, each adapter's modules on its own rows. Greedy rows pick
the argmax, as `generate` does, so a greedy answer is the one `LlamaAdapterModel.generate` gives for the same prompt.
"""

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from ..base import decoding
from ..data import batching
from ..model import LlamaAdapterModel
from . import generation
from .rows import Job, Row

WORKER_NAME = "llama-adapter-batcher"
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests wait than the server takes: the client should retry later."""


class Stopped(Exception):
    """The decoding thread has stopped (the server is closing, or the thread failed): no job is taken."""


class _Batch:
    """The rows decoding together on one base, each run by its own model, and their key/value cache."""

    def __init__(self, models: dict[str, LlamaAdapterModel]):
        self.models = models  # by name, in the order their rows sit in the batch
        self.order = {name: place for place, name in enumerate(models)}
        first = next(iter(models.values()))
        self.shared, self.tokenizer, self.context_length = first.shared, first.tokenizer, first.context_length
        self.clear()

    def clear(self) -> None:
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None  # (B, T): 1 where the cache holds a real token
        self.pending = None  # (B,): each row's last picked token, not yet in the cache
        self.images: list[torch.Tensor | None] = []  # each row's CLIP features, or None
        self._parts = None  # the call's parts for these rows, made when first needed

    def admit(self, jobs: list[Job]) -> None:
        """Prefill the jobs' prompts together, pick each one's first token, and join them to the batch. When the
        prefill fails, each job is tried alone, so that only the one at fault gets the error."""
        echoed = [job for job in jobs if job.echo]
        if echoed and len(jobs) > 1:
            # A prompt's logits at every position are its length times the vocabulary (1.6 GB for 8k tokens of
            # SmolLM2's): one echoed prompt per prefill bounds them, however many long prompts a request brings.
            for group in [[job for job in jobs if not job.echo], *([job] for job in echoed)]:
                if group:
                    self.admit(group)
            return
        jobs = sorted(jobs, key=self._place)  # each model's jobs side by side, as in the batch
        device = self.shared.model.get_input_embeddings().weight.device
        images = [job.image.to(device) if job.image is not None else None for job in jobs]
        try:
            logits, cache, mask = self._prefill(jobs, images, device)
        except Exception as err:  # noqa: BLE001 - whose fault it was is found by trying each alone
            if len(jobs) > 1:
                for job in jobs:
                    self.admit([job])
            else:
                Row(jobs[0], self.tokenizer).fail(err)
            return
        rows = [Row(job, self.tokenizer) for job in jobs]
        if logits.dim() == 3:  # some row asked for its prompt's log-probabilities
            for row, job, row_logits in zip(rows, jobs, logits):
                if job.echo:
                    row.score_prompt(row_logits[-len(job.prompt) :].float())
            logits = logits[:, -1]
        picked = self._advance(rows, logits)
        if self.rows:  # from here, a failure of the batch ends them too
            at = self._insertion(jobs)
            self.cache, self.mask = decoding.join_caches(self.cache, self.mask, cache, mask, at)
            self.pending = decoding.join_rows(self.pending, picked, at)
            for index, row, image in zip(at.tolist(), rows, images):
                self.rows.insert(index, row)
                self.images.insert(index, image)
        else:
            self.rows, self.cache, self.mask, self.pending, self.images = rows, cache, mask, picked, images
        self._parts = None
        self._drop_finished()

    def _place(self, job: Job) -> int:
        return self.order[job.model]

    def _insertion(self, jobs: list[Job]) -> torch.Tensor:
        """Where the new rows of `jobs` (in batch order) go among the joined rows: after the batch's rows of their model
        and of every model before it."""
        places = [self._place(row.job) for row in self.rows]
        before = [sum(place <= self._place(job) for place in places) for job in jobs]
        return torch.tensor([count + i for i, count in enumerate(before)])

    def _prefill(self, jobs: list[Job], images: list[torch.Tensor | None], device):
        """The jobs' prompts run together, left-padded: the logits, their cache and mask."""
        ids, mask = batching.left_padded([job.prompt for job in jobs], batching.pad_id(self.tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        every = any(job.echo for job in jobs)
        with self.shared.reserved():
            with self.shared.running(generation.parts_of([self.models[job.model] for job in jobs], images)):
                logits, cache = decoding.prefill(self.shared.model, ids, mask, every_position=every)
        return logits, cache, mask

    def step(self) -> None:
        """Decode one token for every row, then drop the rows that finished."""
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's real tokens so far: the new token's position
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with self.shared.reserved():
            if self._parts is None:  # once per set of rows, not at every step: images are projected here
                self._parts = generation.parts_of([self.models[row.job.model] for row in self.rows], self.images)
            with self.shared.running(self._parts):
                logits = decoding.decode_step(
                    self.shared.model, self.pending[:, None], self.mask, positions, self.cache
                )
        self.pending = self._advance(self.rows, logits)
        for row, position in zip(self.rows, positions[:, 0].tolist()):
            if row.finish is None and position + 2 >= self.context_length:  # the next token would not fit
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
        self.images = [self.images[i] for i in keep]
        self._parts = None
        if not keep:
            return self.clear()
        index = torch.tensor(keep, device=self.mask.device)
        decoding.select_cache_rows(self.cache, index)
        self.mask, self.pending = self.mask[index], self.pending[index]
        # Columns no row needs any more (a long prompt that left) go too.
        unused = int((self.mask.cumsum(dim=1) == 0).sum(dim=1).min())
        if unused:
            decoding.crop_cache_left(self.cache, unused)
            self.mask = self.mask[:, unused:]


def check_batchable(models: dict[str, LlamaAdapterModel]) -> None:
    """Refuse the methods whose virtual tokens come before the whole sequence: rows here are the prompt's tokens alone."""
    unbatchable = [name for name, model in models.items() if not model.method.tokens_only]
    if unbatchable:
        raise ValueError(
            f"cannot batch {', '.join(unbatchable)}: prefix, P-tuning v2 and prompt tuning put virtual tokens "
            "before every sequence; use `llama-adapter chat` or `demo` for them"
        )


class Batcher:
    """Runs the jobs of several models: those on one base object in one batch, the bases taking turns, a decode step
    each.

    A failure while decoding ends the jobs it concerns (one row's, or one batch's step) and the thread goes on. Should
    the thread itself ever fail, every job gets the error, `failure` says why, and `submit` refuses new jobs."""

    def __init__(self, models: dict[str, LlamaAdapterModel], max_batch: int, queue: int):
        check_batchable(models)
        self.max_batch, self.queue = max_batch, queue
        on_base: dict[object, dict[str, LlamaAdapterModel]] = {}
        for name, model in models.items():
            on_base.setdefault(model.shared, {})[name] = model
        self.batches = [_Batch(group) for group in on_base.values()]
        self.batch_of = {name: batch for batch in self.batches for name in batch.models}
        self.waiting: dict[_Batch, collections.deque[Job]] = {batch: collections.deque() for batch in self.batches}
        self.turn = list(self.batches)
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
            self.waiting[self.batch_of[job.model]].append(job)
            self.ready.notify()

    def stream(self, model: str, prompt: list[int], sampling, image: torch.Tensor | None = None) -> Iterator[str]:
        """Submit a job and yield its text as it comes; closing the iterator early (a Stop button) ends its row at the
        next step. A row that fails raises its error here."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        job = Job(model, prompt, sampling, lambda text, finish=None, **_: pieces.put((text, finish)), image=image)
        self.submit(job)
        try:
            while True:
                text, finish = pieces.get()
                if text:
                    yield text
                if finish is not None:
                    if finish.startswith("error: ") or finish == "shutdown":
                        raise RuntimeError(f"the answer ended with {finish}")
                    return
        finally:
            job.cancelled.set()  # a no-op once finished

    def busy(self) -> int:
        """How many jobs are decoding or waiting."""
        with self.ready:
            return sum(len(jobs) for jobs in self.waiting.values()) + sum(len(b.rows) for b in self.batches)

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
        """One base's turn: admit its waiting jobs or decode a step of its batch. False once closed."""
        with self.ready:
            self.ready.wait_for(lambda: self.closed or self._next_batch() is not None)
            if self.closed:
                return False
            batch = self._next_batch()
            waiting = self.waiting[batch]
            admitted = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(batch.rows)))]
        for job in [job for job in admitted if job.cancelled.is_set()]:  # their clients left while they waited
            Row(job, batch.tokenizer).end("cancelled")
        admitted = [job for job in admitted if not job.cancelled.is_set()]
        try:
            with torch.no_grad():
                if admitted:
                    batch.admit(admitted)
                elif batch.rows:
                    batch.step()
        except Exception as err:  # the batch's own work failed: its rows get the error
            log.exception("decoding a batch of %s failed", ", ".join(batch.models))
            batch.fail(err)
        self.turn.append(self.turn.pop(self.turn.index(batch)))  # the next base's turn
        return True

    def _end_all(self, end: Callable[[Row], None]) -> None:
        """End every job, waiting or decoding, the same way (the thread is leaving)."""
        with self.ready:
            waiting = {batch: list(jobs) for batch, jobs in self.waiting.items()}
            for jobs in self.waiting.values():
                jobs.clear()
        for batch in self.batches:
            for row in batch.rows + [Row(job, batch.tokenizer) for job in waiting[batch]]:
                end(row)
            batch.clear()

    def _next_batch(self) -> _Batch | None:
        """The first base's batch, in turn order, that has rows decoding or jobs waiting."""
        return next((b for b in self.turn if b.rows or self.waiting[b]), None)
