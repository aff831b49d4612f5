"""LLaMA-Adapter: zero-initialised, gated adaption prompts on frozen Hugging Face LLaMA models."""

from .config import DEFAULT_BASE, SamplingConfig, VisualConfig
from .methods import AdapterConfig

__all__ = ["DEFAULT_BASE", "AdapterConfig", "LlamaAdapterModel", "SamplingConfig", "SharedBase", "VisualConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model and the shared base load torch and transformers: imported on first use, so that the command line
    # (`llama-adapter --help`, the config classes its flags are made from) starts without them.
    if name == "LlamaAdapterModel":
        from .model import LlamaAdapterModel

        return LlamaAdapterModel
    if name == "SharedBase":
        from .base.shared import SharedBase

        return SharedBase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
