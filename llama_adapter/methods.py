"""The adapter methods that `--method` chooses: what each adds to a frozen base, and what of it trains.

    llama-adapter     LLaMA-Adapter's gated adaption prompts in the top L attention layers (adapter.py)
    series, parallel  LLM-Adapters' bottleneck adapters on every decoder layer's MLP (adapter.py)
    lora              Hugging Face PEFT's LoRA on the q, k, v, up and down projections
    prefix            Hugging Face PEFT's prefix tuning: K trained keys and values in every attention layer

A `Method` names its trainable parameters as they are saved, puts itself on the base before each call (adapters
that share one base take turns), and adds what a call to the base, or to its `generate`, needs.
"""

import torch
from torch import nn

from . import hf
from .config import AdapterConfig


class Method(nn.Module):
    """What one adapter method adds to a base. Registered submodules: only trainables the base does not hold."""

    shares_base = True  # whether other adapters can use the same base object, taking turns

    def __init__(self, base: nn.Module):
        super().__init__()
        self.__dict__["base"] = base  # not a submodule: the model that owns this method holds the base

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def activate(self) -> None:
        """Put this method on the base and any other adapter's off (a no-op for a base of its own)."""

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments for a call of the base (or its decoder) on these tokens."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generation_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments for the base's `generate` on these (left-padded) prompts."""
        return self.inputs(input_ids, attention_mask)

    def merge(self) -> None:
        raise ValueError(f"{type(self).__name__} cannot be folded into the base weights; only LoRA can")


class AdaptionPrompts(Method):
    """LLaMA-Adapter: an AdaptionPrompt on each of the top `adapter_layers` attention layers."""

    def __init__(self, base, config: AdapterConfig):
        super().__init__(base)
        self.prompts = hf.attach_adaption_prompts(base, config.adapter_len, config.adapter_layers)  # held by the base

    def parameters_by_name(self):
        return {f"layers.{i}.{name}": p for i, prompt in self.prompts.items() for name, p in prompt.named_parameters()}

    def activate(self):
        hf.use_layer_adapters(self.base, prompts=self.prompts)


class Bottlenecks(Method):
    """Series or Parallel bottleneck adapters, one on every decoder layer's MLP."""

    def __init__(self, base, config: AdapterConfig):
        super().__init__(base)
        self.bottlenecks = hf.attach_bottlenecks(base, config.bottleneck_size, parallel=config.method == "parallel")

    def parameters_by_name(self):
        return {
            f"layers.{i}.mlp.{name}": p
            for i, module in self.bottlenecks.items()
            for name, p in module.named_parameters()
        }

    def activate(self):
        hf.use_layer_adapters(self.base, bottlenecks=self.bottlenecks)


class PeftMethod(Method):
    """A PEFT tuner around the base. PEFT changes the base's modules in place, so the base is this adapter's alone."""

    shares_base = False

    def __init__(self, base, peft_config):
        from peft import get_peft_model  # imported here: only the PEFT methods need it

        super().__init__(base)
        self.__dict__["peft_model"] = get_peft_model(base, peft_config)
        # PEFT's trainable parameters, named without its wrapper prefixes and adapter name ('default'); read while
        # fresh, when exactly these require gradients.
        self.names = {
            name.removeprefix("base_model.model.model.").removeprefix("base_model.model.").replace(".default.", "."): p
            for name, p in self.peft_model.named_parameters()
            if p.requires_grad
        }

    def parameters_by_name(self):
        return self.names


class Lora(PeftMethod):
    """LoRA: W x + (alpha / r) B A x on the target projections, B zero-initialised."""

    def __init__(self, base, config: AdapterConfig):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )
        super().__init__(base, peft_config)

    def merge(self):
        """Fold B A into the base weights: the same outputs (up to rounding) with no cost per token."""
        self.peft_model.merge_adapter()

    def merged_base(self) -> nn.Module:
        """The base with LoRA folded in and PEFT's wrappers removed, for saving; this method is spent afterwards."""
        return self.peft_model.merge_and_unload()


class Prefix(PeftMethod):
    """Prefix tuning: every attention layer also attends to K trained keys and values (held in a KV cache)."""

    def __init__(self, base, config: AdapterConfig):
        from peft import PrefixTuningConfig

        super().__init__(base, PrefixTuningConfig(num_virtual_tokens=config.adapter_len, task_type="CAUSAL_LM"))
        self.prompt_encoder = self.peft_model.prompt_encoder  # registered here: the base does not hold it
        self.length = config.adapter_len

    def inputs(self, input_ids, attention_mask):
        # What PEFT's own forward does: the prefix as a cache of K positions that every token may attend to.
        batch = input_ids.shape[0]
        prefix_mask = torch.ones(batch, self.length, dtype=attention_mask.dtype, device=attention_mask.device)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.cat([prefix_mask, attention_mask], 1),
            "past_key_values": self.peft_model.get_prompt(batch),
        }

    def generation_inputs(self, input_ids, attention_mask):
        # `generate` runs only the ids the cache has not seen: K placeholder ids stand for the cached prefix (and
        # are never embedded). PEFT's own generate leaves the prefix out under transformers 5.24.
        inputs = self.inputs(input_ids, attention_mask)
        placeholders = torch.zeros(input_ids.shape[0], self.length, dtype=input_ids.dtype, device=input_ids.device)
        return inputs | {"input_ids": torch.cat([placeholders, input_ids], 1)}


KINDS = {
    "llama-adapter": AdaptionPrompts,
    "series": Bottlenecks,
    "parallel": Bottlenecks,
    "lora": Lora,
    "prefix": Prefix,
}


def attach(base: nn.Module, config: AdapterConfig) -> Method:
    """Put a fresh adapter of `config.method` on `base`; untrained, every method but prefix is exactly the base."""
    return KINDS[config.method](base, config)


def can_share(method: str, other: Method | None) -> bool:
    """Whether an adapter of `method` can use the base that `other` is on (taking turns); None: no base to share."""
    return other is not None and KINDS[method].shares_base and other.shares_base
