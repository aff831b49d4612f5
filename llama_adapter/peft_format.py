"""LLaMA-Adapter v1 as Hugging Face PEFT's adaption prompt (peft/tuners/adaption_prompt), both ways.

PEFT implements the same paper with other parameters. In an adapted layer, with P the layer's K prompts:

    ours:  o_proj(attention + tanh(g_h) softmax(Q (P W_k)^T / sqrt(d)) P W_v)          g_h: a gate per head h
    PEFT:  o_proj(attention) + o_proj(gate softmax(Q (P W_k)^T / sqrt(d)) P W_v)      gate: one per layer, no tanh

Both use the queries after rotary embedding, the prompt's keys and values per key/value head repeated for the query
heads, and the top L layers. So they compute the same function where every head of a layer has the same gate (PEFT's
gate = tanh(ours)) and o_proj has no bias (PEFT would add it twice). PEFT also knows only llama and mistral models,
and takes the key/value head count to be heads // (hidden // k_proj's width), which a base whose head size is not
hidden / heads contradicts. An export refuses anything else, naming the layer or the reason; an import gives every
head atanh(PEFT's gate), which needs a gate strictly between -1 and 1.

PEFT's folder: adapter_config.json (peft_type ADAPTION_PROMPT, adapter_len K, adapter_layers L, target_modules
self_attn) and adapter_model.safetensors, which holds `base_model.model.model.layers.<i>.self_attn.adaption_prompt`
(1, K, hidden) and `....adaption_gate` (1,) for each of the top L layers.
"""

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import adapter_files, files, shelf
from .base import structure
from .config import DEFAULT_BASE
from .methods import AdapterConfig
from .model import LlamaAdapterModel

PEFT_MODEL_TYPES = ("llama", "mistral")  # peft/tuners/adaption_prompt/config.py: TRANSFORMERS_MODEL_CONFIG
_TENSOR = re.compile(r"(base_model\.model\..+)\.adaption_(prompt|gate)")  # PeftModel's wrappers, then the base's path


def export_peft(adapter: str | Path, out: str | Path, base: str | None = None) -> LlamaAdapterModel:
    """Write the llama-adapter (v1) adapter `adapter` (a folder or shelf name) to `out` with PEFT's adaption-prompt
    files beside ours, so that both libraries load `out`; `base` (default: the adapter's own) is where it runs."""
    files.check_can_write(out, "out", folder=True)
    folder = shelf.resolve(adapter)
    where = adapter_files.config_path(folder)
    saved = adapter_files.read_config(folder)
    method = AdapterConfig.from_saved(saved["adapter"], where).method
    if method != "llama-adapter":
        raise ValueError(f"{where}: a {method} adapter; only llama-adapter (v1) has PEFT's adaption-prompt form")
    if (saved.get("visual") or {}).get("clip_model"):
        raise ValueError(f"{where}: a multimodal adapter; PEFT's adaption prompt takes no images")
    model = LlamaAdapterModel.load(folder, base, dtype=torch.bfloat16, device="cpu")  # the adapter stays fp32
    check_peft_runs_as_ours(model.base, where)
    tensors = {}
    for layer, prompt in model.prompts.items():
        gates = prompt.adapter_gate.detach()
        if not torch.equal(gates, gates[:1].expand_as(gates)):
            raise ValueError(
                f"{where}: layer {layer}: its heads' gates differ (tanh from {torch.tanh(gates.min()):.4g} to "
                f"{torch.tanh(gates.max()):.4g}); PEFT's adaption prompt has one gate per layer, so only an adapter "
                "whose heads share a gate in every layer converts"
            )
        path = _peft_path(model.base, layer)
        tensors[f"{path}.adaption_prompt"] = prompt.adapter_prompt.detach()[None]
        tensors[f"{path}.adaption_gate"] = torch.tanh(gates[:1])
    adapter_files.write(out, model.adapter_state(), model.saved_config(), (_peft_config(model), tensors))
    return model


def import_peft(folder: str | Path, out: str | Path, base: str | None = None) -> LlamaAdapterModel:
    """Write PEFT's adaption-prompt folder `folder` as our llama-adapter adapter `out`, on `base` (default: the base
    PEFT's config names, else the embedded SmolLM2); returns the model."""
    folder = Path(folder)
    files.check_can_write(out, "out", folder=True)
    files.check_outside(out, "out", {"the PEFT folder": folder})  # our files there would replace PEFT's
    config_file, weights_file = folder / adapter_files.PEFT_CONFIG_NAME, folder / adapter_files.PEFT_WEIGHTS_NAME
    config = _read_peft_config(config_file)
    paths, prompts, gates = _read_peft_tensors(weights_file, config["adapter_len"], config["adapter_layers"])
    adapter = AdapterConfig(adapter_len=config["adapter_len"], adapter_layers=config["adapter_layers"])
    name = base or config.get("base_model_name_or_path") or DEFAULT_BASE
    model = LlamaAdapterModel.from_base(name, adapter, dtype=torch.bfloat16, device="cpu")
    check_peft_runs_as_ours(model.base, weights_file)
    layers = sorted(model.prompts)
    expected = [_peft_path(model.base, layer) for layer in layers]
    stray = sorted(set(paths) ^ set(expected))
    if stray:
        depth = len(structure.decoder_layers(model.base))
        raise ValueError(
            f"{weights_file}: {stray[0]}: PEFT's adaption prompts on the base {name!r} are in the top "
            f"{config['adapter_layers']} of its {depth} layers, {expected[0]} and up"
        )
    if prompts.shape[-1] != model.base.config.hidden_size:
        raise ValueError(
            f"{weights_file}: prompts of width {prompts.shape[-1]}; the base {name!r} has hidden size "
            f"{model.base.config.hidden_size}"
        )
    with torch.no_grad():
        for layer, path in zip(layers, expected, strict=True):
            model.prompts[layer].adapter_prompt.copy_(prompts[paths.index(path)])
            model.prompts[layer].adapter_gate.fill_(torch.atanh(gates[paths.index(path)]).item())
    model.save(out)
    return model


