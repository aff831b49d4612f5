"""The order of a run's optimizer steps: each epoch's batches (length-grouped, or packs), grouped for gradient
accumulation, and in joint training the image-text steps between them; all seeded, so a resumed run takes the same
steps the uninterrupted one would have."""

import fractions
import math
import random

from ..data import batching, encoding
from .config import TrainConfig


class Plan:
    """The steps of one run. Instruction steps go through the epochs in order; in joint training (--image-data),
    image-text steps follow them so that after any n instruction steps, floor(n x --image-ratio) image-text steps
    have been taken, the image rows going round in a new order each pass."""

    def __init__(
        self, cfg: TrainConfig, train_set: encoding.Examples, image_set: encoding.Examples | None, max_len: int
    ):
        self.cfg, self.train_set, self.image_set = cfg, train_set, image_set
        self.packs = batching.packs(train_set.lengths, max_len, cfg.seed) if cfg.packing else None  # every epoch's
        steps_per_epoch = math.ceil(len(self.packs or train_set) / (cfg.batch_size * cfg.grad_accum))
        self.ratio = fractions.Fraction(repr(cfg.image_ratio)) if image_set is not None else 0  # exact: 0.3 x 10 = 3
        text_steps = cfg.epochs * steps_per_epoch
        self.total_steps = min(
            math.inf if cfg.max_steps is None else cfg.max_steps, text_steps + self.image_steps_due(text_steps)
        )
        self._image_groups: dict[int, list] = {}  # pass over the image-text rows -> its steps' batches

    def image_steps_due(self, text_steps: int) -> int:
        """Image-text steps that follow the first `text_steps` instruction steps, all together."""
        return math.floor(text_steps * self.ratio)

    def epoch(self, epoch: int) -> list[list[list[encoding.Example | encoding.Pack]]]:
        """Epoch `epoch`'s instruction steps, each its `grad_accum` batches."""
        cfg = self.cfg
        groups = step_groups(self.train_set, cfg.batch_size, cfg.grad_accum, cfg.seed + epoch, self.packs)
        return [[[fetch(self.train_set, member) for member in batch] for batch in group] for group in groups]

    def image_step_next(self, steps: int, image_steps: int) -> bool:
        """Whether an image-text step comes next, after `steps` steps of which `image_steps` were image-text ones."""
        return steps < self.total_steps and image_steps < self.image_steps_due(steps - image_steps)

    def image_step(self, image_steps: int) -> list[list[encoding.Example]]:
        """The batches of the image-text step after `image_steps` of them."""
        cfg = self.cfg
        per_pass = math.ceil(len(self.image_set) / (cfg.batch_size * cfg.grad_accum))
        turn, position = divmod(image_steps, per_pass)
        if turn not in self._image_groups:
            self._image_groups = {
                turn: step_groups(self.image_set, cfg.batch_size, cfg.grad_accum, cfg.seed - 1 - turn)
            }
        return [[self.image_set[i] for i in batch] for batch in self._image_groups[turn][position]]


def step_groups(
    examples: encoding.Examples, batch_size: int, grad_accum: int, seed: int, packs: list[list[int]] | None = None
) -> list[list[list]]:
    """One epoch: for each optimizer step, its `grad_accum` batches, of example indices (length-grouped) or, given
    `packs`, of packs (lists of example indices); seeded."""
    if packs is None:
        batches = batching.length_grouped_batches(examples.lengths, batch_size, seed)
    else:
        order = list(range(len(packs)))
        random.Random(seed).shuffle(order)
        batches = [[packs[j] for j in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    return [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]


def fetch(examples: encoding.Examples, member: int | list[int]) -> encoding.Example | encoding.Pack:
    """A batch member as step_groups names it: one example, or the pack of the examples listed."""
    return encoding.Pack([examples[i] for i in member]) if isinstance(member, list) else examples[member]
