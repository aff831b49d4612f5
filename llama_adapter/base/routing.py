"""How an adapter takes part in the forward pass of a base it never becomes part of.

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
import sys
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .structure import attention_layers, decoder, decoder_layers

_PREFIX = "llama_adapter_"
_PROMPT = "llama_adapter_prompt"  # attention kwarg: the AdaptionPrompt of the layer being called
_VISUAL = "llama_adapter_visual"  # attention kwarg: the call's projected image features, or None


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
            "run the plain base; turn it on with llama_adapter.base.routing.enable_gradient_checkpointing(model.base)"
        )


def packed_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Keyword arguments for a call of the decoder on packed rows: several whole rows laid end to end in each of the
    (B, T) sequences, `position_ids` restarting at 0 where each row starts.

    Given positions and no attention mask, transformers finds the rows from where the positions restart: eager and
    SDPA attention get a block-diagonal causal mask, flash attention its variable-length kernel (one sequence per
    row, no padding). It does so only without a KV cache, which training does not need anyway.
    """
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
