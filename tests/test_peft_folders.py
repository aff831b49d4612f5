"""Adapter folders that Hugging Face PEFT loads: a PEFT method's folder holds PEFT's own two files beside ours, and
LLaMA-Adapter v1 converts to and from PEFT's adaption prompt (peft_format.py). Each is checked by PEFT itself:
`PeftModel.from_pretrained` on a fresh copy of the tiny base must compute our logits."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from llama_adapter import AdapterConfig, cli
from llama_adapter.adapter_files import (
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    WEIGHTS_NAME,
    config_path,
)
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.peft_format import export_peft, import_peft

peft = pytest.importorskip("peft")

PEFT_TYPES = {"lora": "LORA", "adalora": "ADALORA", "prefix": "PREFIX_TUNING", "ptuning-v2": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING"}  # fmt: skip
SMALL = {"adapter_len": 3, "lora_rank": 4, "adalora_init_rank": 4, "adalora_target_rank": 2, "prefix_hidden_size": 16}
OLD = Path(__file__).parent / "fixtures" / "e1c06de"  # adapters saved before PEFT's files joined ours
NINE_HEADS = {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3}  # SmolLM2's heads, head size 8


def batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def logits(model, ids, mask, skip: int = 0) -> torch.Tensor:
    """A PEFT or plain Hugging Face model's logits at the real positions of the batch, past `skip` virtual tokens."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, skip:][mask.bool()]


def ours(model: LlamaAdapterModel, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)[mask.bool()]


def make_nontrivial(model: LlamaAdapterModel, ids, mask) -> None:
    """AdaLoRA trained through its whole schedule, so that pruning leaves ranks of several sizes; the others perturbed
    (LoRA's B starts at zero)."""
    if model.config.method != "adalora":
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.adapter_state().values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        return
    steps, optimizer = 10, torch.optim.AdamW(model.adapter_state().values(), lr=0.05)
    model.method.begin_training(steps)
    model.train()
    for step in range(1, steps + 1):
        model.loss(ids, mask, ids.masked_fill(mask == 0, -100)).backward()
        optimizer.step()
        model.method.end_step(step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", list(PEFT_TYPES))
def test_peft_loads_a_peft_method_folder_and_computes_our_logits(method, tiny_base_dir, make_base, tokenizer, tmp_path):
    ids, mask = batch(tokenizer)
    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method=method, **SMALL), device="cpu")
    make_nontrivial(model, ids, mask)
    folder = tmp_path / "saved"
    model.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [WEIGHTS_NAME, CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME]
    )
    assert peft.PeftConfig.from_pretrained(folder).peft_type == PEFT_TYPES[method]
    expected = ours(model, ids, mask)
    theirs = logits(peft.PeftModel.from_pretrained(make_base(), folder), ids, mask, model.method.virtual_tokens)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
    assert (expected - logits(make_base(), ids, mask)).abs().max() > 1e-2  # the adapter really changes the output
    if method == "adalora":  # PEFT cuts each layer to the ranks pruning left, and must size its layers alike
        kept = json.loads((folder / PEFT_CONFIG_NAME).read_text())["rank_pattern"].values()
        assert len({sum(ranks) for ranks in kept}) > 1
    assert torch.equal(ours(LlamaAdapterModel.load(folder, device="cpu"), ids, mask), expected)


def test_an_old_folder_loads_and_saving_over_it_writes_the_new_layout(tokenizer, tmp_path):
    expected = load_file(OLD / "expected_logits.safetensors")
    ids, mask, real = expected["input_ids"], expected["attention_mask"], expected["attention_mask"].bool()
    folder = shutil.copytree(OLD / "lora", tmp_path / "lora")
    assert config_path(folder).name == LEGACY_CONFIG_NAME
    with pytest.raises(TypeError, match="peft_type"):  # what PEFT made of our config under its name
        peft.PeftConfig.from_pretrained(folder)
    with warnings.catch_warnings():  # the adapter names its base by the path it had where it was made
        warnings.filterwarnings("ignore", message=".*loading onto .* of the same shape")
        model = LlamaAdapterModel.load(folder, base=str(OLD / "base"), device="cpu")
    torch.testing.assert_close(ours(model, ids, mask), expected["lora"][real], rtol=1e-5, atol=1e-5)

    model.save(folder)
    assert config_path(folder).name == CONFIG_NAME
    assert json.loads((folder / PEFT_CONFIG_NAME).read_text())["peft_type"] == "LORA"
    assert torch.equal(ours(LlamaAdapterModel.load(folder, device="cpu"), ids, mask), ours(model, ids, mask))

    v1_adapter(tokenizer, tmp_path / "other").save(folder)  # another adapter saved over it leaves no PEFT file behind
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])


def tiny(tokenizer, model_type: str = "llama", **overrides):
    """conftest's tiny base (the same weights for the same arguments), of any model type."""
    settings = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(settings | overrides)))
    return model.eval().requires_grad_(False)


