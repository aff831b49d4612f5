"""Calls of a base that reuse its key/value cache: scoring several continuations of one prompt, and the
server's decoding of a batch whose rows come and go (prefill, one step, and the cache surgery between)."""

import inspect
from functools import lru_cache

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer


def continuation_logprobs(model: PreTrainedModel, prompt: dict, continuations: list[list[int]]):
    """(n,) summed log p(continuation | prompt) for n token lists, running the shared prompt only once.

    `prompt`: the model's inputs for one prompt (input_ids or inputs_embeds, attention_mask, perhaps a prefix's
    past_key_values). One image's (1, dim) features in the call serve every continuation.
    The prompt's KV cache is repeated once per continuation and the continuations run as one right-padded batch,
    so scoring the options of a multiple-choice question costs one prompt plus a few tokens per option.
    """
    prefill = model(**prompt, use_cache=True, logits_to_keep=1)  # the prompt's other logits go unused
    first = prefill.logits[0, -1].float().log_softmax(-1)  # predicts every continuation's first token
    cache = cache_of(prefill)
    cache.batch_repeat_interleave(len(continuations))
    width = max(len(tokens) for tokens in continuations)
    device = prompt["attention_mask"].device
    ids = torch.zeros(len(continuations), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(continuations):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    seen = prompt["attention_mask"].shape[1]  # the cached positions, a prefix's included
    attention = torch.cat([torch.ones(len(continuations), seen, dtype=torch.long, device=device), mask], 1)
    logits = model(input_ids=ids, attention_mask=attention, **with_cache(model, cache)).logits
    logprobs = logits.float().log_softmax(-1)
    later = logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]  # token t predicted at t - 1
    return first[ids[:, 0]] + later.sum(-1)


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
