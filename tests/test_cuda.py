"""What a GPU could break, checked on the GPU: `pytest -m cuda` (scripts/gpu_check.sh runs these first).

The tiny random LLaMA of conftest.py, moved to LLAMA_ADAPTER_TEST_DEVICE (default "cuda"): zero gates are exact
in fp32 and bf16; eager attention, SDPA and each of SDPA's kernels agree; cached greedy generation equals
uncached; PEFT's AdaptionPrompt computes the same function; multimodal, nf4 and int8 training steps reach the
adapter; a stopped run resumes exactly; packed rows equal unpacked ones. Each reuses the helpers of the CPU test
of the same property. Without CUDA they skip (CI has no GPU); `scripts/gpu_check.sh --dry-run` runs them on the
CPU (LLAMA_ADAPTER_TEST_DEVICE=cpu), so that the tests themselves are checked before GPU time is spent on them.
"""

import os

import pytest
import torch
from test_adapter import greedy_without_cache, random_batch
from test_peft_parity import check_matches_peft
from test_resume import Crash, adapter_tensors, assert_same_tensors, config, crash_at_step, losses
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama_adapter import AdapterConfig
from llama_adapter.base import loading
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.train.loop import train

DEVICE = torch.device(os.environ.get("LLAMA_ADAPTER_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA device here (LLAMA_ADAPTER_TEST_DEVICE=cpu runs these tests on the CPU)",
    ),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Two implementations of the same attention differ by rounding: in fp32 by ~1e-7 here, in bf16 (8 bits of mantissa)
# by an ulp or two of the logits (0.004 at 0.5). The adapter moves these logits by 0.14 or more (EFFECT).
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2}}
EFFECT = 5  # times atol: the adapter's change of the logits, so that dropping it would fail the comparison
# SDPA's kernels (torch.nn.attention.SDPBackend) that each device type has, and the dtypes each takes.
KERNELS = {
    "cuda": {
        "math": (torch.float32, torch.bfloat16),
        "efficient": (torch.float32, torch.bfloat16),
        "flash": (torch.bfloat16,),
    },
    "cpu": {"math": (torch.float32, torch.bfloat16), "flash": (torch.float32, torch.bfloat16)},
}
BACKENDS = {
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
}


def to_device(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(tensor.to(DEVICE) for tensor in tensors)


def adapted(make_model, randomize_adapter, impl: str, dtype: torch.dtype, **config) -> LlamaAdapterModel:
    """A tiny model with trained-looking (non-zero) gates on DEVICE: the base in `dtype`, the adapter in fp32."""
    model = make_model(impl, adapter_len=5, adapter_layers=3, **config)
    randomize_adapter(model, seed=1)
    model.base.to(dtype)
    return model.to(DEVICE)


def plain_logits(model: LlamaAdapterModel, ids, mask=None) -> torch.Tensor:
    with torch.no_grad(), model.disabled():
        return model.base(input_ids=ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------------------------------------
# Forward pass


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_zero_gates_reproduce_the_base_exactly(make_base, tokenizer, impl, dtype):
    base = make_base(impl).to(DEVICE, dtype)
    ids, mask = to_device(*random_batch(len(tokenizer)))
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=4, adapter_layers=3)).to(DEVICE)
    assert base.config._attn_implementation != impl  # the adapter is in the forward path
    with torch.no_grad():
        assert torch.equal(model(ids, mask), expected)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_eager_and_sdpa_agree_with_nonzero_gates(make_model, randomize_adapter, tokenizer, dtype, kv_heads):
    eager = adapted(make_model, randomize_adapter, "eager", dtype, num_key_value_heads=kv_heads)
    sdpa = adapted(make_model, randomize_adapter, "sdpa", dtype, num_key_value_heads=kv_heads)
    ids, mask = to_device(*random_batch(len(tokenizer)))
    real = mask.bool()  # padded positions' outputs are unused, implementations may differ there
    with torch.no_grad():
        expected, actual = eager(ids, mask)[real], sdpa(ids, mask)[real]
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert (expected - plain_logits(eager, ids, mask)[real]).abs().max() > EFFECT * TOLERANCE[dtype]["atol"]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kernel", BACKENDS)
def test_each_sdpa_kernel_agrees_with_eager(make_model, randomize_adapter, tokenizer, kernel, dtype):
    if dtype not in KERNELS[DEVICE.type].get(kernel, ()):
        pytest.skip(f"SDPA's {kernel} kernel does not take {dtype} on {DEVICE.type}")
    # LLaMA-7B's multi-head attention and no padding, so that every kernel can run the base's attention too.
    eager = adapted(make_model, randomize_adapter, "eager", dtype, num_key_value_heads=4)
    sdpa = adapted(make_model, randomize_adapter, "sdpa", dtype, num_key_value_heads=4)
    ids = to_device(random_batch(len(tokenizer))[0])[0]
    with torch.no_grad():
        expected = eager(ids)
        with sdpa_kernel(BACKENDS[kernel]):  # this kernel alone: no fallback to another
            actual = sdpa(ids)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert (expected - plain_logits(eager, ids)).abs().max() > EFFECT * TOLERANCE[dtype]["atol"]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_greedy_generation_matches_uncached(make_model, tokenizer, randomize_adapter, impl):
    """The adapter caches its prompts' keys and values without gradients; generating with the KV cache, without
    it, and by argmax over full forward passes all give the same tokens."""
    model = make_model(impl, adapter_len=4, adapter_layers=3)
    randomize_adapter(model, seed=3)
    model.to(DEVICE)
    ids = tokenizer("Tell me a story:", return_tensors="pt")["input_ids"].to(DEVICE)
    steps = 16
    settings = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": steps,
        "do_sample": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.no_grad(), model.use():
        cached = model.base.generate(ids, use_cache=True, **settings)
        uncached = model.base.generate(ids, use_cache=False, **settings)
    expected = greedy_without_cache(model, ids, steps, tokenizer.eos_token_id)
    assert expected.shape[1] > ids.shape[1] + 4, "too few tokens generated for a meaningful comparison"
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_logits_match_peft_adaption_prompt(make_base, tokenizer, kv_heads):
    check_matches_peft(make_base("eager", num_key_value_heads=kv_heads), tokenizer, DEVICE)


