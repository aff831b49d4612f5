"""One request of the server (`Job`) and its row in a decoding batch (`Row`): how its next token is picked, how its
text goes out (stop strings held back, half characters waited for), and how it ends."""

import bisect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import SamplingConfig
from . import generation, logprobs
from .logprobs import TokenLogprob

log = logging.getLogger(__name__)

SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes
TOP = range(logprobs.MAX_TOP + 1)


@dataclass
class Job:
    """One request: a prompt's tokens for a model, how to pick the answer's tokens, where its pieces go.

    `emit` is called from the batcher's thread with each new piece of text, then once with `finish` set: "stop" (end
    of sequence or a stop string), "length" (max_new_tokens or the context), "cancelled", "shutdown" or "error: ...".
    With `logprobs` set, each piece and the finish also carry `logprobs=`: a `TokenLogprob` per token whose text is in
    that piece (the finish's: the end-of-sequence token, if picked, and any not sent yet); with `echo` set too, a
    first call ("", `prompt_logprobs=` one per prompt token) comes before them. An error's finish carries none.
    A job is checked when it is made, so that a bad one fails its caller, never the batch it would join."""

    model: str
    prompt: list[int]
    sampling: SamplingConfig  # its max_new_tokens, temperature and top_p
    emit: Callable[..., None]
    seed: int | None = None
    stop: tuple[str, ...] = ()
    image: torch.Tensor | None = None  # CLIP features (clip_dim,) for a multimodal adapter
    cancelled: threading.Event = field(default_factory=threading.Event)
    echo: bool = False  # the batcher hands the row its prompt's logits (`Row.score_prompt`)
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, and its k likeliest alternatives'
    prompt_only: bool = False  # the prompt scored and no token picked (echo with max_tokens 0): ends at score_prompt

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a job's prompt needs at least one token")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or self.logprobs not in TOP):
            raise ValueError(f"logprobs must be None or an integer from 0 to {TOP.stop - 1}, got {self.logprobs!r:.40}")
        if self.prompt_only and not self.echo:
            raise ValueError("a prompt-only job needs echo: its row ends when its prompt is scored")
        if self.seed is not None and (isinstance(self.seed, bool) or self.seed not in SEEDS):
            raise ValueError(f"seed must be an integer from {SEEDS.start} to {SEEDS.stop - 1}, got {self.seed!r:.40}")


