"""`llama-adapter convert`: an official LLaMA-Adapter v1 release checkpoint (e.g.
llama_adapter_len10_layer30_release.pth) as ours, and a v1 adapter to or from Hugging Face PEFT's adaption prompt
(peft_format.py).

The official file (OpenGVLab/LLaMA-Adapter, llama/model.py) is a flat state dict of two kinds of tensors:

    adapter_query.weight      (L*K, dim)  an nn.Embedding; reshaped (L, K, dim), row block j holds the K prompts
                                          of layer n_layers - L + j, i.e. of the top L layers in order
    layers.<i>.attention.gate (1,)        the first release: one scalar per adapted layer, or
                              (1, H, 1, 1) later code: one per head

The official attention adds `gate * softmax(Q K_p^T / sqrt(d)) V_p` with the gate applied as is, while ours
scales by tanh(adapter_gate) per head (adapter.py). So our gate is atanh(official gate), the scalar form copied
to every head; an official gate outside (-1, 1) has no such value and is refused. Prompts need no change: the
Meta-to-Hugging-Face weight conversion permutes the rows of W_q and W_k alike within each head, which leaves every
query-prompt score, and the order of the heads, as they were.

The file is read with torch.load(weights_only=True), which refuses anything but tensors and plain containers,
so no code in a downloaded checkpoint ever runs. What can be checked in the file alone is checked before the
(possibly huge) base model is loaded, the fit to the base right after it, and nothing is written unless all pass.
"""

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import peft_format
from .base import structure
from .config import DEFAULT_BASE, Checked, option
from .methods import AdapterConfig
from .model import LlamaAdapterModel

PROMPT_KEY = "adapter_query.weight"
GATE_KEY = re.compile(r"layers\.(\d+)\.attention\.gate")


@dataclass
class ConvertConfig(Checked):
    """A LLaMA-Adapter v1 checkpoint to convert, the base it was trained on, and where to write the result."""

    checkpoint: str = option(
        "what to convert: an official LLaMA-Adapter v1 checkpoint, e.g. llama_adapter_len10_layer30_release.pth; "
        "with --peft import, a Hugging Face PEFT adaption-prompt folder; with --peft export, our llama-adapter "
        "adapter folder or shelf name"
    )
    out: str = option("adapter folder to write (with --peft export, one that PEFT and we both load)")
    base: str | None = option(
        "the base model the adapter was trained on: Hugging Face folder or hub name (default: the one the adapter "
        f"or PEFT's config names; for an official checkpoint, {DEFAULT_BASE})",
        None,
    )
    peft: Literal["import", "export"] | None = option(
        "convert between ours and Hugging Face PEFT's adaption prompt (docs/methods.md): import a PEFT folder, or "
        "export ours to a folder PEFT loads too; default: read an official checkpoint",
        None,
    )


def convert_checkpoint(cfg: ConvertConfig) -> str:
    """Carry out `cfg`; returns the line that says what was written."""
    if cfg.peft == "export":
        model = peft_format.export_peft(cfg.checkpoint, cfg.out, cfg.base)
        return (
            f"{cfg.checkpoint} -> {cfg.out}: PEFT's adaption prompt beside ours ({model.config.adapter_len} prompts in "
            f"each of the top {model.config.adapter_layers} layers); PeftModel.from_pretrained(base, {cfg.out!r})"
        )
    if cfg.peft == "import":
        model = peft_format.import_peft(cfg.checkpoint, cfg.out, cfg.base)
    else:
        model = convert_official(cfg)
    return (
        f"{cfg.checkpoint} -> {cfg.out}: {model.config.adapter_len} prompts in each of the top "
        f"{model.config.adapter_layers} layers, {model.num_trainable_parameters():,} parameters"
    )


def convert_official(cfg: ConvertConfig) -> LlamaAdapterModel:
    """Write the official checkpoint `cfg.checkpoint` as our adapter folder `cfg.out`; returns the model."""
    path, base = Path(cfg.checkpoint), cfg.base or DEFAULT_BASE
    prompts, gates = read_official(path)  # (L, K, dim), {layer index: our gate}
    adapted, adapter_len, _ = prompts.shape
    # bf16 halves the memory of the (possibly 7B) base; the adapter parameters stay fp32 and are saved as such.
    config = AdapterConfig(adapter_len=adapter_len, adapter_layers=adapted)
    model = LlamaAdapterModel.from_base(base, config, dtype=torch.bfloat16, device="cpu")
    heads = _check_fits_base(path, base, prompts, gates, structure.base_identity(model.base))
    with torch.no_grad():
        for prompt, idx in zip(prompts, sorted(gates), strict=True):
            model.prompts[idx].adapter_prompt.copy_(prompt)
            model.prompts[idx].adapter_gate.copy_(gates[idx].flatten().expand(heads))  # (1,) -> every head
    model.save(cfg.out)
    return model


