"""The methods Hugging Face PEFT implements: LoRA, AdaLoRA, prefix tuning, P-tuning v2 and prompt tuning.

PEFT builds each around the base (`get_peft_model`): LoRA and AdaLoRA replace the target projections with their own
layers, so their base is theirs alone; the virtual-token methods leave the base's modules as they are but keep
their prompts in a wrapper whose calls we do ourselves (`inputs`). Either way the base's modules change only in
`attach`, and `detach` puts them back. Their adapter folders hold PEFT's own files beside ours (`peft_files`), so
that `PeftModel.from_pretrained` loads them too.
"""

import copy

import torch

from .configs import AdaLoraConfig, LoraConfig, PrefixConfig, PromptLength
from .method import Method


class PeftMethod(Method):
    """A PEFT tuner around the base."""

    shares_base = False
    requires = ("peft",)

    def attach(self):
        from peft import get_peft_model  # imported here: only the PEFT methods need it

        self.__dict__["peft_model"] = get_peft_model(self.base, self.peft_config())
        # PEFT's trainable parameters, named without its wrapper prefixes and adapter name ('default'); read while
        # fresh, when exactly these require gradients.
        self.names = {_saved_name(name): p for name, p in self.peft_model.named_parameters() if p.requires_grad}

    def peft_config(self):
        raise NotImplementedError

    def parameters_by_name(self):
        return self.names

    def peft_files(self):
        """What `PeftModel.save_pretrained` would write: the config, which for AdaLoRA holds the ranks pruning left
        (`rank_pattern`, by which PEFT cuts the saved tensors and sizes its layers on loading), and the tensors, which
        for prefix tuning are its MLP's output, the prefix itself."""
        from peft.utils import get_peft_model_state_dict

        config = copy.deepcopy(self.peft_model.peft_config["default"])
        config.inference_mode = True
        config.base_model_name_or_path = self.base.name_or_path
        saved = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
        with torch.no_grad():
            return saved, get_peft_model_state_dict(self.peft_model)


class _InjectedPeftMethod(PeftMethod):
    """LoRA and AdaLoRA: PEFT's layers in place of the target projections, which `detach` puts back."""

    merged = False

    def detach(self):
        if self.merged:  # subtracted from the weights again: the base comes back up to float rounding
            self.peft_model.unmerge_adapter()
        self.peft_model.unload()

    def disabled(self):
        return self.peft_model.disable_adapter()


class Lora(_InjectedPeftMethod):
    """LoRA: W x + (alpha / r) B A x on the target projections, B zero-initialised."""

    name = "lora"
    Config = LoraConfig
    default_lr = 3e-4  # LLM-Adapters'
    can_merge = True

    def peft_config(self):
        from peft import LoraConfig as PeftLoraConfig

        config = self.config
        return PeftLoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )

    def merge(self):
        """Fold B A into the base weights: the same outputs (up to rounding) with no cost per token."""
        self.peft_model.merge_adapter()
        self.merged = True

    def merged_base(self):
        """The base with LoRA folded in and PEFT's wrappers removed, for saving; this method is spent afterwards."""
        return self.peft_model.merge_and_unload()


class AdaLora(_InjectedPeftMethod):
    """AdaLoRA (Zhang et al. 2023): W x + B diag(E) A x per projection, pruning E towards an average rank budget.

    Schedule, in shares of the run's steps: every rank trains for the first 10%, the budget then shrinks (cubically,
    PEFT's schedule) until 80%, and the ranks then stay as they are. A resumed run starts its importance averages
    afresh.
    """

    name = "adalora"
    Config = AdaLoraConfig
    # Its update B diag(E) A starts from E = 0 and small A and B, so it moves ~10x slower per unit of rate than LoRA.
    default_lr = 3e-3

    def peft_config(self):
        from peft import AdaLoraConfig as PeftAdaLoraConfig

        config = self.config
        self.schedule = PeftAdaLoraConfig(  # PEFT's rank allocator reads this same object
            init_r=config.adalora_init_rank,
            target_r=config.adalora_target_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            total_step=1,  # set from the run's length by begin_training
            task_type="CAUSAL_LM",
        )
        return self.schedule

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
                identity = torch.eye(len(gram), device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - identity))
        return self.schedule.orth_reg_weight * torch.stack(terms).mean()


class _VirtualTokenMethod(PeftMethod):
    """Prefix, P-tuning v2 and prompt tuning: PEFT keeps their prompts in its wrapper, outside the base."""

    tokens_only = False  # their virtual tokens come before the whole sequence, not before each packed row

    def attach(self):
        super().attach()
        self.prompt_encoder = self.peft_model.prompt_encoder  # registered here: the base does not hold it


class Prefix(_VirtualTokenMethod):
    """Prefix tuning (Li & Liang 2021): every attention layer also attends to K keys and values (held in a KV cache),
    made from K embeddings by a two-layer MLP, which steadies training."""

    name = "prefix"
    Config = PrefixConfig
    default_lr = 3e-3
    supports_gradient_checkpointing = False  # each recomputed layer would extend the prefix's KV cache again

    def peft_config(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            num_virtual_tokens=self.config.adapter_len,
            prefix_projection=True,
            encoder_hidden_size=self.config.prefix_hidden_size,
            task_type="CAUSAL_LM",
        )

    def inputs(self, input_ids, attention_mask):
        # What PEFT's own forward does: the prefix as a cache of K positions that every token may attend to.
        length = self.config.adapter_len
        return {
            "input_ids": input_ids,
            "attention_mask": torch.cat([_ones(attention_mask, length), attention_mask], 1),
            "past_key_values": self.peft_model.get_prompt(input_ids.shape[0]),
        }

    def generation_inputs(self, input_ids, attention_mask):
        # `generate` runs only the ids the cache has not seen: K placeholder ids stand for the cached prefix (and
        # are never embedded). PEFT's own generate leaves the prefix out under transformers 5.24.
        return self.inputs(input_ids, attention_mask) | {
            "input_ids": _after_placeholders(input_ids, self.config.adapter_len)
        }


class PTuningV2(Prefix):
    """P-tuning v2 (Liu et al. 2022): prefix tuning's deep prompts trained directly, without the MLP."""

    name = "ptuning-v2"
    Config = PromptLength
    default_lr = 3e-2  # few parameters

    def peft_config(self):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.config.adapter_len, task_type="CAUSAL_LM")


class PromptTuning(_VirtualTokenMethod):
    """Prompt tuning (Lester et al. 2021): K trained embeddings before the input's, initialised from random words."""

    name = "prompt"
    Config = PromptLength
    default_lr = 3e-2  # few parameters

    def peft_config(self):
        from peft import PromptTuningConfig

        return PromptTuningConfig(
            num_virtual_tokens=self.config.adapter_len, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM"
        )

    def __init__(self, base, config: PromptLength):
        super().__init__(base, config)
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
