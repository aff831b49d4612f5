"""The adapter methods behind `--method`, one `Method` subclass each, and the registry that lists them.

    llama-adapter              LLaMA-Adapter's gated prompts in the top L attention layers (llama_adapter.py)
    llama-adapter-v2           and V2's bias, scale and norm tuning, and early fusion of images (llama_adapter_v2.py)
    series, parallel           LLM-Adapters' bottleneck adapters on every decoder layer's MLP (bottleneck.py)
    lora, adalora              PEFT's LoRA, and AdaLoRA, whose ranks are pruned while training (peft_methods.py)
    dylora                     LoRA trained at a random rank each step, so that any rank up to r serves (dylora.py)
    prefix, ptuning-v2, prompt K virtual tokens: PEFT's prefix tuning (with its MLP), P-tuning v2, prompt tuning

Adding a method means writing its `Method` subclass (with its settings in configs.py) and listing it in SETTINGS and
`_classes`: the --method choices and flags, the saved configs, the default learning rates and what each command
refuses all come from here.

The classes import torch, and the flags of every command are built from AdapterConfig: so SETTINGS names each
method's settings, AdapterConfig is made from those alone, and the classes are imported when first asked for
(`get`, `REGISTRY`, `METHODS`): `llama-adapter --help` needs no torch.
"""

import dataclasses
import functools
import typing
from typing import TYPE_CHECKING, Literal

from ..config import from_dict, option
from .configs import (
    PAPER_BASE_LR,
    AdaLoraConfig,
    BottleneckConfig,
    LlamaAdapterConfig,
    LlamaAdapterV2Config,
    LoraConfig,
    PrefixConfig,
    PromptLength,
)

if TYPE_CHECKING:
    from .method import Method

# Each --method, in the order of the choices, and its own config dataclass (the class's `Config`).
SETTINGS: dict[str, type] = {
    "llama-adapter": LlamaAdapterConfig,
    "llama-adapter-v2": LlamaAdapterV2Config,
    "series": BottleneckConfig,
    "parallel": BottleneckConfig,
    "lora": LoraConfig,
    "adalora": AdaLoraConfig,
    "dylora": LoraConfig,
    "prefix": PrefixConfig,
    "ptuning-v2": PromptLength,
    "prompt": PromptLength,
}


@functools.cache
def _classes() -> dict[str, type["Method"]]:
    """The Method subclass of each --method; refused if they and SETTINGS disagree (a method added to one alone)."""
    from .bottleneck import Parallel, Series
    from .dylora import DyLora
    from .llama_adapter import AdaptionPrompts
    from .llama_adapter_v2 import AdaptionPromptsV2
    from .peft_methods import AdaLora, Lora, Prefix, PromptTuning, PTuningV2

    methods = (
        AdaptionPrompts,
        AdaptionPromptsV2,
        Series,
        Parallel,
        Lora,
        AdaLora,
        DyLora,
        Prefix,
        PTuningV2,
        PromptTuning,
    )
    declared = {method.name: method.Config for method in methods}
    if list(declared.items()) != list(SETTINGS.items()):
        raise TypeError(f"methods.SETTINGS {SETTINGS} and the Method classes {declared} disagree")
    return {method.name: method for method in methods}


def __getattr__(name: str):
    if name == "REGISTRY":  # --method -> its Method subclass
        return _classes()
    if name == "METHODS":
        return tuple(_classes().values())
    if name == "Method":
        from .method import Method

        return Method
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> type["Method"]:
    """The method called `name`."""
    if name not in SETTINGS:
        raise ValueError(f"method must be one of {list(SETTINGS)}, got {name!r}")
    return _classes()[name]


def with_capability(capability: str) -> list[str]:
    """The names of the methods that declare `capability` (e.g. "takes_images")."""
    return [name for name, method in _classes().items() if getattr(method, capability)]


class _AdapterConfigBase:
    """What trains on the frozen base: `method` and the settings of every method, flat, as flags and saved configs
    have them; each method reads only the fields of its own config (configs.py), and `to_dict` saves only those.

    >>> AdapterConfig()                                # LLaMA-Adapter, K=10 prompts in the top L=30 layers
    >>> AdapterConfig(method="lora", lora_rank=8)
    """

    def __post_init__(self):
        get(self.method)
        for config_class in dict.fromkeys(SETTINGS.values()):
            checked = config_class(**{name: getattr(self, name) for name in _field_names(config_class)})
            for name in _field_names(config_class):  # normalised: JSON's lists become tuples
                setattr(self, name, getattr(checked, name))

    def method_config(self):
        """This method's own config: the fields it reads."""
        config_class = SETTINGS[self.method]
        return config_class(**{name: getattr(self, name) for name in _field_names(config_class)})

    def to_dict(self) -> dict:
        """The method and the fields it reads, as saved with an adapter (the others are defaults it ignores)."""
        return {"method": self.method} | dataclasses.asdict(self.method_config())

    @classmethod
    def from_saved(cls, saved: dict, where) -> "AdapterConfig":
        """The config of a saved adapter (`to_dict`'s shape); a field its method does not have is an error."""
        method = saved.get("method", "llama-adapter")
        if not isinstance(method, str) or method not in SETTINGS:
            raise ValueError(f"{where}: unknown method {method!r}; this version has {', '.join(SETTINGS)}")
        unexpected = sorted(set(saved) - {"method", *_field_names(SETTINGS[method])})
        if unexpected:
            raise ValueError(f"{where}: field(s) {', '.join(unexpected)} are not settings of a {method} adapter")
        return from_dict(cls, saved, where)

    def check_fits(self, hidden_size: int, context_length: int) -> None:
        """Refuse sizes beyond what a base of this width and context can use, before anything is allocated: a typo
        or a damaged adapter_config.json would otherwise ask for gigabytes first and fail later."""
        limits = {
            "adapter_len": (context_length, f"the base's context is {context_length} tokens"),
            "lora_rank": (hidden_size, f"a rank above the base's width, {hidden_size}, adds nothing"),
            "adalora_init_rank": (hidden_size, f"a rank above the base's width, {hidden_size}, adds nothing"),
            "bottleneck_size": (16 * hidden_size, f"16 x the base's width, {hidden_size}"),
            "prefix_hidden_size": (16 * hidden_size, f"16 x the base's width, {hidden_size}"),
        }
        for name in _field_names(SETTINGS[self.method]):
            value = getattr(self, name)
            if name in limits and value > limits[name][0]:
                raise ValueError(f"{name} must be <= {limits[name][0]} on this base ({limits[name][1]}), got {value}")


def _field_names(config_class: type) -> list[str]:
    return [field.name for field in dataclasses.fields(config_class)]


def _adapter_config_class() -> type:
    """AdapterConfig: every method's fields (each declared once, in configs.py), then `method`."""
    fields = {}
    for config_class in SETTINGS.values():
        hints = typing.get_type_hints(config_class)
        for f in dataclasses.fields(config_class):
            fields.setdefault(
                f.name, (f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
            )
    chosen = (
        "method",
        Literal[tuple(SETTINGS)],
        option("the adapter method (llama_adapter/methods/)", "llama-adapter"),
    )
    config_class = dataclasses.make_dataclass("AdapterConfig", [*fields.values(), chosen], bases=(_AdapterConfigBase,))
    config_class.__module__, config_class.__doc__ = __name__, _AdapterConfigBase.__doc__
    return config_class


AdapterConfig = _adapter_config_class()

__all__ = ["METHODS", "PAPER_BASE_LR", "REGISTRY", "SETTINGS", "AdapterConfig", "Method", "get", "with_capability"]
