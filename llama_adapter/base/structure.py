"""Where things are in a base model, and copies of it with weights folded in.

The decoder, its layers, attention and MLP modules by path (relative to the decoder), the linear layers and
norms; the model types the adapter is checked on (MODEL_TYPES); V2's biases, scales and norm shifts folded
into a new model's weights; what a checkpoint records to recognise its base."""

import torch
from torch import nn
from transformers import PreTrainedModel

# The model types tests/test_architectures.py checks: an untrained adapter is exactly the model, and the loss equals
# cross-entropy on its logits. That second check holds only where the head is a plain linear projection (no logit
# scaling or soft-capping), which `LlamaAdapterModel.loss` relies on to project only the scored positions.
MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt_oss")


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
