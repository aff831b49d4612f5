"""Calls of a base that reuse its key/value cache: scoring several continuations of each of a batch of prompts, and
the server's decoding of a batch whose rows come and go (prefill, one step, and the cache surgery between)."""

import inspect
from functools import lru_cache

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer


def prefill_prompts(model: PreTrainedModel, prompts: dict):
    """Run left-padded prompts given as the model's inputs (input_ids or inputs_embeds, attention_mask over every
    position, a prefix's past_key_values included): each row's next-token log-probabilities (B, vocab) in float32,
    the key/value cache, and each row's last position (B,).

    Positions count each row's attended tokens, so a padded row runs as it would alone.
    """
    mask = prompts["attention_mask"]
    new = (prompts["input_ids"] if "input_ids" in prompts else prompts["inputs_embeds"]).shape[1]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -new:]
    out = model(**prompts, position_ids=positions, use_cache=True, logits_to_keep=1)  # the other logits go unused
    return out.logits[:, -1].float().log_softmax(-1), cache_of(out), positions[:, -1]


SHARED = -2  # a column of the tokens every continuation of a row begins with (`continuation_logprobs`)


def continuation_logprobs(model: PreTrainedModel, after: tuple, mask: torch.Tensor, tokens: list[list[list[int]]]):
    """(n,) summed log p(continuation | its prompt) of the n continuations `tokens[b]` of each prompt b, in order.

    `after`: what `prefill_prompts` returned for the prompts, whose cache this extends; `mask`: their attention mask
    (B, S). Each prompt's continuations run packed in one row after it: first the tokens they all begin with (once),
    then each one's rest, which attends to the prompt, those and itself only (a 4D mask), at the positions it would
    have alone. No cache is copied, and continuations of different lengths pad nothing but the row.
    """
    first, cache, last = after
    ids, positions, span, predictor = _packed(tokens)
    ids, positions, span, predictor = (t.to(mask.device) for t in (ids, positions, span, predictor))
    width = ids.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    own = earlier & ((span[:, :, None] == span[:, None, :]) | (span[:, None, :] == SHARED))
    sees = torch.cat([mask.bool()[:, None, :].expand(-1, width, -1), own], 2)
    dtype = model.get_input_embeddings().weight.dtype
    blocked = torch.zeros(sees.shape, dtype=dtype, device=mask.device).masked_fill(~sees, torch.finfo(dtype).min)
    out = model(
        input_ids=ids, attention_mask=blocked[:, None], position_ids=last[:, None] + 1 + positions,
        **with_cache(model, cache),
    )  # fmt: skip
    logits = out.logits.float()
    # Each column's token under the logits that predict it (the prompt's last ones for a first token): its
    # log-softmax at that token only, the rest of the vocabulary being one logsumexp.
    rows, at = torch.arange(len(tokens), device=mask.device)[:, None], predictor.clamp(min=0)
    picked = logits[rows, at, ids] - logits.logsumexp(-1)[rows, at]
    logprob = torch.where(predictor < 0, first[rows, ids], picked)
    counts = [len(row) for row in tokens]
    offsets = torch.tensor([0] + counts[:-1], device=mask.device).cumsum(0)
    own_rest = span >= 0
    scores = torch.zeros(sum(counts), device=mask.device)
    scores.index_add_(0, (offsets[:, None] + span)[own_rest], logprob[own_rest])
    shared = torch.where(span == SHARED, logprob, 0.0).sum(1)
    return scores + shared.repeat_interleave(torch.tensor(counts, device=mask.device))


def _packed(tokens: list[list[list[int]]]) -> tuple[torch.Tensor, ...]:
    """The packed rows of `continuation_logprobs` (B, W): token ids; positions after the prompt; which continuation a
    column holds (SHARED: the common beginning; -1: padding); and the column whose logits predict it (-1: the
    prompt's last)."""
    rows = []
    for row in tokens:
        common = _common_length(row)
        ids, positions, span = row[0][:common], list(range(common)), [SHARED] * common
        predictor = list(range(-1, common - 1))
        for i, continuation in enumerate(row):
            rest = continuation[common:]
            if rest:  # its first token follows the common beginning (or the prompt); each later one, the one before
                predictor += [common - 1, *range(len(ids), len(ids) + len(rest) - 1)]
            positions += range(common, common + len(rest))
            ids, span = ids + rest, span + [i] * len(rest)
        rows.append((ids, positions, span, predictor))
    width = max(len(ids) for ids, *_ in rows)
    return tuple(
        torch.tensor([row[k] + [fill] * (width - len(row[k])) for row in rows]) for k, fill in enumerate((0, 0, -1, 0))
    )