def check_peft_runs_as_ours(base, where: Path) -> None:
    """Refuse a base on which PEFT's adaption prompt computes something other than ours (see the module's text)."""
    model_type = base.config.model_type
    if model_type not in PEFT_MODEL_TYPES:
        runs_on = " and ".join(PEFT_MODEL_TYPES)
        raise ValueError(f"{where}: the base is a {model_type!r} model; PEFT's adaption prompt runs on {runs_on} only")
    if any(layer.bias is not None for layer in structure.linear_paths(base, ("o_proj",)).values()):
        raise ValueError(
            f"{where}: the base's attention output projection (o_proj) has a bias, which PEFT's adaption prompt adds "
            "a second time (it projects the prompts' output on its own)"
        )
    heads, kv_heads = base.config.num_attention_heads, base.config.num_key_value_heads
    k_proj = next(iter(structure.linear_paths(base, ("k_proj",)).values()))
    ratio = k_proj.in_features // k_proj.out_features
    assumed = heads // ratio if ratio else 0
    if assumed != kv_heads:
        raise ValueError(
            f"{where}: PEFT's adaption prompt takes the base's key/value heads to be heads // (hidden // k_proj "
            f"width) = {heads} // ({k_proj.in_features} // {k_proj.out_features}) = {assumed}, but it has {kv_heads}"
        )


def _peft_path(base, layer: int) -> str:
    """Where PEFT's state names layer `layer`'s attention: the base's path to it, under PeftModel's two wrappers."""
    decoder = structure.decoder(base)
    prefix = next(name for name, module in base.named_modules() if module is decoder)
    return f"base_model.model.{prefix}.{structure.attention_path(layer)}"


def _peft_config(model: LlamaAdapterModel) -> dict:
    """PEFT's adapter_config.json for `model`'s prompts, as `PeftModel.save_pretrained` writes it."""
    from peft import AdaptionPromptConfig  # imported here: only a conversion needs PEFT's classes

    return AdaptionPromptConfig(
        adapter_len=model.config.adapter_len,
        adapter_layers=model.config.adapter_layers,
        target_modules=structure.attention_path(0).rsplit(".", 1)[-1],
        task_type="CAUSAL_LM",
        base_model_name_or_path=model.base.name_or_path,
        inference_mode=True,
    ).to_dict()


def _read_peft_config(path: Path) -> dict:
    """PEFT's adapter_config.json of an adaption prompt, the fields an import reads checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no PEFT config (is {path.parent} a PEFT adapter folder?)")
    config = files.read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")  # noqa: TRY004 - a bad file
    if config.get("peft_type") != "ADAPTION_PROMPT":
        raise ValueError(
            f"{path}: peft_type {config.get('peft_type')!r}; only PEFT's ADAPTION_PROMPT (LLaMA-Adapter v1) converts "
            "(PEFT's LoRA, AdaLoRA, prefix and prompt tuning need no conversion: `PeftModel` loads our folders)"
        )
    for key in ("adapter_len", "adapter_layers"):
        if type(config.get(key)) is not int or config[key] < 1:
            raise ValueError(f"{path}: field {key!r} must be a positive integer, got {config.get(key)!r}")
    if config.get("target_modules") not in (None, "self_attn"):
        raise ValueError(f"{path}: target_modules {config['target_modules']!r}; ours adapts self_attn")
    return config


def _read_peft_tensors(path: Path, adapter_len: int, adapter_layers: int):
    """The attention paths (as PEFT names them), prompts (L, K, hidden) and gates (L,) of PEFT's
    adapter_model.safetensors, in fp32."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    parts = {name: _TENSOR.fullmatch(name) for name in tensors}
    unexpected = sorted(name for name, match in parts.items() if match is None)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}; an adaption prompt has adaption_prompt/gate")
    paths = sorted({match[1] for match in parts.values()})
    if len(paths) != adapter_layers:
        raise ValueError(f"{path}: {len(paths)} adapted layers, its config's adapter_layers is {adapter_layers}")
    width = None
    for where in paths:
        prompt, gate = tensors.get(f"{where}.adaption_prompt"), tensors.get(f"{where}.adaption_gate")
        width = width or (prompt.shape[-1] if prompt is not None else None)
        if prompt is None or gate is None or prompt.shape != (1, adapter_len, width) or gate.shape != (1,):
            raise ValueError(
                f"{path}: {where}: expected adaption_prompt (1, {adapter_len}, hidden) and adaption_gate (1,), got "
                f"{_shape(prompt)} and {_shape(gate)}"
            )
    prompts = torch.stack([tensors[f"{where}.adaption_prompt"][0].float() for where in paths])
    gates = torch.cat([tensors[f"{where}.adaption_gate"].float() for where in paths])
    if not (prompts.isfinite().all() and gates.isfinite().all()):
        raise ValueError(f"{path}: holds values that are not finite (NaN or infinity)")
    for where, gate in zip(paths, gates.tolist(), strict=True):
        if not abs(gate) < 1:
            raise ValueError(
                f"{path}: {where}.adaption_gate is {gate:g}; our gates are tanh(g), so only PEFT gates strictly "
                "between -1 and 1 convert"
            )
    return paths, prompts, gates


def _shape(tensor: torch.Tensor | None) -> str:
    return "nothing" if tensor is None else str(tuple(tensor.shape))
