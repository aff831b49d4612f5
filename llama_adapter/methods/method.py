"""`Method`: what one adapter method adds to a frozen base, and what it can do. Each method is one subclass."""

import importlib.util
from contextlib import nullcontext
from typing import ClassVar

import torch
from torch import nn

from .configs import PAPER_BASE_LR


class Method(nn.Module):
    """One adapter on a base. Its registered submodules are its trainables that the base does not hold.

    A subclass declares its `name` (the --method value), its own `Config` dataclass (configs.py), its default
    learning rate and its capabilities. It must never change the base in `__init__`: what it puts in the forward
    pass it either hands to the shared base as `placements` (run by the hooks in each call that names it) or, for a
    method that has to rewrite the base's modules (PEFT's), does in `attach` and undoes in `detach`, which the
    shared base calls under its lock.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    default_lr: ClassVar[float | None] = None  # None: LLaMA-Adapter's rule, PAPER_BASE_LR x batch / 256
    can_merge: ClassVar[bool] = False  # folds into the base's weights (`merge`), in place
    folds: ClassVar[bool] = False  # folds (part of) itself into a copy of the base (`folded_base`)
    takes_images: ClassVar[bool] = False  # a CLIP encoder's features can shift its prompts
    trains_jointly: ClassVar[bool] = False  # its image side trains apart from its text side (`image_parameters`)
    has_ranks: ClassVar[bool] = False  # answers with a chosen number of its ranks (`set_rank`)
    supports_gradient_checkpointing: ClassVar[bool] = True
    # The base sees the tokens alone, no virtual tokens before them: rows can be packed end to end (--packing), and
    # the server decodes them in its batches, a row joining or leaving at any step.
    tokens_only: ClassVar[bool] = True
    shares_base: ClassVar[bool] = True  # leaves the base's modules alone, so adapters can take turns on one base
    virtual_tokens: int = 0  # positions the base's outputs have before the input's own (prompt tuning's)
    requires: ClassVar[tuple[str, ...]] = ()  # packages it imports; each a run-time dependency of llama-adapter

    def __init__(self, base: nn.Module, config):
        for package in self.requires:  # a broken environment is told what to install, before anything is built
            if importlib.util.find_spec(package) is None:
                raise ModuleNotFoundError(f"--method {self.name} needs {package}: pip install {package}")
        super().__init__()
        self.__dict__["base"] = base  # not a submodule: the model that owns this method holds the base
        self.config = config

    @classmethod
    def learning_rate(cls, batch: int) -> float:
        """The default peak learning rate for an effective batch of `batch` rows."""
        return cls.default_lr if cls.default_lr is not None else PAPER_BASE_LR * batch / 256

    # ------------------------------------------------------------------------------------------------------
    # On the base

    def attach(self) -> None:
        """Change the base's modules, if this method has to; called once, under the shared base's lock."""

    def detach(self) -> None:
        """Undo `attach`: the base's modules as they were."""

    def placements(self) -> dict[str, nn.Module]:
        """The modules the base runs in a call of this adapter, by decoder path (see base/routing.hook_module)."""
        return {}

    def disabled(self):
        """A context in which the base runs without this adapter's changes to its modules (see `attach`)."""
        return nullcontext()

    # ------------------------------------------------------------------------------------------------------
    # What trains and what is saved

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by the names they are saved under."""
        raise NotImplementedError

    def peft_files(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """PEFT's config and tensors of this adapter, saved beside ours for `PeftModel.from_pretrained`; None for the
        methods PEFT lacks."""
        return None

    def layer_prompts(self) -> dict[int, nn.Module]:
        """LLaMA-Adapter's AdaptionPrompt per adapted layer; other methods have none."""
        return {}

    def image_parameters(self) -> set[str]:
        """Names (as `parameters_by_name`) of the parameters that train on image-text batches only, besides the
        visual projection, in joint training (--image-data); the others train on instruction batches only."""
        return set()

    def undecayed_parameters(self) -> set[str]:
        """Names of the parameters that weight decay leaves alone."""
        return set()

    # ------------------------------------------------------------------------------------------------------
    # Calls of the base

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments for a call of the base (or its decoder) on these tokens."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generation_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments for the base's `generate` on these (left-padded) prompts."""
        return self.inputs(input_ids, attention_mask)

    def merge(self) -> None:
        raise ValueError(f"a {self.name} adapter cannot be folded into the base weights; only LoRA can")

    def set_rank(self, rank: int) -> None:
        raise ValueError(f"a {self.name} adapter has no ranks to choose from; only DyLoRA has")

    # ------------------------------------------------------------------------------------------------------
    # Training

    def begin_training(self, total_steps: int) -> None:
        """Called once before the first optimizer step of a run of `total_steps`."""

    def begin_step(self, step: int) -> None:
        """Called before the forward passes of optimizer step `step` (from 1)."""

    def end_step(self, step: int) -> None:
        """Called after optimizer step `step`, while the gradients are still there."""

    def penalty(self) -> torch.Tensor | None:
        """A term added to the training loss (not to validation losses), if the method has one."""
        return None
