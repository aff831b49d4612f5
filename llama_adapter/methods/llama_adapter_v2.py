"""LLaMA-Adapter V2: v1's gated prompts, plus a BiasScale on every linear layer and a NormShift on every norm
(adapter.py), and early fusion of the image into the first V adapted layers' prompts."""

import dataclasses

from torch import nn

from ..adapter import BiasScale, NormShift
from ..base import structure
from .configs import LlamaAdapterV2Config
from .llama_adapter import AdaptionPrompts


class AdaptionPromptsV2(AdaptionPrompts):
    """LLaMA-Adapter V2 (Gao et al. 2023): v1's prompts, plus y = s * (W x + b) on every linear layer and the norms'
    weights, all starting at rest; an image shifts only the first V adapted layers' prompts.

    In joint training (--image-data) those early prompts train on image-text batches (`image_parameters`), the rest
    on instructions."""

    name = "llama-adapter-v2"
    Config = LlamaAdapterV2Config
    folds = True
    trains_jointly = True

    def __init__(self, base, config: LlamaAdapterV2Config):
        super().__init__(base, config)
        self.config = dataclasses.replace(  # clamped, as L is
            self.config, visual_layers=min(config.visual_layers, self.config.adapter_layers)
        )
        early = sorted(self.layer_prompts())[: self.config.visual_layers]
        for layer, prompt in self.layer_prompts().items():
            prompt.takes_image = layer in early
        device = base.get_input_embeddings().weight.device
        linears, epsilons = structure.all_linear_paths(base), structure.norm_epsilons(base)
        self.linear_paths, self.norm_paths = list(linears), list(epsilons)
        self.bias_scales = nn.ModuleList(BiasScale(linear.out_features).to(device) for linear in linears.values())
        self.norm_shifts = nn.ModuleList(
            NormShift(base.config.hidden_size, eps).to(device) for eps in epsilons.values()
        )
        tuned = self._tuned()
        for layer, prompt in self.layer_prompts().items():  # the prompts' keys and values go through these too
            prompt.projection_tuning = tuple(tuned[path] for path in structure.key_value_paths(layer))

    def _tuned(self) -> dict[str, nn.Module]:
        return dict(zip(self.linear_paths, self.bias_scales)) | dict(zip(self.norm_paths, self.norm_shifts))

    def placements(self):
        return super().placements() | self._tuned()

    def parameters_by_name(self):
        return super().parameters_by_name() | self._tuning_parameters()

    def _tuning_parameters(self) -> dict:
        return {f"{path}.{name}": p for path, module in self._tuned().items() for name, p in module.named_parameters()}

    def tuning_parameter_names(self) -> set[str]:
        """The biases, scales and norm shifts: what `folded_base` folds (the prompts are the rest)."""
        return set(self._tuning_parameters())

    def image_parameters(self) -> set[str]:
        return {
            f"layers.{layer}.{name}"
            for layer, prompt in self.layer_prompts().items()
            if prompt.takes_image
            for name, _ in prompt.named_parameters()
        }

    def undecayed_parameters(self) -> set[str]:
        # Weight decay pulls towards zero: right for biases, shifts and prompts, whose start is zero (or harmless),
        # wrong for scales, which start at one.
        return {f"{path}.adapter_scale" for path in self.linear_paths}

    def folded_base(self):
        """A copy of the base with the biases and scales folded into its linear layers and the shifts into its
        norms: a plain model that, with this adapter's prompts alone (a v1 llama-adapter), computes what it does."""
        scales = {path: m.adapter_scale.detach() for path, m in zip(self.linear_paths, self.bias_scales)}
        biases = {path: m.adapter_bias.detach() for path, m in zip(self.linear_paths, self.bias_scales)}
        shifts = {path: m.weight_shift.detach() for path, m in zip(self.norm_paths, self.norm_shifts)}
        return structure.folded_copy(self.base, scales, biases, shifts)