# ----------------------------------------------------------------------------------------------------------
# Training


def train_one_step(model: LlamaAdapterModel, ids, mask, **images) -> dict[str, torch.Tensor]:
    """One AdamW step on the response loss; checks every adapter parameter got a finite, non-zero gradient and
    moved. Returns the gradients."""
    params = model.adapter_state()
    before = {name: param.detach().clone() for name, param in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    loss = model.loss(ids, mask, ids.masked_fill(mask == 0, -100), **images)
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in params.items() if param.grad is not None}
    optimizer.step()
    assert torch.isfinite(loss)
    assert grads.keys() == params.keys(), f"no gradient reached {sorted(params.keys() - grads.keys())}"
    for name, grad in grads.items():
        assert grad.device.type == DEVICE.type and grad.dtype == torch.float32, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert not torch.equal(params[name].detach(), before[name]), name
    return grads


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_a_multimodal_training_step_trains_prompts_gates_and_projection(
    multimodal, images, tokenizer, randomize_adapter, dtype
):
    model = multimodal()
    randomize_adapter(model)
    model.base.to(dtype)
    model.to(DEVICE)
    features = model.encode_images(images)
    assert features.device.type == DEVICE.type
    ids, mask = to_device(*random_batch(len(tokenizer)))
    has_image = torch.tensor([True, False], device=DEVICE)  # a row without an image in the same batch
    train_one_step(model, ids, mask, image_features=features, has_image=has_image)
    assert all(param.grad is None for param in model.image_encoder.parameters())  # CLIP stays frozen


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_training_step_on_a_quantised_base_reaches_the_adapter(tiny_base_dir, tokenizer, randomize_adapter, quantize):
    from test_quantize import quantized, tokens  # here, not above: that module skips itself without bitsandbytes

    model = quantized(tiny_base_dir, quantize, device=DEVICE)
    assert loading.quantization(model.base) == quantize
    assert {param.device.type for param in model.parameters()} == {DEVICE.type}
    randomize_adapter(model)  # non-zero gates: the prompts get gradients too
    ids, mask = to_device(*tokens(tokenizer))
    with torch.no_grad():  # a validation pass first, as training runs one (see test_quantize)
        model.loss(ids, mask, ids.masked_fill(mask == 0, -100))
    frozen = {name: param.clone() for name, param in model.base.named_parameters() if not param.requires_grad}
    train_one_step(model, ids, mask)
    assert all(torch.equal(param, frozen[name]) for name, param in model.base.named_parameters() if name in frozen)


def test_a_stopped_run_resumes_exactly(make_model, randomize_adapter, rows_file, tmp_path, monkeypatch):
    """test_resume's run, on the device: stopped at step 6 and resumed from the checkpoint of step 4, it ends with
    the losses and the adapter of the run that never stopped, bit for bit."""

    def run(out, model=None) -> dict:
        model = model or make_model().to(DEVICE)
        return train(config(rows_file, out), model.config, model)

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run(whole)
    crash_at_step(monkeypatch, 6)
    with pytest.raises(Crash):
        run(stopped)
    monkeypatch.undo()
    model = make_model().to(DEVICE)
    randomize_adapter(model, seed=7)  # other weights: the resumed adapter must come from the checkpoint
    assert run(stopped, model)["resumed_from_step"] == 4
    assert losses(stopped) == losses(whole)
    assert_same_tensors(adapter_tensors(stopped), adapter_tensors(whole))


def test_packed_rows_give_the_loss_and_gradients_of_unpacked_ones(make_model, randomize_adapter):
    from test_packing import check_packed_equals_unpacked

    model = make_model()
    randomize_adapter(model)
    check_packed_equals_unpacked(model.to(DEVICE), DEVICE)
