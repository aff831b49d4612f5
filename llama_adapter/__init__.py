"""LLaMA-Adapter: zero-initialised, gated adaption prompts on frozen Hugging Face LLaMA models."""

from .base.shared import SharedBase
from .config import DEFAULT_BASE, SamplingConfig, VisualConfig
from .methods import AdapterConfig
from .model import LlamaAdapterModel

__all__ = ["DEFAULT_BASE", "AdapterConfig", "LlamaAdapterModel", "SamplingConfig", "SharedBase", "VisualConfig"]
__version__ = "0.1.0"