def _common_length(continuations: list[list[int]]) -> int:
    """How many tokens every one of the continuations begins with."""
    common = 0
    while all(len(t) > common and t[common] == continuations[0][common] for t in continuations):
        common += 1
    return common


def prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_position=False):
    """Run left-padded prompts (B, T): the logits (B, vocab) for each one's next token, and their key/value cache;
    with `every_position`, the logits (B, T, vocab) at every position instead."""
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
        logits_to_keep=0 if every_position else 1,
    )  # fmt: skip
    return (out.logits if every_position else out.logits[:, -1]), cache_of(out)


def decode_step(model, tokens, attention_mask, positions, cache) -> torch.Tensor:
    """Feed one token per row (B, 1) at `positions` (B, 1) onto `cache`; `attention_mask` (B, T + 1) covers the cache
    and the new token. Returns the logits (B, vocab) for each row's next token; the cache grows by one in place."""
    out = model(
        input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
        **with_cache(model, cache),
    )  # fmt: skip
    return out.logits[:, -1]


def with_cache(model: PreTrainedModel, cache) -> dict:
    """The keyword that hands a forward call its key/value cache: `cache` since transformers 5.2x, which deprecates
    the older `past_key_values` (gone in 5.40)."""
    return {_cache_keyword(type(model)): cache}


@lru_cache
def _cache_keyword(model_class: type) -> str:
    # Once per class, not at every decode step: the answer cannot change for a class.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(output):
    """The key/value cache a forward call returned, under either name (see with_cache)."""
    return output.cache if "cache" in output else output.past_key_values


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep only these rows (batch indices) of the cache, in place."""
    cache.batch_select_indices(rows)


def crop_cache_left(cache, columns: int) -> None:
    """Drop the first `columns` positions of the cache, in place: padding no row attends to any more.

    A sliding-window layer holds only the last window's keys, which may not reach back that far; it keeps those, and
    counts the columns it no longer has to answer for (its mask lines up with the batch's again).
    """
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= columns
            keep = min(layer.keys.shape[-2], layer.cumulative_length)
        else:
            keep = layer.keys.shape[-2] - columns
        start = layer.keys.shape[-2] - keep
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def join_caches(first, first_mask: torch.Tensor, second, second_mask: torch.Tensor, second_at: torch.Tensor):
    """`first` holding the rows of both (in place), all right-aligned; the attention mask (B1 + B2, T).

    `second_at` (B2,): where the second's rows go among the joined ones, in increasing order; the first's fill the
    rest in their order. Each layer's keys are left-padded to the longer of the two: a full layer's are as long as
    the mask, a sliding-window layer's as long as the window's share of it, and either way the newest key is last in
    every row.
    """
    places = _places(first_mask.shape[0], second_at)
    width = max(first_mask.shape[1], second_mask.shape[1])
    for a, b in zip(first.layers, second.layers):
        length = max(a.keys.shape[-2], b.keys.shape[-2])
        a.keys = _placed([_pad_left(a.keys, length), _pad_left(b.keys, length)], places)
        a.values = _placed([_pad_left(a.values, length), _pad_left(b.values, length)], places)
        if isinstance(a, DynamicSlidingWindowLayer):
            a.cumulative_length = width  # the columns its mask spans: the batch's
    masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (first_mask, second_mask)]
    return first, _placed(masks, places)


def join_rows(first: torch.Tensor, second: torch.Tensor, second_at: torch.Tensor) -> torch.Tensor:
    """The rows of both, the second's at `second_at` (as in `join_caches`)."""
    return _placed([first, second], _places(len(first), second_at))


def _places(first: int, second_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the rows of the first (`first` of them) and the second go when the second's go to `second_at`."""
    first_at = torch.ones(first + len(second_at), dtype=torch.bool)
    first_at[second_at] = False
    return first_at.nonzero()[:, 0], second_at.cpu()


def _placed(tensors: list[torch.Tensor], places: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The rows of `tensors` in one tensor, each tensor's rows at its `places`: one copy, as a concatenation is."""
    out = tensors[0].new_empty((sum(len(p) for p in places), *tensors[0].shape[1:]))
    for tensor, rows in zip(tensors, places):
        out[rows.to(out.device)] = tensor
    return out


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, d) keys or values, zeros before them in dim 2 up to `length`."""
    return torch.nn.functional.pad(tensor, (0, 0, length - tensor.shape[-2], 0))
