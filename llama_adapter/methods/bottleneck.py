"""LLM-Adapters' bottleneck adapters (adapter.Bottleneck) on every decoder layer's MLP: Series and Parallel."""

from torch import nn

from ..adapter import Bottleneck
from ..base import structure
from .configs import BottleneckConfig
from .method import Method


class Series(Method):
    """Series bottleneck (LLM-Adapters): h <- h + tanh(h W_down) W_up after every MLP, W_up zero-initialised."""

    name = "series"
    Config = BottleneckConfig
    default_lr = 3e-4  # LLM-Adapters'
    parallel = False

    def __init__(self, base, config: BottleneckConfig):
        super().__init__(base, config)
        device = base.get_input_embeddings().weight.device
        hidden = base.config.hidden_size
        self.bottlenecks = nn.ModuleList(
            Bottleneck(hidden, config.bottleneck_size, self.parallel).to(device)
            for _ in range(base.config.num_hidden_layers)
        )

    def placements(self):
        return {structure.mlp_path(layer): module for layer, module in enumerate(self.bottlenecks)}

    def parameters_by_name(self):
        return {
            f"layers.{layer}.mlp.{name}": p
            for layer, module in enumerate(self.bottlenecks)
            for name, p in module.named_parameters()
        }


class Parallel(Series):
    """Parallel bottleneck (LLM-Adapters): h <- h + tanh(x W_down) W_up beside every MLP, x its input."""

    name = "parallel"
    parallel = True
