"""The adapter methods that `--method` chooses: what each adds to a frozen base, and what of it trains.

    llama-adapter     LLaMA-Adapter's gated adaption prompts in the top L attention layers (adapter.py)
    series, parallel  LLM-Adapters' bottleneck adapters on every decoder layer's MLP (adapter.py)
    lora              Hugging Face PEFT's LoRA on the q, k, v, up and down projections
    adalora           PEFT's AdaLoRA: LoRA as an SVD whose ranks are pruned towards a budget while training
    dylora            LoRA trained at a random rank each step, so that any rank up to r serves (adapter.py)
    prefix            PEFT's prefix tuning: K keys and values in every attention layer, made by an MLP in training
    ptuning-v2        P-tuning v2: the same deep prompts trained directly, without the MLP
    prompt            PEFT's prompt tuning: K trained input embeddings before the prompt

A `Method` names its trainable parameters as they are saved, puts itself on the base before each call (adapters
that share one base take turns), adds what a call to the base, or to its `generate`, needs, and may act at the
start of training and around each optimizer step.
"""

import torch
from torch import nn

from . import hf
from .config import AdapterConfig


class Method(nn.Module):
    """What one adapter method adds to a base. Registered submodules: only trainables the base does not hold."""

    shares_base = True  # whether other adapters can use the same base object, taking turns
    virtual_tokens = 0  # positions the base's outputs have before the input's own (prompt tuning's)

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

    def begin_training(self, total_steps: int) -> None:
        """Called once before the first optimizer step of a run of `total_steps`."""

    def begin_step(self, step: int) -> None:
        """Called before the forward passes of optimizer step `step` (from 1)."""

    def end_step(self, step: int) -> None:
        """Called after optimizer step `step`, while the gradients are still there."""

    def penalty(self) -> torch.Tensor | None:
        """A term added to the training loss (not to validation losses), if the method has one."""
        return None


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
        self.names = {_saved_name(name): p for name, p in self.peft_model.named_parameters() if p.requires_grad}

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


class AdaLora(PeftMethod):
    """AdaLoRA (Zhang et al. 2023): W x + B diag(E) A x per projection, pruning E towards an average rank budget.

    Schedule, in shares of the run's steps: every rank trains for the first 10%, the budget then shrinks (cubically,
    PEFT's schedule) until 80%, and the ranks then stay as they are. A resumed run starts its importance averages
    afresh.
    """

    def __init__(self, base, config: AdapterConfig):
        from peft import AdaLoraConfig

        peft_config = AdaLoraConfig(
            init_r=config.adalora_init_rank,
            target_r=config.adalora_target_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            total_step=1,  # set from the run's length by begin_training
            task_type="CAUSAL_LM",
        )
        super().__init__(base, peft_config)
        self.schedule = peft_config  # PEFT's rank allocator reads this same object

    def begin_training(self, total_steps):
        self.schedule.total_step = total_steps
        self.schedule.tinit = total_steps // 10  # every rank trains
        self.schedule.tfinal = total_steps // 5  # the ranks stay as pruned

    def end_step(self, step):
        self.peft_model.base_model.update_and_allocate(step)

    def penalty(self):
        # AdaLoRA's regulariser keeping P = B and Q = A near orthogonal: mean over them of ||P^T P - I||_F, ||Q Q^T - I||_F
        terms = []
        for name, p in self.names.items():
            if name.endswith(("lora_A", "lora_B")):
                gram = p @ p.T if name.endswith("lora_A") else p.T @ p
                terms.append(
                    torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=gram.device, dtype=gram.dtype))
                )
        return self.schedule.orth_reg_weight * torch.stack(terms).mean()


class Prefix(PeftMethod):
    """Deep prompts: every attention layer also attends to K trained keys and values (held in a KV cache).

    prefix (Li & Liang 2021) produces them from K embeddings through a two-layer MLP, which steadies training;
    ptuning-v2 (Liu et al. 2022) trains them directly.
    """

    def __init__(self, base, config: AdapterConfig):
        from peft import PrefixTuningConfig

        peft_config = PrefixTuningConfig(
            num_virtual_tokens=config.adapter_len,
            prefix_projection=config.method == "prefix",
            encoder_hidden_size=config.prefix_hidden_size,
            task_type="CAUSAL_LM",
        )
        super().__init__(base, peft_config)
        self.prompt_encoder = self.peft_model.prompt_encoder  # registered here: the base does not hold it
        self.length = config.adapter_len

    def inputs(self, input_ids, attention_mask):
        # What PEFT's own forward does: the prefix as a cache of K positions that every token may attend to.
        batch = input_ids.shape[0]
        return {
            "input_ids": input_ids,
            "attention_mask": torch.cat([_ones(attention_mask, self.length), attention_mask], 1),
            "past_key_values": self.peft_model.get_prompt(batch),
        }

    def generation_inputs(self, input_ids, attention_mask):
        # `generate` runs only the ids the cache has not seen: K placeholder ids stand for the cached prefix (and
        # are never embedded). PEFT's own generate leaves the prefix out under transformers 5.24.
        return self.inputs(input_ids, attention_mask) | {"input_ids": _after_placeholders(input_ids, self.length)}


