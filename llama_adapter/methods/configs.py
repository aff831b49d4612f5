"""Each adapter method's own settings, as saved in its adapter_config.json and set by `--<field>` flags.

Methods that share a setting share its declaration (the LoRA family's alpha, dropout and targets; the prompt length
of the prompt methods), so every field has one default and one help text. `methods.AdapterConfig` flattens them all.
"""

from dataclasses import dataclass

from ..config import Checked, option

PAPER_BASE_LR = 9e-3  # LLaMA-Adapter's --blr: lr = blr * effective batch / 256


@dataclass
class PromptLength(Checked):
    adapter_len: int = option(
        "K: prompt vectors per adapted layer (llama-adapter), virtual tokens (prefix, ...)", 10, at_least=1
    )


@dataclass
class LlamaAdapterConfig(PromptLength):
    """LLaMA-Adapter: K gated prompts in each of the top L attention layers (the paper's K=10, L=30)."""

    adapter_layers: int = option(
        "L: number of top layers that get prompts (clamped to the model's depth)", 30, at_least=1
    )


@dataclass
class LlamaAdapterV2Config(LlamaAdapterConfig):
    """LLaMA-Adapter V2: v1's prompts, plus bias and scale on every linear layer and trainable norms; an image shifts
    the prompts of the first V adapted layers only (early fusion)."""

    visual_layers: int = option(
        "V: the first V adapted layers whose prompts take the image; the later ones stay text-only "
        "(llama-adapter-v2 with --clip-model)",
        1,
        at_least=1,
    )


@dataclass
class LoraScaling(Checked):
    lora_alpha: float = option(
        "LoRA scale numerator: the update is (alpha / r) B A (also adalora, dylora)", 64.0, above=0
    )
    lora_dropout: float = option(
        "dropout on LoRA's input while training (also adalora, dylora)", 0.05, at_least=0, below=1
    )
    lora_targets: tuple[str, ...] = option(
        "the projections LoRA adapts, by module name (also adalora, dylora)",
        ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one projection")
        self.lora_targets = tuple(self.lora_targets)  # JSON gives a list


@dataclass
class LoraConfig(LoraScaling):
    """LoRA (and DyLoRA, whose rank r is the largest it trains): W x + (alpha / r) B A x on the target projections."""

    lora_rank: int = option("LoRA rank r (dylora: the largest rank)", 32, at_least=1)


@dataclass
class AdaLoraConfig(LoraScaling):
    """AdaLoRA: LoRA as an SVD whose ranks are pruned from the initial rank towards an average target rank."""

    adalora_init_rank: int = option("adalora: every projection's rank before pruning", 12, at_least=1)
    adalora_target_rank: int = option("adalora: the average rank pruning leaves", 8, at_least=1)

    def __post_init__(self):
        super().__post_init__()
        if self.adalora_target_rank > self.adalora_init_rank:
            raise ValueError(
                f"adalora_target_rank ({self.adalora_target_rank}) must be <= adalora_init_rank "
                f"({self.adalora_init_rank}): AdaLoRA only prunes"
            )


@dataclass
class BottleneckConfig(Checked):
    """Series and Parallel bottleneck adapters on every decoder layer's MLP."""

    bottleneck_size: int = option("series/parallel: the adapter's inner width", 256, at_least=1)


@dataclass
class PrefixConfig(PromptLength):
    """Prefix tuning: K keys and values in every layer, made by an MLP of this width while training."""

    prefix_hidden_size: int = option(
        "prefix: width of the MLP that produces the prefix while training", 512, at_least=1
    )
