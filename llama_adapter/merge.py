"""`llama-adapter merge`: an adapter folded into its base's weights, saved as a plain Hugging Face model.

LoRA folds whole (W + (alpha / r) B A). LLaMA-Adapter V2 folds its biases, scales and norm shifts (W' = diag(s) W,
b' = s (b0 + b), w' = w + d); its prompts stay an adapter, saved beside the merged model and loaded on it.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from . import adapter_files, files, methods, shelf
from .base import loading
from .config import PRECISIONS, BaseModelConfig, Checked, option
from .methods import AdapterConfig
from .model import LlamaAdapterModel


@dataclass
class MergeConfig(Checked):
    """Which adapter to fold into its base, and where the merged model goes."""

    adapter: str = option("a LoRA or llama-adapter-v2 adapter folder")
    out: str = option("folder for the merged model (Hugging Face format: use it as --base, or anywhere else)")


def merge(cfg: MergeConfig, model_cfg: BaseModelConfig) -> None:
    """Write the merged model to `cfg.out` (and a V2 adapter's prompts to `cfg.out`/prompts); what cannot fold, or
    would overwrite what it is made of, is refused before the base is loaded."""
    files.check_can_write(cfg.out, "--out", folder=True)
    folder = shelf.resolve(cfg.adapter)
    config = adapter_files.read_config(folder)
    check_merge_reads_nothing_it_writes(cfg.out, folder, model_cfg.base or config["base"]["name"])
    method = methods.get(AdapterConfig.from_saved(config["adapter"], adapter_files.config_path(folder)).method)
    if not (method.can_merge or method.folds):
        able = " and ".join(name for name, m in methods.REGISTRY.items() if m.can_merge or m.folds)
        raise ValueError(f"{cfg.adapter}: a {method.name} adapter; only {able} fold into the base weights")
    if model_cfg.quantize != "none":
        raise ValueError("merge folds into full-precision weights; leave out --quantize")
    model = LlamaAdapterModel.load(cfg.adapter, model_cfg.base, PRECISIONS[model_cfg.precision], device="cpu")
    if method.can_merge:
        merged = model.method.merged_base()
    else:  # V2: the biases, scales and norms fold; the prompts stay an adapter, on the merged model
        prompts = folded(model)
        merged = prompts.base
    merged.save_pretrained(cfg.out)
    model.tokenizer.save_pretrained(cfg.out)
    print(
        f"{cfg.adapter} + {model.base.name_or_path} -> {cfg.out}: the base with {method.name} folded into its weights"
    )
    if method.folds:
        merged.name_or_path = loading.base_name(cfg.out)  # what the prompts' adapter records as its base
        prompts.save(Path(cfg.out) / "prompts")
        print(f"its prompts stay an adapter: --base {cfg.out} --adapter {Path(cfg.out) / 'prompts'}")


def folded(model: LlamaAdapterModel) -> LlamaAdapterModel:
    """A V2 adapter's biases, scales and norm shifts folded into a copy of the base (`.base` of the result, a plain
    model), under its prompts alone: a llama-adapter adapter, or, multimodal, this method with its tuning at rest
    (early fusion is V2's). It computes what `model` does, up to rounding."""
    if not model.method.folds:
        raise ValueError(f"a {model.config.method} adapter has no biases and scales to fold")
    tuning = model.method.tuning_parameter_names()
    method = model.config.method if model.multimodal else "llama-adapter"
    config = dataclasses.replace(model.config, method=method)
    result = LlamaAdapterModel(model.method.folded_base(), model.tokenizer, config, model.visual_config)
    own = model.adapter_state()
    with torch.no_grad():
        for name, param in result.adapter_state().items():
            if name not in tuning:
                param.copy_(own[name])
    return result


def check_merge_reads_nothing_it_writes(out: str, adapter: Path, base: str) -> None:
    """Refuse an --out that is, or is inside, the adapter's folder or the base's (the embedded default's cache, a
    folder, the hub cache's copy): the merged model would overwrite what it is made of."""
    inputs = {"the adapter's folder": adapter}
    base_folder = loading.local_folder(loading.base_name(base))
    if base_folder is not None:
        inputs["the base model's folder"] = base_folder
    files.check_outside(out, "--out", inputs)
