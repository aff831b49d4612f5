"""The optimizer and the learning-rate schedule: the paper's AdamW and warm-up then cosine decay."""

import math
from collections.abc import Sequence

import torch


def adamw(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, undecayed: Sequence[torch.nn.Parameter] = ()
) -> torch.optim.AdamW:
    """The paper's AdamW (betas 0.9, 0.95), fused: one kernel updates every adapter tensor, instead of a few per
    tensor, which on a GPU costs launches for each of the hundred-odd small tensors of an adapter. The `undecayed`
    parameters (V2's scales) form a second group without weight decay."""
    groups = [{"params": params}] + ([{"params": list(undecayed), "weight_decay": 0.0}] if undecayed else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=True)


def warmup_cosine(total_steps: int, warmup: float):
    """LR multiplier: linear from 0 to 1 over the warm-up share of steps, then half a cosine down to 0."""
    warmup_steps = warmup * total_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer_for(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """`adamw` over the adapter's parameters, those its method leaves undecayed (V2's scales) in a group of their own."""
    state, undecayed = model.adapter_state(), model.method.undecayed_parameters()
    decayed = [p for name, p in state.items() if name not in undecayed]
    return adamw(decayed, lr, weight_decay, undecayed=[p for name, p in state.items() if name in undecayed])
