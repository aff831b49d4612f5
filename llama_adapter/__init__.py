"""LLaMA-Adapter: zero-initialised, gated adaption prompts on frozen Hugging Face LLaMA models."""

from .config import AdapterConfig, SamplingConfig, VisualConfig
from .hf import DEFAULT_BASE
from .model import LlamaAdapterModel

__all__ = ["DEFAULT_BASE", "AdapterConfig", "LlamaAdapterModel", "SamplingConfig", "VisualConfig"]
__version__ = "0.1.0"
