"""Converting official LLaMA-Adapter v1 checkpoints: the official function is kept, bad or unsafe files are refused.

The checkpoints are written here in the official layout (adapter_query.weight (L*K, dim), one gate per adapted
layer) for a tiny random base, and the converted adapter is checked against Hugging Face PEFT's AdaptionPrompt,
which computes the official formula (gate applied without tanh). PEFT multiplies its gate into the (B, H, T, K)
attention weights, so giving it the official per-head gate (1, H, 1, 1) computes the later official code too.
"""

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from llama_adapter.adapter_files import WEIGHTS_NAME
from llama_adapter.convert import ConvertConfig, convert_official
from llama_adapter.model import LlamaAdapterModel

peft = pytest.importorskip("peft")

ADAPTER_LEN, ADAPTER_LAYERS = 5, 3  # on the tiny base: 4 layers, width 64, 4 query heads, 2 key/value heads
ADAPTED = [1, 2, 3]  # the top 3 of 4 layers
GATE_SHAPES = {"scalar-gate": (1,), "per-head-gate": (1, 4, 1, 1)}


def official_state(gate_shape=(1,), layers=ADAPTED, rows=ADAPTER_LAYERS * ADAPTER_LEN, width=64, seed=0) -> dict:
    """A checkpoint in the official layout, in the half precisions releases come in."""
    generator = torch.Generator().manual_seed(seed)
    state = {"adapter_query.weight": torch.randn(rows, width, generator=generator).half()}
    for idx in layers:
        # Distinct per layer and head, inside (-1, 1), large enough to move the logits clearly.
        gate = torch.rand(gate_shape, generator=generator) * 1.8 - 0.9
        state[f"layers.{idx}.attention.gate"] = gate.bfloat16()
    return state


def save_official(state: dict, folder: Path) -> Path:
    path = folder / "llama_adapter_len5_layer3_release.pth"
    torch.save(state, path)
    return path


def peft_reference(base, state: dict):
    """PEFT's AdaptionPrompt on `base` with the official prompts and gates, each gate in its official shape."""
    model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaptionPromptConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS, task_type="CAUSAL_LM"),
    )
    layers = {
        int(name.split(".")[-2]): module  # "...layers.<i>.self_attn"
        for name, module in model.named_modules()
        if type(module).__name__ == "AdaptedAttention"
    }  # fmt: skip
    assert sorted(layers) == ADAPTED
    prompts = state["adapter_query.weight"].float().unflatten(0, (ADAPTER_LAYERS, ADAPTER_LEN))
    with torch.no_grad():
        for prompt, idx in zip(prompts, ADAPTED, strict=True):
            layers[idx].adaption_prompt.copy_(prompt)
            layers[idx].adaption_gate = nn.Parameter(state[f"layers.{idx}.attention.gate"].float())
    return model


def batch(tokenizer):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(tokenizer), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


