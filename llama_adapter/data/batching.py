"""Examples as batches: length-grouped or packed end to end, padded (right for training, left for
generation), with each row's image features when a multimodal adapter trains."""

import bisect
import random
from collections.abc import Sequence

import torch

from ..visual import FeatureCache
from .encoding import IGNORE_INDEX, Example, Pack


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, group: int = 64) -> list[list[int]]:
    """Shuffled batches of indices whose members have similar lengths, so little compute goes to padding.

    Indices are shuffled, cut into groups of `group` batches, sorted by length inside each group and split into
    batches; the batches are then shuffled so long and short ones alternate across the epoch.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def packs(lengths: Sequence[int], max_len: int, seed: int) -> list[list[int]]:
    """Example indices grouped into packs of at most `max_len` tokens, no example split between two.

    Best-fit decreasing: longest first, each into the fullest pack it still fits, which leaves little room unused.
    Equal lengths are taken in a seeded random order, so which short rows share a pack is not the file's order.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    packed: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, pack number) of the packs not yet full, ascending
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            packed.append([i])
            free, number = max_len - lengths[i], len(packed) - 1
        else:
            free, number = room.pop(at)
            packed[number].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, number))
    return packed


def pad_id(tokenizer) -> int:
    """The token that fills padding: the tokenizer's own, else EOS (LLaMA ships none; padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, T) of token lists padded on the left, so that every row ends at column T.

    Padding by hand rather than through the tokenizer, whose padding settings are state shared by every thread.
    """
    width = max(len(tokens) for tokens in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        input_ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, width - len(tokens) :] = 1
    return input_ids, attention_mask


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(packs: list[Pack], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pack's examples end to end in one row, right-filled to the longest pack: input_ids, attention_mask (0 on
    the fill), labels and position_ids (B, T), the positions restarting at 0 where each example (and the fill)
    starts, which is how the model tells the examples apart (see `LlamaAdapterModel.loss`)."""
    width = max(sum(len(e.input_ids) for e in pack.examples) for pack in packs)
    input_ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(packs), width), dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    for row, pack in enumerate(packs):
        start = 0
        for e in pack.examples:
            n = len(e.input_ids)
            input_ids[row, start : start + n] = torch.tensor(e.input_ids)
            labels[row, start : start + n] = torch.tensor(e.labels)
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
        attention_mask[row, :start] = 1
        position_ids[row, start:] = torch.arange(width - start)  # the fill: a sequence of its own, never attended
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}


def make_batch(items: list[Example] | list[Pack], pad_id: int, cache: FeatureCache | None) -> dict[str, torch.Tensor]:
    """Padded token tensors (packed ones for packs), plus image features and a has_image mask when a multimodal
    adapter's rows have images, and for packs which of those images each position sees."""
    if not isinstance(items[0], Pack):
        batch = collate(items, pad_id)
        return batch | cache.model_inputs([example.image for example in items]) if cache else batch
    batch = collate_packed(items, pad_id)
    examples = [example for pack in items for example in pack.examples]
    images = cache.model_inputs([example.image for example in examples]) if cache else {}
    return batch | images | ({"image_index": packed_image_index(items, batch["input_ids"].shape[1])} if images else {})


def packed_image_index(packs: list[Pack], width: int) -> torch.Tensor:
    """(B, T) the number of the example (counted across all packs) at each position; the fill sees the first."""
    index = torch.zeros(len(packs), width, dtype=torch.long)
    number = 0
    for row, pack in enumerate(packs):
        start = 0
        for example in pack.examples:
            index[row, start : start + len(example.input_ids)] = number
            start, number = start + len(example.input_ids), number + 1
    return index
