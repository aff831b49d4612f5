"""DyLoRA: LoRA trained at a random rank each step, so that any rank up to r serves (adapter.TruncatedLora)."""

import torch
from torch import nn

from ..adapter import TruncatedLora
from ..base import structure
from .configs import LoraConfig
from .method import Method


class DyLora(Method):
    """DyLoRA (Valipour et al. 2023): LoRA trained at a rank b drawn from 1..r each step; answers at any b <= r.

    A TruncatedLora on each target projection; the rank drawn for a step is shared by all of them.
    """

    name = "dylora"
    Config = LoraConfig
    default_lr = 3e-4  # LoRA's
    has_ranks = True

    def __init__(self, base, config: LoraConfig):
        super().__init__(base, config)
        targets = structure.linear_paths(base, config.lora_targets)
        if not targets:
            raise ValueError(f"lora_targets {list(config.lora_targets)}: no module of the base model has such a name")
        device = base.get_input_embeddings().weight.device
        self.paths = list(targets)
        self.adapters = nn.ModuleList(
            TruncatedLora(linear.in_features, linear.out_features, config.lora_rank, config.lora_alpha,
                          config.lora_dropout).to(device)
            for linear in targets.values()
        )  # fmt: skip
        self.max_rank = config.lora_rank

    @property
    def loras(self) -> dict[str, TruncatedLora]:
        return dict(zip(self.paths, self.adapters))

    def placements(self):
        return self.loras

    def parameters_by_name(self):
        return {f"{path}.{name}": p for path, lora in self.loras.items() for name, p in lora.named_parameters()}

    def begin_step(self, step):
        # A generator of the step's own: a resumed run draws the ranks the uninterrupted one would have.
        rank = int(torch.randint(1, self.max_rank + 1, (), generator=torch.Generator().manual_seed(step)))
        for lora in self.adapters:
            lora.training_rank = rank

    def set_rank(self, rank: int) -> None:
        """Answer (outside training) with the first `rank` ranks alone, 1 <= rank <= r; all r by default."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"dylora rank must be in 1..{self.max_rank} (the adapter's lora_rank), got {rank}")
        for lora in self.adapters:
            lora.rank = rank
