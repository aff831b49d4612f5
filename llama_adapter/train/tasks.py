"""A training task as rows, and rows as the examples a run trains on.

`--task alpaca` reads Alpaca rows as they are; `--task scienceqa` turns ScienceQA's train split (and the problems of
`--extra-train`) into Alpaca rows.
Images are checked (and encoded into the feature cache) before the first step, so a bad one stops the run, or is
left out with its row, before any work is done.
"""

import hashlib
import json
import sys

import datasets

from ..config import ScienceQAConfig, VisualConfig
from ..data import encoding, reading, sources
from ..evaluation import scienceqa
from ..visual import FeatureCache
from . import distributed
from .config import TrainConfig
from .distributed import World
from .run_log import report_left_out, say


def load_task_rows(
    cfg: TrainConfig, sqa: ScienceQAConfig, visual: VisualConfig, skipped: reading.BadRows | None
) -> datasets.Dataset:
    """Training rows of `cfg.task` from `cfg.data`: Alpaca rows as they are (from any source, its columns mapped by
    `cfg.columns`), or ScienceQA's train split as Alpaca rows.

    Bad Alpaca rows go into `skipped` when it is given (see `reading.load_rows`).
    """
    if cfg.task == "alpaca":
        columns = reading.parse_columns(cfg.columns)
        return reading.load_rows(cfg.data, skipped, split=cfg.data_split, config=cfg.data_config, columns=columns)
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
    return reading.as_rows(rows)


def rows_hash(rows: datasets.Dataset) -> str:
    """The training data's content hash: a resumed run refuses data that changed since its checkpoint.

    Read a thousand rows at a time; the hash of a JSON list of the rows, as runs before tables were used kept it.
    """
    digest = hashlib.sha256(b"[")
    for start in range(0, len(rows), 1000):
        for i, row in enumerate(rows.select(range(start, min(start + 1000, len(rows))))):
            # Fields a row leaves empty are left out, as the hash of rows before those fields existed had them.
            row = {k: v for k, v in row.items() if v is not None or k not in ("image", "messages")}
            digest.update(
                (", " if start + i else "").encode() + json.dumps(row, sort_keys=True, ensure_ascii=False).encode()
            )
    digest.update(b"]")
    return digest.hexdigest()


def training_examples(
    rows: datasets.Dataset, tokenizer, val_fraction: float, seed: int, max_len: int, source: str, skipped, world: World,
    cache: FeatureCache | None, template: str,
) -> tuple[encoding.Examples, encoding.Examples, int]:  # fmt: skip
    """The training and validation examples of `rows` in `template`, with the rows whose images cannot be used left
    out (or an error), and how many training rows were dropped because max_len leaves them no response token to train
    on (an error if that is all of them); reports both."""
    rows = with_usable_images(rows, cache, skipped, world, source)
    train_rows, val_rows = reading.split_rows(rows, val_fraction, seed)
    with distributed.main_first(world):  # one process tokenises into the datasets cache, the others read it
        train_set, dropped = encoding.encode_all(tokenizer, train_rows, max_len, template)
        val_set, _ = encoding.encode_all(tokenizer, val_rows, max_len, template)
    if not train_set:
        raise sources.DataError(
            f"{source}: no training row keeps a response token within --max-len {max_len}: nothing to train on"
        )
    report_left_out(world, skipped or [], len(rows) + len(skipped or []), dropped, max_len)
    return train_set, val_set, dropped


def with_usable_images(
    rows: datasets.Dataset, cache: FeatureCache | None, skipped: reading.BadRows | None, world: World, source: str
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
        raise sources.DataError(
            f"{source}: {len(failed)} image(s) cannot be used, e.g. {why}; --on-bad-row skip leaves their rows out"
        )
    if failed:
        skipped += [(f"{source}: image {path}", why.removeprefix(f"{path}: ")) for path, why in failed.items()]
    return rows.select([i for i, image in enumerate(images) if image not in failed])


def is_conversational(rows: datasets.Dataset) -> bool:
    """Whether any row is a conversation rather than an Alpaca row."""
    return "messages" in rows.column_names  # (`reading` keeps the column only where a row is one)


def check_every_row_has_an_image(rows: datasets.Dataset, source: str) -> None:
    """Image-text rows without an image would train the image side on text alone."""
    missing = next((i for i, image in enumerate(rows["image"]) if not image), None)
    if missing is not None:
        raise sources.DataError(f"{source}: row {missing + 1} has no image; every --image-data row needs one")