class PromptTuning(PeftMethod):
    """Prompt tuning (Lester et al. 2021): K trained embeddings before the input's, initialised from random words."""

    def __init__(self, base, config: AdapterConfig):
        from peft import PromptTuningConfig

        peft_config = PromptTuningConfig(
            num_virtual_tokens=config.adapter_len, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM"
        )
        super().__init__(base, peft_config)
        self.prompt_encoder = self.peft_model.prompt_encoder  # registered here: the base does not hold it
        self.virtual_tokens = config.adapter_len

    def inputs(self, input_ids, attention_mask):
        embeddings = self.base.get_input_embeddings()(input_ids)
        prompts = self.peft_model.get_prompt(input_ids.shape[0]).to(embeddings.dtype)
        return {
            "inputs_embeds": torch.cat([prompts, embeddings], 1),
            "attention_mask": torch.cat([_ones(attention_mask, self.virtual_tokens), attention_mask], 1),
        }

    def generation_inputs(self, input_ids, attention_mask):
        # `generate` embeds nothing itself on its first step when given embeddings; the ids only say how long the
        # prompt is, so that what it returns after them is the answer.
        inputs = self.inputs(input_ids, attention_mask)
        return inputs | {"input_ids": _after_placeholders(input_ids, self.virtual_tokens)}


class TruncatedLoras(Method):
    """DyLoRA: a TruncatedLora on each target projection; a rank b drawn for each training step, shared by all."""

    def __init__(self, base, config: AdapterConfig):
        super().__init__(base)
        self.loras = hf.attach_truncated_loras(
            base, config.lora_targets, config.lora_rank, config.lora_alpha, config.lora_dropout
        )
        self.max_rank = config.lora_rank

    def parameters_by_name(self):
        return {f"{path}.{name}": p for path, lora in self.loras.items() for name, p in lora.named_parameters()}

    def activate(self):
        hf.use_layer_adapters(self.base, loras=self.loras)

    def begin_step(self, step):
        # A generator of the step's own: a resumed run draws the ranks the uninterrupted one would have.
        rank = int(torch.randint(1, self.max_rank + 1, (), generator=torch.Generator().manual_seed(step)))
        for lora in self.loras.values():
            lora.training_rank = rank

    def set_rank(self, rank: int) -> None:
        """Answer (outside training) with the first `rank` ranks alone, 1 <= rank <= r; all r by default."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"dylora rank must be in 1..{self.max_rank} (the adapter's lora_rank), got {rank}")
        for lora in self.loras.values():
            lora.rank = rank


def _saved_name(peft_name: str) -> str:
    """A PEFT parameter's name without PEFT's wrapper prefixes and adapter name ('default')."""
    name = peft_name.removeprefix("base_model.model.model.").removeprefix("base_model.model.")
    return name.replace(".default.", ".").removesuffix(".default")


def _ones(attention_mask: torch.Tensor, count: int) -> torch.Tensor:
    """`count` attended positions per row, to go before `attention_mask`'s."""
    return torch.ones(attention_mask.shape[0], count, dtype=attention_mask.dtype, device=attention_mask.device)


def _after_placeholders(input_ids: torch.Tensor, count: int) -> torch.Tensor:
    """`input_ids` after `count` placeholder ids per row, which stand for virtual tokens and are never embedded."""
    placeholders = torch.zeros(input_ids.shape[0], count, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([placeholders, input_ids], 1)


KINDS = {
    "llama-adapter": AdaptionPrompts,
    "series": Bottlenecks,
    "parallel": Bottlenecks,
    "lora": Lora,
    "adalora": AdaLora,
    "dylora": TruncatedLoras,
    "prefix": Prefix,
    "ptuning-v2": Prefix,
    "prompt": PromptTuning,
}


def attach(base: nn.Module, config: AdapterConfig) -> Method:
    """Put a fresh adapter of `config.method` on `base`; untrained, every method but prefix is exactly the base."""
    return KINDS[config.method](base, config)


def can_share(method: str, other: Method | None) -> bool:
    """Whether an adapter of `method` can use the base that `other` is on (taking turns); None: no base to share."""
    return other is not None and KINDS[method].shares_base and other.shares_base
