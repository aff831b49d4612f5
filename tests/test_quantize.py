"""--quantize: the frozen base's linear weights in 8 or 4 bits (bitsandbytes, on the CPU here), adapters in full
precision on top: what is quantised, how close it stays, training through it, and what is refused."""

import json

import pytest
import torch

from llama_adapter import AdapterConfig, cli
from llama_adapter.base import loading
from llama_adapter.config import BaseModelConfig, ModelConfig
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving.models import load_model
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

bnb = pytest.importorskip(
    "bitsandbytes", reason="--quantize needs bitsandbytes (pip install 'llama-adapter[quantize]')"
)
LINEAR = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
SMALL = {"lora_rank": 4, "bottleneck_size": 8, "adapter_len": 3, "adapter_layers": 2}


def tokens(tokenizer):
    torch.manual_seed(7)
    ids = torch.randint(4, len(tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def quantized(
    folder, quantize: str, method: str = "llama-adapter", device: str | torch.device = "cpu"
) -> LlamaAdapterModel:
    config = AdapterConfig(method=method, **SMALL)
    return LlamaAdapterModel.from_base(str(folder), config, device=device, quantize=quantize)


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_the_decoder_linears_are_quantised_and_the_output_stays_close(tiny_base_dir, tokenizer, quantize):
    full = LlamaAdapterModel.from_base(str(tiny_base_dir), device="cpu")
    model = quantized(tiny_base_dir, quantize)
    assert loading.quantization(model.base) == quantize and loading.quantization(full.base) == "none"
    linears = [m for name, m in model.base.named_modules() if name.endswith(("q_proj", "down_proj"))]
    assert len(linears) == 8 and all(isinstance(m, LINEAR[quantize]) for m in linears)
    assert model.base.get_memory_footprint() < 0.75 * full.base.get_memory_footprint()
    ids, mask = tokens(tokenizer)
    exact, approx = full(ids, mask), model(ids, mask)
    error = (approx - exact)[mask.bool()].abs().mean() / exact[mask.bool()].abs().mean()
    assert 0 < error < {"int8": 0.02, "nf4": 0.25}[quantize], error  # 4 bits of a random 64-wide model: ~16%


@pytest.mark.parametrize("method", ["llama-adapter", "series", "lora"])
def test_a_fresh_adapter_on_a_quantised_base_is_exactly_that_base(tiny_base_dir, tokenizer, method):
    ids, mask = tokens(tokenizer)
    base_alone = quantized(tiny_base_dir, "nf4").base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(quantized(tiny_base_dir, "nf4", method)(ids, mask), base_alone)


@pytest.mark.parametrize(("method", "quantize"), [("llama-adapter", "nf4"), ("lora", "nf4"), ("llama-adapter", "int8")])
def test_training_on_a_quantised_base_lowers_the_loss_and_keeps_the_adapter_in_fp32(
    tiny_base_dir, tokenizer, rows_file, tmp_path, method, quantize
):
    # Validation runs before the first step, in eval mode without gradients: where bitsandbytes would then repack
    # 4-bit weights for a kernel without backward (AVX512-BF16 CPUs), no gradient would reach the adapter.
    cfg = TrainConfig(
        data=str(rows_file),
        out=str(tmp_path / "run"),
        model=BaseModelConfig(base=str(tiny_base_dir), quantize=quantize),
        epochs=3,
        batch_size=4,
        lr={"llama-adapter": 0.2, "lora": 0.02}[method],
        val_fraction=0.25,
    )
    model = quantized(tiny_base_dir, quantize, method)
    frozen = {name: p.clone() for name, p in model.base.named_parameters() if not p.requires_grad}
    summary = train(cfg, model.config, model)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05, summary
    assert all(p.dtype == torch.float32 for p in model.adapter_state().values())
    assert all(torch.equal(p, frozen[name]) for name, p in model.base.named_parameters() if name in frozen)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["quantize"] == quantize

    ids, mask = tokens(tokenizer)
    served = load_model(
        ModelConfig(base=str(tiny_base_dir), precision="fp32", quantize=quantize), str(tmp_path / "run")
    )
    # LoRA stays beside a quantised base: folded in, its update would be rounded to the 4-bit grid.
    assert not any(getattr(module, "merged", False) for module in served.base.modules())
    # The adapter serves on the full-precision base too (QLoRA's way): close to, not equal to, these answers.
    full = load_model(ModelConfig(base=str(tiny_base_dir), precision="fp32"), str(tmp_path / "run"))
    assert loading.quantization(full.base) == "none"
    torch.testing.assert_close(served(ids, mask), model(ids, mask), rtol=0, atol=0)
    assert (full(ids, mask) - model(ids, mask)).abs().max() > 0


def test_cli_trains_and_answers_on_a_quantised_base(tiny_base_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(rows_file), "--out", str(out), "--base", str(tiny_base_dir), "--max-steps", "2"]
    cli.main([*args, "--batch-size", "4", "--quantize", "int8", "--method", "series", "--bottleneck-size", "8"])
    assert json.loads((out / "train_config.json").read_text())["quantize"] == "int8"
    capsys.readouterr()
    cli.main(["chat", "Say hi.", "--adapter", str(out), "--quantize", "int8", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip()


def test_quantize_refusals(tiny_base_dir, rows_file, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"quantize must be one of \['none', 'int8', 'nf4'\], got 'int4'"):
        ModelConfig(quantize="int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        TrainConfig(data="x", out="y", model=BaseModelConfig(quantize="fp8"))
    with pytest.raises(ValueError, match="--fsdp cannot shard a quantised base"):
        cfg = TrainConfig(data=str(rows_file), out=str(tmp_path / "run"), model=BaseModelConfig(quantize="nf4"))
        train(cfg, AdapterConfig(), fsdp=True)
    assert not (tmp_path / "run").exists()

    lora = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="lora", lora_rank=2), device="cpu")
    lora.save(tmp_path / "lora")
    with pytest.raises(SystemExit, match="merge folds into full-precision weights; leave out --quantize"):
        cli.main(["merge", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "m"), "--quantize", "nf4"])
    assert not (tmp_path / "m").exists()

    real_find_spec = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real_find_spec(name)
    )
    with pytest.raises(ModuleNotFoundError, match=r"--quantize nf4 needs bitsandbytes: pip install"):
        quantized(tiny_base_dir, "nf4")