@pytest.mark.parametrize("gate_shape", GATE_SHAPES.values(), ids=GATE_SHAPES.keys())
def test_converted_adapter_computes_the_official_formula(make_base, tokenizer, tiny_base_dir, tmp_path, gate_shape):
    state = official_state(gate_shape)
    out = tmp_path / "converted"
    returned = convert_official(ConvertConfig(str(save_official(state, tmp_path)), str(out), str(tiny_base_dir)))

    loaded = LlamaAdapterModel.load(out, device="cpu")
    base = make_base("eager")
    ids, mask = batch(tokenizer)
    real = mask.bool()  # what either side computes at padded positions is unused
    with torch.no_grad():
        expected = peft_reference(base, state)(input_ids=ids, attention_mask=mask).logits[real]
        actual = loaded(ids, mask)[real]
        plain = base(input_ids=ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (expected - plain).abs().max() > 1e-2  # the adapter really changed the output

    saved = load_file(out / WEIGHTS_NAME)
    prompts = state["adapter_query.weight"].float().unflatten(0, (ADAPTER_LAYERS, ADAPTER_LEN))
    for prompt, idx in zip(prompts, ADAPTED, strict=True):
        official_gate = state[f"layers.{idx}.attention.gate"].float().flatten().expand(4)
        assert torch.equal(saved[f"layers.{idx}.adapter_prompt"], prompt)
        assert torch.equal(saved[f"layers.{idx}.adapter_gate"], torch.atanh(official_gate))
    assert {name: p.dtype for name, p in returned.adapter_state().items()} == {name: torch.float32 for name in saved}
    for name, param in returned.adapter_state().items():
        assert torch.equal(param, saved[name]), f"{name}: the returned model differs from what was saved"


class _RunsCode:
    """A pickle payload: unpickling it calls Path.touch, i.e. runs a function named in the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_checkpoint_holding_code_is_refused_without_running_it(tiny_base_dir, tmp_path):
    marker = tmp_path / "code-ran"
    state = official_state() | {"layers.3.attention.gate": _RunsCode(marker)}
    path = save_official(state, tmp_path)
    out = tmp_path / "converted"
    refused = r"refused: it holds pickled Python objects other than tensors \(here .+\).*nothing in it was executed"
    with pytest.raises(ValueError, match=refused) as info:
        convert_official(ConvertConfig(str(path), str(out), str(tiny_base_dir)))
    assert str(info.value).startswith(str(path))
    assert not marker.exists() and not out.exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain load would have run it
    assert marker.exists()


def _edited(changes: dict):
    """A checkpoint edit: set these tensors, dropping those set to None."""

    def edit(state: dict) -> dict:
        state = state | changes
        return {key: value for key, value in state.items() if value is not None}

    return edit


# A file that is wrong in itself: refused before the base is loaded, so a base that does not exist never shows.
BAD_FILES = {
    "not-a-dict": (lambda state: list(state.values()), r"expected a dict of tensors, got a list"),
    "not-tensors": (_edited({"step": 3}), r"expected a dict of tensors, but 'step' is of type int"),
    "no-prompts": (_edited({"adapter_query.weight": None}), r"no tensor adapter_query\.weight"),
    "no-gates": (
        lambda state: {"adapter_query.weight": state["adapter_query.weight"]},
        r"no layers\.<i>\.attention\.gate tensors",
    ),
    "rows-not-divisible": (
        _edited({"adapter_query.weight": torch.zeros(16, 64)}),
        r"adapter_query\.weight has shape \[16, 64\], expected \(L\*K, dim\) with L = 3",
    ),
    "gate-shape": (
        _edited({"layers.2.attention.gate": torch.zeros(4)}),
        r"layers\.2\.attention\.gate has shape \[4\], expected \[1\] or \[1, heads, 1, 1\]",
    ),
    "gate-one": (
        _edited({"layers.3.attention.gate": torch.ones(1)}),
        r"layers\.3\.attention\.gate has value 1; .*strictly between -1 and 1",
    ),
    "gate-beyond-one": (
        _edited({"layers.1.attention.gate": torch.tensor([0.5, -1.5, 0.0, 0.2]).view(1, 4, 1, 1)}),
        r"layers\.1\.attention\.gate has value -1\.5",
    ),
    "v2-multimodal": (
        _edited({"clip.visual.proj": torch.zeros(2), "visual_proj.weight": torch.zeros(2)}),
        r"unexpected tensors \['clip\.visual\.proj', 'visual_proj\.weight'\].*only LLaMA-Adapter v1 text adapters",
    ),
}


@pytest.mark.parametrize("edit, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_is_refused_before_the_base_is_loaded(tmp_path, edit, message):
    path = save_official(edit(official_state()), tmp_path)
    out = tmp_path / "converted"
    with pytest.raises(ValueError, match=message) as info:
        convert_official(ConvertConfig(str(path), str(out), str(tmp_path / "no-such-base")))
    assert str(info.value).startswith(str(path))
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None], ids=["empty", "garbage", "truncated"])
def test_unreadable_file_is_a_value_error(tmp_path, content):
    path = save_official(official_state(), tmp_path)
    path.write_bytes(path.read_bytes()[:100] if content is None else content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable PyTorch checkpoint")):
        convert_official(ConvertConfig(str(path), str(tmp_path / "converted"), str(tmp_path / "no-such-base")))


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{path}: no such file")):
        convert_official(ConvertConfig(str(path), str(tmp_path / "converted")))


# A file that is fine in itself but was not trained on a base of this shape.
WRONG_BASE = {
    "too-many-layers": (
        {"layers": range(5), "rows": 5 * ADAPTER_LEN},
        r"5 adapted layers, but the base '.*' has only 4 layers",
    ),
    "not-the-top-layers": ({"layers": [0, 1, 2]}, r"gates on layers \[0, 1, 2\], but the top 3 layers .* are 1\.\.3"),
    "other-width": ({"width": 32}, r"adapter_query\.weight has width 32, the base '.*' has hidden size 64"),
    "other-head-count": (
        {"gate_shape": (1, 8, 1, 1)},
        r"layers\.1\.attention\.gate has 8 heads, the base '.*' has 4",
    ),
}


@pytest.mark.parametrize("layout, message", WRONG_BASE.values(), ids=WRONG_BASE.keys())
def test_checkpoint_for_another_base_is_refused(tiny_base_dir, tmp_path, layout, message):
    path = save_official(official_state(**layout), tmp_path)
    out = tmp_path / "converted"
    with pytest.raises(ValueError, match=message) as info:
        convert_official(ConvertConfig(str(path), str(out), str(tiny_base_dir)))
    assert str(info.value).startswith(str(path))
    assert not out.exists()
