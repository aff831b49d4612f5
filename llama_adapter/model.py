"""LlamaAdapterModel: a frozen Hugging Face LLaMA with LLaMA-Adapter prompts, and its adapter-only checkpoints."""

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import hf
from .config import AdapterConfig, SamplingConfig, default_device

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


class LlamaAdapterModel(nn.Module):
    """A frozen causal LM whose top layers carry trainable adaption prompts.

    >>> model = LlamaAdapterModel.from_base()            # the embedded SmolLM2, fresh (zero-gated) adapter
    >>> model = LlamaAdapterModel.load("runs/alpaca")    # a trained adapter on the base it was trained on
    >>> model.generate("Name three primary colours.")
    """

    def __init__(self, base, tokenizer, config: AdapterConfig):
        super().__init__()
        depth = base.config.num_hidden_layers
        self.config = dataclasses.replace(config, adapter_layers=min(config.adapter_layers, depth))
        self.base = base
        self.tokenizer = tokenizer
        # Plain dict: the prompts are registered under the base's attention modules already.
        self.prompts = hf.attach_adaption_prompts(base, self.config.adapter_len, self.config.adapter_layers)

    # ------------------------------------------------------------------------------------------------------
    # Construction, saving and loading

    @classmethod
    def from_base(
        cls,
        base: str = hf.DEFAULT_BASE,
        config: AdapterConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        attn_implementation: str | None = None,
    ) -> "LlamaAdapterModel":
        """Load a base model by name or folder and attach a fresh adapter (gates at zero)."""
        model, tokenizer = hf.load_base(base, dtype, attn_implementation)
        return cls(model, tokenizer, config or AdapterConfig()).to(device or default_device())

    @classmethod
    def load(
        cls,
        adapter_dir: str | os.PathLike,
        base: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "LlamaAdapterModel":
        """Load a saved adapter onto `base` (default: the base named in its config); refuses a different base."""
        adapter_dir = Path(adapter_dir)
        saved = read_adapter_config(adapter_dir)
        model = cls.from_base(base or saved["base"]["name"], AdapterConfig(**saved["adapter"]), dtype, device)
        check_same_base(saved["base"], hf.base_identity(model.base), adapter_dir / CONFIG_NAME)
        model.load_adapter_weights(adapter_dir / WEIGHTS_NAME)
        return model

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write adapter.safetensors and adapter_config.json; each file is replaced atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.adapter_state().items()}
        _write_atomically(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config = {
            "format_version": FORMAT_VERSION,
            "adapter": dataclasses.asdict(self.config),
            "base": hf.base_identity(self.base),
            "trainable_parameters": self.num_trainable_parameters(),
        }
        _write_atomically(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
        expected = self.adapter_state()
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"{path}: missing tensors {sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}"
            )
        for name, param in expected.items():  # check every shape first: a failed load must change nothing
            if tensors[name].shape != param.shape:
                raise ValueError(
                    f"{path}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(param.shape)}"
                )
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(tensors[name])

    # ------------------------------------------------------------------------------------------------------
    # What trains and what is saved: the adapter's parameters, nothing else

    def adapter_state(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by checkpoint name, e.g. 'layers.29.adapter_gate'."""
        return {
            f"layers.{idx}.{name}": param
            for idx, prompt in self.prompts.items()
            for name, param in prompt.named_parameters()
        }

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter_state().values())

    def gates(self) -> dict[int, torch.Tensor]:
        """tanh(gate) per adapted layer and head: how much each head listens to its prompts."""
        return {idx: torch.tanh(prompt.adapter_gate.detach()).cpu() for idx, prompt in self.prompts.items()}

    # ------------------------------------------------------------------------------------------------------
    # Forward, loss, generation

    @property
    def device(self) -> torch.device:
        return self.base.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return self.base(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions whose label is not -100 (the responses)."""
        hidden = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        scored = targets != -100
        # Project only the scored positions onto the vocabulary: prompts and padding need no logits.
        logits = self.base.get_output_embeddings()(hidden[:, :-1][scored])
        return F.cross_entropy(logits.float(), targets[scored])

    def stream(self, instruction: str, input: str = "", sampling: SamplingConfig | None = None) -> Iterator[str]:
        """Yield the answer to an Alpaca-style instruction piece by piece as it is generated."""
        from .generation import stream

        return stream(self, instruction, input, sampling or SamplingConfig())

    def generate(self, instruction: str, input: str = "", sampling: SamplingConfig | None = None) -> str:
        """The whole answer to an Alpaca-style instruction."""
        return "".join(self.stream(instruction, input, sampling))


# ----------------------------------------------------------------------------------------------------------
# Checkpoint helpers


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (is {adapter_dir} an adapter folder?)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    for key in ("adapter", "base"):
        if not isinstance(saved.get(key), dict):
            raise ValueError(f"{path}: field '{key}' is missing or not an object")  # noqa: TRY004 - a bad file, not a bad call
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {saved.get('format_version')!r}, this version reads {FORMAT_VERSION}")
    return saved


def check_same_base(saved: dict, actual: dict, where: Path) -> None:
    """Refuse a base whose shape differs from the one the adapter was trained on; warn if only the name differs."""
    differences = [
        f"{key}: adapter has {saved.get(key)!r}, base has {actual[key]!r}"
        for key in actual
        if key != "name" and saved.get(key) != actual[key]
    ]
    if differences:
        raise ValueError(
            f"{where}: this adapter was trained on a different base model ({saved.get('name')!r}); "
            + "; ".join(differences)
        )
    if saved.get("name") != actual["name"]:
        warnings.warn(
            f"{where}: adapter was trained on {saved.get('name')!r}, loading onto {actual['name']!r} of the same shape"
        )


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
