"""The models a command answers with: an adapter (a folder or a shelf name) on its base, or the base alone;
for the demo and the server, several of them sharing one base object where their methods can."""

import dataclasses
import os

from .. import methods, shelf
from ..base import loading
from ..config import (
    DEFAULT_BASE,
    PRECISIONS,
    ModelConfig,
)
from ..methods import AdapterConfig
from ..model import LlamaAdapterModel


def load_model(
    cfg: ModelConfig, adapter: str | os.PathLike | None, alongside: LlamaAdapterModel | None = None
) -> LlamaAdapterModel:
    """The model a command answers with: `adapter` (a folder or shelf name) on the configured base, or the base alone
    without one.

    `alongside`: a loaded model whose base object to share (see `LlamaAdapterModel.load`). An adapter that can be
    folded into its base's weights (LoRA) is, so it answers at the base's speed, unless those are quantised:
    folding would round the update away.
    """
    dtype = PRECISIONS[cfg.precision]
    if adapter is None:  # a fresh adapter has zero gates: exactly the base model
        config = AdapterConfig()
        if alongside is not None and alongside.shared.can_take(methods.get(config.method)):
            return LlamaAdapterModel(alongside.base, alongside.tokenizer, config)
        return LlamaAdapterModel.from_base(
            DEFAULT_BASE if cfg.base is None else cfg.base, config, dtype=dtype, quantize=cfg.quantize
        )
    model = LlamaAdapterModel.load(
        adapter, cfg.base, dtype, clip_weights=cfg.clip_weights, alongside=alongside, quantize=cfg.quantize
    )
    if cfg.dylora_rank is not None:
        if not model.method.has_ranks:
            raise ValueError(f"--dylora-rank: {adapter} is a {model.config.method} adapter, not a DyLoRA one")
        model.method.set_rank(cfg.dylora_rank)
    if model.method.can_merge and loading.quantization(model.base) == "none":
        model.method.merge()
    return model


def load_models(cfg: ModelConfig, adapters: tuple[str, ...], base_label: str) -> dict[str, LlamaAdapterModel]:
    """What the demo and the server offer, by label: the base alone (as `base_label`), each adapter given (folder or
    shelf name), then the shelf's adapters for this base, sharing one base object where their methods can.

    `--dylora-rank` and `--clip-weights` are about the adapters given: the shelf's load as they were trained.
    """
    # The shelf's adapters by their folders: a folder of the working directory named like one must not shadow it.
    shelved = {name: shelf.FOLDER / name for name in shelf.for_base(cfg.base or DEFAULT_BASE) if name not in adapters}
    as_trained = dataclasses.replace(cfg, dylora_rank=None, clip_weights=None)
    models, first = {}, None
    for label, folder in ({adapter: adapter for adapter in adapters} | shelved).items():
        models[label] = load_model(cfg if label in adapters else as_trained, folder, alongside=first)
        if first is None and models[label].method.shares_base:
            first = models[label]
    return {base_label: load_model(cfg, None, alongside=first)} | models
