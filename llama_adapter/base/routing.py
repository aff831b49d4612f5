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

A call's rows need not all run the same adapter: a `Call` is a list of `Part`s, each a run of consecutive rows with
its adapter's modules (none: the plain model) and its images. Each hook runs each part's module on that part's rows
(slices, so no copy on the way in) and joins the pieces, so rows of different adapters share the base's matmuls,
which are nearly all of the work, and each row gets what its adapter alone would give it.
"""

import contextvars
import sys
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .structure import attention_layers, decoder, decoder_layers

_PREFIX = "llama_adapter_"
_PROMPTS = "llama_adapter_prompts"  # attention kwarg: each (Part, its AdaptionPrompt of the layer or None)


@dataclass(frozen=True)
class Part:
    """Rows `rows` (a slice of the batch) of a call, run with one adapter's modules by decoder path (none: the plain
    model) and the image features at the model's width that shift its prompts, (b, dim) one per row of the part or
    (b, T, dim) one per position."""

    placed: Mapping[str, nn.Module] = field(default_factory=dict)
    rows: slice = field(default_factory=lambda: slice(None))
    visual: torch.Tensor | None = None

    @cached_property  # made once per part, not at every layer of every step
    def alone(self) -> "Call":
        """A call of this part's adapter on its own: what runs on the part's rows once they are cut out."""
        return Call((Part(self.placed, visual=self.visual),))


@dataclass(frozen=True)
class Call:
    """What one call of the base runs with: its parts, in row order, covering every row of the batch (none: every row
    runs the plain model).

    `disabled`: the call is inside a `disabled()` block, where even a call that names an adapter runs the plain model.
    """

    parts: tuple[Part, ...] = ()
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

    An attention module passes it to the attention function (an AdaptionPrompt), with its part's image features; any
    other module's output goes through it: `module(module input, module output)` (a Bottleneck, a TruncatedLora, V2's
    BiasScale and NormShift).
    """
    module = decoder(model).get_submodule(path)
    if is_attention(model, path):
        return module.register_forward_pre_hook(partial(_give_prompt, path), with_kwargs=True)
    return module.register_forward_hook(partial(_add_output, path))


def _give_prompt(path, module, args, kwargs):
    parts = current_call().parts
    prompts = tuple(part.placed.get(path) for part in parts)
    if all(prompt is None for prompt in prompts):
        return None
    return args, kwargs | {_PROMPTS: tuple(zip(parts, prompts))}


def _add_output(path, module, inputs, output):
    if isinstance(output, tuple):  # gpt_oss's MLP returns its router's scores beside its output
        return (_add_output(path, module, inputs, output[0]), *output[1:])
    parts = current_call().parts
    if len(parts) == 1:  # every row runs one adapter: no cutting and joining
        adapter = parts[0].placed.get(path)
        return output if adapter is None else adapter(inputs[0], output)
    adapters = [part.placed.get(path) for part in parts]
    if all(adapter is None for adapter in adapters):
        return output
    return torch.cat([
        output[part.rows] if adapter is None else adapter(inputs[0][part.rows], output[part.rows])
        for part, adapter in zip(parts, adapters)
    ])  # fmt: skip


def _adapted_attention(own_function, module, query, key, value, attention_mask, **kwargs):
    prompts = kwargs.pop(_PROMPTS, ())
    out, weights = own_function(module, query, key, value, attention_mask, **kwargs)
    if not prompts:
        return out, weights
    scaling = kwargs.get("scaling") or module.scaling
    if len(prompts) == 1:
        [(part, prompt)] = prompts
        return out + prompt(query, module.k_proj, module.v_proj, scaling, part.visual), weights
    pieces = []
    for part, prompt in prompts:
        piece = out[part.rows]
        if prompt is not None:
            # The prompt's own projections (V2 tunes k and v) must run as this part's adapter, on the prompt's rows.
            with calling(part.alone):
                piece = piece + prompt(query[part.rows], module.k_proj, module.v_proj, scaling, part.visual)
        pieces.append(piece)
    return torch.cat(pieces), weights


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