def v1_adapter(tokenizer, folder: Path, model_type: str = "llama", **overrides) -> LlamaAdapterModel:
    """A llama-adapter on `tiny(...)`, saved as a base in `folder`, whose heads share a gate in each layer, as PEFT's
    adaption prompt has it."""
    tiny(tokenizer, model_type, **overrides).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = LlamaAdapterModel.from_base(str(folder), AdapterConfig(adapter_len=3, adapter_layers=2), device="cpu")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for position, prompt in enumerate(model.prompts.values()):
            prompt.adapter_prompt.normal_(generator=generator)
            prompt.adapter_gate.fill_(0.9 - 1.3 * position)  # distinct per layer
    return model


@pytest.mark.parametrize(
    ("model_type", "shape"),
    [("llama", {}), ("llama", NINE_HEADS), ("mistral", {})],
    ids=["llama-4-heads-2-kv", "llama-9-heads-3-kv", "mistral"],
)
def test_a_v1_adapter_goes_to_peft_and_back_computing_the_same_logits(model_type, shape, tokenizer, tmp_path):
    ids, mask = batch(tokenizer)
    model = v1_adapter(tokenizer, tmp_path / "base", model_type, **shape)
    model.save(tmp_path / "ours")
    cli.main(["convert", "--peft", "export", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "peft")])
    expected = ours(model, ids, mask)
    theirs = peft.PeftModel.from_pretrained(tiny(tokenizer, model_type, **shape), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, ids, mask), expected, rtol=1e-5, atol=1e-5)
    assert (expected - logits(tiny(tokenizer, model_type, **shape), ids, mask)).abs().max() > 1e-2
    assert torch.equal(ours(LlamaAdapterModel.load(tmp_path / "peft", device="cpu"), ids, mask), expected)

    cli.main(["convert", "--peft", "import", "--checkpoint", str(tmp_path / "peft"), "--out", str(tmp_path / "back")])
    back = LlamaAdapterModel.load(tmp_path / "back", device="cpu")
    for layer, prompt in model.prompts.items():
        assert torch.equal(back.prompts[layer].adapter_prompt, prompt.adapter_prompt)
        torch.testing.assert_close(back.prompts[layer].adapter_gate, prompt.adapter_gate, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(back, ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_peft_trained_imports_with_peft_logits(tokenizer, tmp_path):
    ids, mask = batch(tokenizer)
    v1_adapter(tokenizer, tmp_path / "base", **NINE_HEADS)  # for its base folder
    config = peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=3, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny(tokenizer, **NINE_HEADS), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(("adaption_prompt", "adaption_gate")):
                param.copy_(torch.rand(param.shape, generator=generator) * 1.8 - 0.9)
    theirs.save_pretrained(tmp_path / "peft")

    model = import_peft(tmp_path / "peft", tmp_path / "ours", str(tmp_path / "base"))
    assert model.config.adapter_len == 4 and sorted(model.prompts) == [1, 2, 3]
    loaded = LlamaAdapterModel.load(tmp_path / "ours", device="cpu")
    torch.testing.assert_close(ours(loaded, ids, mask), logits(theirs, ids, mask), rtol=1e-5, atol=1e-5)


REFUSALS = {
    "a gate per head": ("llama", {}, r"per-head/llama_adapter_config.json: layer 2: its heads' gates differ"),
    "o_proj with a bias": (
        "llama",
        {"attention_bias": True},
        r"o_proj\) has a bias, which PEFT's adaption prompt adds",
    ),
    "head size not hidden / heads": ("llama", {"head_dim": 32}, r"key/value heads to be .* = 4, but it has 2"),
    "qwen2": ("qwen2", {}, r"a 'qwen2' model; PEFT's adaption prompt runs on llama and mistral only"),
}


@pytest.mark.parametrize(("model_type", "overrides", "message"), REFUSALS.values(), ids=REFUSALS)
def test_export_refuses_what_peft_would_compute_otherwise_and_writes_nothing(
    model_type, overrides, message, tokenizer, randomize_adapter, tmp_path
):
    model = v1_adapter(tokenizer, tmp_path / "base", model_type, **overrides)
    if "per-head" in message:
        randomize_adapter(model)  # a gate of its own for every head, as training gives
    model.save(tmp_path / "per-head")
    with pytest.raises(ValueError, match=message):
        export_peft(tmp_path / "per-head", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_other_methods_before_loading_the_base(tiny_base_dir, tmp_path):
    LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="lora"), device="cpu").save(tmp_path / "lora")
    with pytest.raises(ValueError, match="lora/llama_adapter_config.json: a lora adapter; only llama-adapter"):
        export_peft(tmp_path / "lora", tmp_path / "out", base=str(tmp_path / "no-such-base"))


def test_import_refuses_a_gate_that_tanh_cannot_reach_before_loading_a_base(tokenizer, tmp_path):
    v1_adapter(tokenizer, tmp_path / "base").save(tmp_path / "ours")
    export_peft(tmp_path / "ours", tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    gate = next(name for name in tensors if name.endswith("layers.3.self_attn.adaption_gate"))
    tensors[gate] = torch.tensor([1.5])
    save_file(tensors, tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"layers\.3\.self_attn\.adaption_gate is 1.5; our gates are tanh\(g\)"):
        import_peft(tmp_path / "peft", tmp_path / "back", str(tmp_path / "no-such-base"))
    assert not (tmp_path / "back").exists()