class Row:
    """A job in a batch: its tokens so far, their text, how much of it was sent, its random generator; with
    log-probabilities asked for, each token's, and where its text ends."""

    def __init__(self, job: Job, tokenizer):
        self.job, self.tokenizer = job, tokenizer
        self.tokens: list[int] = []
        self.text = ""  # the text of tokens[:read]
        self.read = 0
        self.context = 0  # tokens[context:read] are decoded again with the new ones, for the spacing between them
        self.sent = 0  # characters of the text emitted so far
        self.generator = None
        if not job.sampling.greedy:
            self.generator = torch.Generator()
            if job.seed is None:
                self.generator.seed()  # its own fresh seed: the process's random stream is not touched
            else:
                self.generator.manual_seed(job.seed)
        self.finish: str | None = None
        self.scored: list[TokenLogprob] = []  # one per token picked, the end-of-sequence token's included
        self.ends: list[int] = []  # where the text of each of tokens[:read] ends
        self.given = 0  # entries of `scored` emitted so far

    def score_prompt(self, logits: torch.Tensor) -> None:
        """Take the prompt's logits (P, vocab), logits[t] predicting prompt token t + 1: emit the prompt's
        log-probabilities if the job asks for them, and end a prompt-only row. A failure ends this row alone."""
        try:
            if self.job.logprobs is not None:
                prompt = self.job.prompt
                entries = logprobs.scored(logits[:-1], prompt[1:], self.job.logprobs)
                self.emit("", prompt_logprobs=[TokenLogprob(prompt[0], None, ()), *entries])
            if self.job.prompt_only:
                self.end("length")
        except Exception as err:  # noqa: BLE001 - one row's failure is its own
            self.fail(err)

    def advance(self, greedy: int, logits: torch.Tensor) -> int:
        """Pick this row's next token (the greedy one, or a sample from its logits) and take it; a failure ends this
        row alone, with its error. Returns the token picked (for a row that has ended already, `greedy`, unused)."""
        token = greedy
        if self.finish is not None:  # a prompt-only row, ended by score_prompt
            return token
        try:
            if self.job.cancelled.is_set():
                self.end("cancelled", cut=self.sent)
            else:
                if self.generator is not None:
                    token = _sample(logits, self.job.sampling, self.generator)
                if self.job.logprobs is not None:
                    self.scored += logprobs.scored(logits[None], [token], self.job.logprobs)
                self.take(token)
        except Exception as err:  # noqa: BLE001 - one row's failure is its own
            self.fail(err)
        return token

    def fail(self, err: BaseException) -> None:
        """End the row with `err`, unless it has ended already."""
        if self.finish is None:
            log.error("a request failed while decoding: %s: %s", type(err).__name__, err)
            self.finish = f"error: {type(err).__name__}: {err}"
            self.emit("", finish=self.finish)

    def emit(self, text: str, finish: str | None = None, **scores) -> None:
        """Hand the job's consumer a piece; a consumer that fails (its client's loop is gone) ends its row, quietly
        after the first time."""
        if self.finish == "unreachable":
            return
        try:
            self.job.emit(text, finish=finish, completion_tokens=len(self.tokens), **scores)
        except Exception:  # the consumer's failure ends its own row, nothing else
            log.exception("a request's consumer failed; its answer ends here")
            self.finish = "unreachable"

    def take(self, token: int) -> None:
        """Add a picked token: emit the text it completes, and finish the row when it should end."""
        if token == self.tokenizer.eos_token_id:
            return self.end("stop")
        self.tokens.append(token)
        checked = len(self.text)
        self.text += self.new_text()
        self.mark_ends()
        longest = max((len(s) for s in self.job.stop), default=0)
        # Only a stop string that ends in the new text can be new; the earlier text was searched already.
        start = max(0, checked - longest + 1)
        cut = min((i for i in (self.text.find(s, start) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self.end("stop", cut)
        if len(self.tokens) >= self.job.sampling.max_new_tokens:
            return self.end("length")
        safe = len(self.text) - max(longest - 1, 0)  # hold back what may be the start of a stop string
        if safe > self.sent:
            self.send(safe)

    def send(self, upto: int, finish: str | None = None) -> None:
        """Emit the text from `sent` to `upto`, with the log-probabilities of the tokens whose text ends within it."""
        text, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        if self.job.logprobs is None:
            return self.emit(text, finish)
        done = len(self.scored) if finish is not None else bisect.bisect_right(self.ends, upto)
        scored, self.given = self.scored[self.given : done], max(self.given, done)
        self.emit(text, finish, logprobs=scored)

    def mark_ends(self) -> None:
        """Note where the text of the tokens read since the last call ends (only for a job that asks for scores)."""
        if self.job.logprobs is not None:
            self.ends += [len(self.text)] * (self.read - len(self.ends))

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
        """Send what is left of the text (up to `cut`, where a stop string starts, with the log-probabilities of the
        tokens whose text starts before it), then the finish."""
        if cut is None:
            self.text += self.new_text(final=True)
            self.mark_ends()
        else:
            self.text = self.text[:cut]
            # A token whose text begins before the cut is in the answer; those after it are not. The first token's
            # text begins at 0, each later one's where the one before it ends.
            self.scored = self.scored[: (cut > 0) + bisect.bisect_left(self.ends[:-1], cut)]
        if len(self.text) > self.sent:
            self.send(len(self.text))
        self.send(len(self.text), finish=reason)
        self.finish = self.finish or reason


def _sample(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> int:
    """A top-p sample at the temperature. The logits are shifted to a maximum of 0 before they are scaled, so that
    no temperature the job accepts overflows them."""
    logits = logits.float()
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1).cpu()
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < sampling.top_p  # the smallest set whose probability reaches top_p
    # The likeliest token always stays: a top_p below float32's smallest number compares as 0, which keeps none.
    keep[0] = True
    ordered = ordered * keep
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])