def read_official(path: Path) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Prompts (L, K, dim) and our gates, atanh of the official ones in their shape, by layer index; fp32."""
    state = _load_tensors(path)
    extra = sorted(key for key in state if key != PROMPT_KEY and not GATE_KEY.fullmatch(key))
    if extra:
        raise ValueError(
            f"{path}: unexpected tensors {extra[:5]} ({len(extra)} in all); only LLaMA-Adapter v1 text adapters "
            f"({PROMPT_KEY} and layers.<i>.attention.gate) are supported, not V2 or multimodal checkpoints"
        )
    if PROMPT_KEY not in state:
        raise ValueError(f"{path}: no tensor {PROMPT_KEY} (the adapter prompts)")
    gates = {int(GATE_KEY.fullmatch(key)[1]): _our_gate(path, key, t) for key, t in state.items() if key != PROMPT_KEY}
    if not gates:
        raise ValueError(f"{path}: no layers.<i>.attention.gate tensors (the gates of the adapted layers)")
    rows = state[PROMPT_KEY]
    if rows.dim() != 2 or not rows.numel() or rows.shape[0] % len(gates):
        raise ValueError(
            f"{path}: {PROMPT_KEY} has shape {list(rows.shape)}, expected (L*K, dim) with L = {len(gates)} gated layers"
        )
    return rows.float().unflatten(0, (len(gates), -1)), gates


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only names each Python object it refuses as "GLOBAL <name>"; an error without one is damage.
        blocked = re.findall(r"GLOBAL (\S+)", str(err))
        if not blocked:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (not a valid pickle)") from None
        raise ValueError(
            f"{path}: refused: it holds pickled Python objects other than tensors (here {blocked[0]}), which could "
            "run code; nothing in it was executed"
        ) from None
    # A damaged file surfaces as RuntimeError, EOFError, KeyError, ... depending on where it breaks.
    except Exception as err:  # noqa: BLE001
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got a {type(state).__name__}")  # noqa: TRY004 - bad file
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            kind = type(value).__name__
            raise ValueError(f"{path}: expected a dict of tensors, but {key!r} is of type {kind}")  # noqa: TRY004
    return state


def _our_gate(path: Path, key: str, gate: torch.Tensor) -> torch.Tensor:
    """atanh of an official gate of shape (1,) or (1, H, 1, 1), so that tanh gives back the official value."""
    if not (gate.shape == (1,) or (gate.dim() == 4 and gate.shape[0] == gate.shape[2] == gate.shape[3] == 1)):
        raise ValueError(f"{path}: {key} has shape {list(gate.shape)}, expected [1] or [1, heads, 1, 1]")
    gate = gate.float()
    outside = gate[~(gate.abs() < 1)]  # NaN is outside too
    if outside.numel():
        raise ValueError(
            f"{path}: {key} has value {outside[0].item():g}; our gates are tanh(g), so only official gates "
            "strictly between -1 and 1 can be converted"
        )
    return torch.atanh(gate)


def _check_fits_base(
    path: Path, base: str, prompts: torch.Tensor, gates: dict[int, torch.Tensor], identity: dict
) -> int:
    """Refuse an adapter that was not trained on a base of this shape; returns the base's head count."""
    depth, heads = identity["num_hidden_layers"], identity["num_attention_heads"]
    if len(gates) > depth:
        raise ValueError(f"{path}: {len(gates)} adapted layers, but the base {base!r} has only {depth} layers")
    if sorted(gates) != list(range(depth - len(gates), depth)):
        raise ValueError(
            f"{path}: gates on layers {sorted(gates)}, but the top {len(gates)} layers of the base {base!r} are "
            f"{depth - len(gates)}..{depth - 1}; is it the base this adapter was trained on?"
        )
    if prompts.shape[-1] != identity["hidden_size"]:
        raise ValueError(
            f"{path}: {PROMPT_KEY} has width {prompts.shape[-1]}, the base {base!r} has hidden size "
            f"{identity['hidden_size']}"
        )
    for idx, gate in sorted(gates.items()):
        if gate.dim() == 4 and gate.shape[1] != heads:
            raise ValueError(
                f"{path}: layers.{idx}.attention.gate has {gate.shape[1]} heads, the base {base!r} has {heads}"
            )
    return heads
