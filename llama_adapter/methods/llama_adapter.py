"""LLaMA-Adapter (the paper's method): an AdaptionPrompt (adapter.py) on each of the top L attention layers."""

import dataclasses

from torch import nn

from ..adapter import AdaptionPrompt
from ..base import structure
from .configs import LlamaAdapterConfig
from .method import Method


class AdaptionPrompts(Method):
    """LLaMA-Adapter: K prompts in each of the top L attention layers, through per-head gates tanh(g), g = 0 at first.

    The only method that takes images: a CLIP feature, projected, shifts every prompt.
    """

    name = "llama-adapter"
    Config = LlamaAdapterConfig
    takes_images = True

    def __init__(self, base, config: LlamaAdapterConfig):
        model_config = base.config
        depth = model_config.num_hidden_layers
        config = dataclasses.replace(config, adapter_layers=min(config.adapter_layers, depth))  # clamped
        super().__init__(base, config)
        layers = range(depth - config.adapter_layers, depth)
        device = base.get_input_embeddings().weight.device
        self.prompts = nn.ModuleDict(
            {
                str(layer): AdaptionPrompt(
                    config.adapter_len, model_config.hidden_size, model_config.num_attention_heads
                ).to(device)
                for layer in layers
            }
        )

    def layer_prompts(self) -> dict[int, AdaptionPrompt]:
        return {int(layer): prompt for layer, prompt in self.prompts.items()}

    def placements(self):
        return {structure.attention_path(layer): prompt for layer, prompt in self.layer_prompts().items()}

    def parameters_by_name(self):
        return {
            f"layers.{layer}.{name}": p
            for layer, prompt in self.layer_prompts().items()
            for name, p in prompt.named_parameters()
        }
