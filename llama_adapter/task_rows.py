"""A training task as rows, and rows as the examples and batches a run trains on.

`--task alpaca` reads Alpaca rows as they are; `--task scienceqa` turns ScienceQA's train split (and the problems of
`--extra-train`) into Alpaca rows.
Images are checked (and encoded into the feature cache) before the first step, so a bad one stops the run, or is
left out with its row, before any work is done.
"""

import hashlib
import json
import sys
from typing import TYPE_CHECKING

import datasets
import torch

from . import data, distributed, scienceqa
from .config import ScienceQAConfig, VisualConfig
from .distributed import World
from .run_log import report_left_out, say
from .visual import FeatureCache

if TYPE_CHECKING:
    from .train import TrainConfig


def load_task_rows(
    cfg: "TrainConfig", sqa: ScienceQAConfig, visual: VisualConfig, skipped: data.BadRows | None
) -> datasets.Dataset:
    """Training rows of `cfg.task` from `cfg.data`: Alpaca rows as they are (from any source, its columns mapped by
    `cfg.columns`), or ScienceQA's train split as Alpaca rows.

    Bad Alpaca rows go into `skipped` when it is given (see `data.load_rows`).
    """
    if cfg.task == "alpaca":
        columns = data.parse_columns(cfg.columns)
        return data.load_rows(cfg.data, skipped, split=cfg.data_split, config=cfg.data_config, columns=columns)
    # A text-only adapter never opens the image files, so it needs none of them.
    missing_images = sqa.missing_images if visual.clip_model else "text-only"
    problems, missing = scienceqa.load_problems(
        cfg.data, "train", sqa.problems, sqa.splits, missing_images, config=cfg.data_config
    )
    if missing and visual.clip_model:
        print(
            f"{missing} of {len(problems)} training problems lack their image file: trained without it", file=sys.stderr
        )
    rows = scienceqa.to_rows(problems, sqa.image_context, cfg.explanation, cfg.answer_form)
    for path in cfg.extra_train:  # no lecture or solution there: answer-only targets
        rows += scienceqa.to_rows(scienceqa.load_choice_problems(path), answer_form=cfg.answer_form)
    return data.as_rows(rows)


def rows_hash(rows: datasets.Dataset) -> str:
    """The training data's content hash: a resumed run refuses data that changed since its checkpoint.

    Read a thousand rows at a time; the hash of a JSON list of the rows, as runs before tables were used kept it.
    """
    digest = hashlib.sha256(b"[")
    for start in range(0, len(rows), 1000):
        for i, row in enumerate(rows.select(range(start, min(start + 1000, len(rows))))):
            row = row if row["image"] is not None else {k: v for k, v in row.items() if k != "image"}
            digest.update(
                (", " if start + i else "").encode() + json.dumps(row, sort_keys=True, ensure_ascii=False).encode()
            )
    digest.update(b"]")
    return digest.hexdigest()


def training_examples(
    rows: datasets.Dataset, tokenizer, val_fraction: float, seed: int, max_len: int, source: str, skipped, world: World,
    cache: FeatureCache | None,
) -> tuple[data.Examples, data.Examples, int]:  # fmt: skip
    """The training and validation examples of `rows`, with the rows whose images cannot be used left out (or an
    error), and how many training rows were dropped because max_len leaves them no response token to train on (an
    error if that is all of them); reports both."""
    rows = with_usable_images(rows, cache, skipped, world, source)
    train_rows, val_rows = data.split_rows(rows, val_fraction, seed)
    with distributed.main_first(world):  # one process tokenises into the datasets cache, the others read it
        train_set, dropped = data.encode_all(tokenizer, train_rows, max_len)
        val_set, _ = data.encode_all(tokenizer, val_rows, max_len)
    if not train_set:
        raise data.DataError(
            f"{source}: no training row keeps a response token within --max-len {max_len}: nothing to train on"
        )
    report_left_out(world, skipped or [], len(rows) + len(skipped or []), dropped, max_len)
    return train_set, val_set, dropped


def with_usable_images(
    rows: datasets.Dataset, cache: FeatureCache | None, skipped: data.BadRows | None, world: World, source: str
) -> datasets.Dataset:
    """The rows whose images a multimodal adapter can use, every image encoded (and cached) before training.

    An image that is missing, unreadable, corrupt or a decompression bomb raises DataError, or with a `skipped`
    list leaves its row out. A text-only adapter reads no image, so its rows are kept as they are.
    """
    images = rows["image"]
    named = [image for image in images if image]
    if cache is None:
        if named:
            say(world, f"{len(named)} rows name an image; this text-only adapter ignores them (--clip-model uses them)")
        return rows
    with distributed.main_first(world):  # one process encodes, the others read its cache
        failed = cache.precompute(named, show_progress=world.main)
    if failed and skipped is None:
        why = next(iter(failed.values()))
        raise data.DataError(
            f"{source}: {len(failed)} image(s) cannot be used, e.g. {why}; --on-bad-row skip leaves their rows out"
        )
    if failed:
        skipped += [(f"{source}: image {path}", why.removeprefix(f"{path}: ")) for path, why in failed.items()]
    return rows.select([i for i, image in enumerate(images) if image not in failed])


def make_batch(
    items: list[data.Example] | list[data.Pack], pad_id: int, cache: FeatureCache | None
) -> dict[str, torch.Tensor]:
    """Padded token tensors (packed ones for packs), plus image features and a has_image mask when a multimodal
    adapter's rows have images, and for packs which of those images each position sees."""
    if not isinstance(items[0], data.Pack):
        batch = data.collate(items, pad_id)
        return batch | cache.model_inputs([example.image for example in items]) if cache else batch
    batch = data.collate_packed(items, pad_id)
    examples = [example for pack in items for example in pack.examples]
    images = cache.model_inputs([example.image for example in examples]) if cache else {}
    return batch | images | ({"image_index": packed_image_index(items, batch["input_ids"].shape[1])} if images else {})


def packed_image_index(packs: list[data.Pack], width: int) -> torch.Tensor:
    """(B, T) the number of the example (counted across all packs) at each position; the fill sees the first."""
    index = torch.zeros(len(packs), width, dtype=torch.long)
    number = 0
    for row, pack in enumerate(packs):
        start = 0
        for example in pack.examples:
            index[row, start : start + len(example.input_ids)] = number
            start, number = start + len(example.input_ids), number + 1
    return index
