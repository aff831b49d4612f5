"""Token log-probabilities: the library's own for a token sequence under an adapter, each option's after a prompt
(likelihood scoring), the same computed from a decoding row's logits, and both written in OpenAI's two shapes
(chat's `content` list, the legacy completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`).

A log-probability is log_softmax, in float32, of the model's raw logits: the distribution before any temperature or
top-p, as OpenAI reports it.
"""

import functools
from typing import NamedTuple

import torch
from tokenizers import decoders

from ..base import decoding
from ..config import check_argument
from ..data import batching, encoding
from ..model import LlamaAdapterModel

MAX_TOP = 20  # alternatives per token, at most: OpenAI's limit for chat's top_logprobs


class TokenLogprob(NamedTuple):
    """A token, its log-probability given the tokens before it, and the likeliest tokens at its place."""

    token: int
    logprob: float | None  # None for a prompt's first token, which nothing before it predicts
    top: tuple[tuple[int, float], ...]  # (token, log-probability), likeliest first


def scored(logits: torch.Tensor, tokens: torch.Tensor | list[int], top: int) -> list[TokenLogprob]:
    """Each of the N `tokens` under the logits (N, vocab) that predict it, with its `top` likeliest alternatives."""
    logprobs = logits.float().log_softmax(-1)
    tokens = torch.as_tensor(tokens, device=logprobs.device)
    picked = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(t, p, ()) for t, p in zip(tokens.tolist(), picked)]
    values, ids = logprobs.topk(top, dim=-1)
    alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, p, a) for t, p, a in zip(tokens.tolist(), picked, alternatives)]


@torch.no_grad()
def token_logprobs(
    model: LlamaAdapterModel, sequences: list[list[int]], top: int = 0, image_features: torch.Tensor | None = None
) -> list[list[TokenLogprob]]:
    """The library's own log-probability of each token of each sequence under `model` (its adapter; inside
    `model.disabled()`, the plain base), given the tokens before it, with its `top` likeliest alternatives; a
    sequence's first token has none. The sequences run together, right-padded; `image_features` (N, clip_dim): one
    image per sequence, for a multimodal adapter."""
    if not sequences or not all(sequences):
        raise ValueError("sequences must be one or more lists of at least one token")
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    logits = model(ids, mask, image_features=image_features)  # (N, T, vocab): model.base, under model.running
    return [
        [TokenLogprob(tokens[0], None, ())] + scored(logits[row, : len(tokens) - 1], ids[row, 1 : len(tokens)], top)
        for row, tokens in enumerate(sequences)
    ]


@torch.no_grad()
def options_logprobs(
    model: LlamaAdapterModel, prompts: list[str], options: list[list[str]], image_features=None, has_image=None,
    eos: bool = True,
) -> list[torch.Tensor]:  # fmt: skip
    """For each formatted prompt, the summed log-probability (n,) of each of its n option texts after it, under
    `model` (plus EOS, with `eos`: the text is all the response). The prompts run once each, together, left-padded;
    then each prompt's options, packed in one row after it (`decoding.continuation_logprobs`).

    `image_features` (B, clip_dim) and `has_image` (B,): prompt b's image, which serves its options too.
    """
    check_argument("prompts", prompts, tuple[str, ...])
    check_argument("options", options, tuple[tuple[str, ...], ...])
    if not prompts or len(options) != len(prompts) or not all(options):
        raise ValueError(
            f"options must give each of one or more prompts a list of at least one text, got {len(options)} lists "
            f"for {len(prompts)} prompts" + ("" if all(options) else ", one of them empty")
        )
    tokenizer, device = model.tokenizer, model.device
    ids, mask = batching.left_padded([tokenizer(prompt)["input_ids"] for prompt in prompts], batching.pad_id(tokenizer))
    tokens = [[encoding.response_ids(tokenizer, text)[: None if eos else -1] for text in texts] for texts in options]
    with model.running(image_features, has_image):
        inputs = model.method.inputs(ids.to(device), mask.to(device))
        after = decoding.prefill_prompts(model.base, inputs)
        scores = decoding.continuation_logprobs(model.base, after, inputs["attention_mask"], tokens)
    counts = [len(texts) for texts in options]
    return list(scores.cpu().split(counts))


@functools.cache
def written(tokenizer) -> "Written":
    """The one `Written` of a tokenizer, whose token texts it caches."""
    return Written(tokenizer)


class Written:
    """Log-probabilities as OpenAI writes them, with each token's text and bytes read from the tokenizer once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        # A byte-level BPE (GPT-2's, SmolLM2's) spells each byte as one character: a token may hold half a
        # character, which decoding it alone would show as U+FFFD. Its exact bytes are read from its spelling.
        self.byte_level = isinstance(decoder, decoders.ByteLevel)
        self.special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        self.token = functools.lru_cache(maxsize=1 << 16)(self._token)

    def _token(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes."""
        spelling = self.tokenizer.convert_ids_to_tokens(token) if self.byte_level and token not in self.special else ""
        if spelling and all(c in _BYTE_OF for c in spelling):
            spelled = bytes(_BYTE_OF[c] for c in spelling)
        else:  # not byte-level, or an entry added in plain text
            spelled = self.tokenizer.decode([token]).encode()
        return spelled.decode(errors="replace"), spelled

    def chat(self, entries: list[TokenLogprob]) -> list[dict]:
        """Chat's `logprobs.content`: per token its text, log-probability, bytes and the top alternatives."""
        return [
            self._chat_entry(e.token, e.logprob) | {"top_logprobs": [self._chat_entry(*t) for t in e.top]}
            for e in entries
        ]

    def _chat_entry(self, token: int, logprob: float) -> dict:
        text, spelled = self.token(token)
        return {"token": text, "logprob": logprob, "bytes": list(spelled)}

    def legacy(self, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The completions API's `logprobs` object, its text offsets counted from `offset`; and the offset after it.
        Each top_logprobs dict holds the top alternatives and the token itself (OpenAI's "up to logprobs + 1")."""
        tokens, tops, offsets = [], [], []
        for entry in entries:
            text = self.token(entry.token)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if entry.logprob is None:
                tops.append(None)
            else:
                top = {self.token(t)[0]: v for t, v in entry.top}
                top.setdefault(text, entry.logprob)
                tops.append(top)
        written = {
            "tokens": tokens,
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        return written, offset


def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet read backwards: the character that spells each byte -> the byte. Printable bytes
    spell themselves; the others (controls, space, ...) are shifted past 255, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_OF = _byte_of()
