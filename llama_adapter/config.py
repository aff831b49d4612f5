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
Quantization = Literal["none", "int8", "nf4"]
QUANTIZE_HELP = (
    "store the frozen base's linear weights in 8 bits (LLM.int8()) or 4 bits (NF4, as QLoRA) with bitsandbytes; "
    "the adapter keeps --precision"
)


def option(help: str, default=dataclasses.MISSING):
    """A config field with the help text of its command-line flag; no default makes the flag required."""
    return field(default=default, metadata={"help": help})


# The fields each method reads; an adapter's saved config holds these alone.
LORA_FIELDS = ("lora_alpha", "lora_dropout", "lora_targets")
METHOD_FIELDS = {
    "llama-adapter": ("adapter_len", "adapter_layers"),
    "lora": ("lora_rank", *LORA_FIELDS),
    "series": ("bottleneck_size",),
    "parallel": ("bottleneck_size",),
    "prefix": ("adapter_len", "prefix_hidden_size"),
    "ptuning-v2": ("adapter_len",),
    "prompt": ("adapter_len",),
    "adalora": ("adalora_init_rank", "adalora_target_rank", *LORA_FIELDS),
    "dylora": ("lora_rank", *LORA_FIELDS),
}
MethodName = Literal[
    "llama-adapter", "lora", "series", "parallel", "prefix", "ptuning-v2", "prompt", "adalora", "dylora"
]


@dataclass
class AdapterConfig:
    """What trains on the frozen base: the method and its shape (each method reads only its own fields).

    llama-adapter: K gated prompts in the top L layers (the paper's defaults). lora, adalora: PEFT's; dylora: LoRA
    trained at a random rank each step, written here; series and parallel: bottleneck adapters on every MLP; prefix,
    ptuning-v2, prompt: K virtual tokens (PEFT's), as keys and values in every layer through an MLP during training
    (Li & Liang), the same without the MLP (P-tuning v2), or as input embeddings (Lester et al.).
    """

    adapter_len: int = option("K: prompt vectors per adapted layer (llama-adapter), virtual tokens (prefix, ...)", 10)
    adapter_layers: int = option("L: number of top layers that get prompts (clamped to the model's depth)", 30)
    method: MethodName = option("the adapter method (methods.py)", "llama-adapter")
    lora_rank: int = option("LoRA rank r (dylora: the largest rank)", 32)
    lora_alpha: float = option("LoRA scale numerator: the update is (alpha / r) B A (also adalora, dylora)", 64.0)
    lora_dropout: float = option("dropout on LoRA's input while training (also adalora, dylora)", 0.05)
    lora_targets: tuple[str, ...] = option(
        "the projections LoRA adapts, by module name (also adalora, dylora)",
        ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    )
    bottleneck_size: int = option("series/parallel: the adapter's inner width", 256)
    prefix_hidden_size: int = option("prefix: width of the MLP that produces the prefix while training", 512)
    adalora_init_rank: int = option("adalora: every projection's rank before pruning", 12)
    adalora_target_rank: int = option("adalora: the average rank pruning leaves", 8)

    def __post_init__(self):
        if self.method not in METHOD_FIELDS:
            raise ValueError(f"method must be one of {list(METHOD_FIELDS)}, got {self.method!r}")
        positive = ("adapter_len", "adapter_layers", "lora_rank", "bottleneck_size", "prefix_hidden_size")
        for name in (*positive, "adalora_init_rank", "adalora_target_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adalora_target_rank > self.adalora_init_rank:
            raise ValueError(
                f"adalora_target_rank ({self.adalora_target_rank}) must be <= adalora_init_rank "
                f"({self.adalora_init_rank}): AdaLoRA only prunes"
            )
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one projection")
        self.lora_targets = tuple(self.lora_targets)  # JSON gives a list

    def to_dict(self) -> dict:
        """The method and the fields it reads, as saved with an adapter (the others are defaults it ignores)."""
        return {"method": self.method} | {name: getattr(self, name) for name in METHOD_FIELDS[self.method]}


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
class ModelConfig:
    """The frozen models under the adapters: the LLM, its dtype, and where CLIP weights are on this machine."""

    base: str | None = option("base model (default: the one the adapter names, else the embedded SmolLM2)", None)
    precision: Literal["fp32", "bf16"] | None = option(
        "weights and compute dtype (default: bf16 on CUDA, else fp32)", None
    )
    clip_weights: str | None = option(
        "this machine's copy of the CLIP weights a multimodal adapter was trained with", None
    )
    quantize: Quantization = option(QUANTIZE_HELP, "none")
    dylora_rank: int | None = option(
        "a DyLoRA adapter answers with its first r ranks alone (default: all); any other adapter refuses it", None
    )

    def __post_init__(self):
        if self.dylora_rank is not None and self.dylora_rank < 1:
            raise ValueError(f"dylora_rank must be >= 1, got {self.dylora_rank}")
        self.precision = self.precision or default_precision()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        check_quantize(self.quantize)


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


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one flag per field of `config_class`."""
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group(config_class.__name__, config_class.__doc__)
    for f in dataclasses.fields(config_class):
        kind = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
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
            kwargs["help"] += f" (default: {default})"
        group.add_argument(flag, **kwargs)


def from_arguments(config_class: type, args: argparse.Namespace):
    """Build `config_class` from the flags that `add_arguments` added."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def _unwrap_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
