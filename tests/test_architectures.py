"""The model types the adapter is checked on (structure.MODEL_TYPES), any mix of them in one process, and a refusal for the
rest: zero gates are exactly the model, and the loss is cross-entropy on its logits."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from llama_adapter import AdapterConfig, LlamaAdapterModel
from llama_adapter.base import structure

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2}  # fmt: skip
SDPA = {"llama", "mistral", "qwen2"}  # gpt_oss's attention sinks have no SDPA kernel in transformers


def tiny_base(model_type, tokenizer, impl="eager"):
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval().requires_grad_(False)


def batch(tokenizer):
    ids = torch.randint(4, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def check_exact_and_loss(model_type, tokenizer, impl="eager"):
    base = tiny_base(model_type, tokenizer, impl)
    ids, mask = batch(tokenizer)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
        model = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
        assert torch.equal(model(ids, mask), plain), model_type
        expected = F.cross_entropy(plain[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        torch.testing.assert_close(model.loss(ids, mask, labels), expected, rtol=1e-6, atol=1e-6)
        for prompt in model.prompts.values():  # the adapter is really in the forward pass
            prompt.adapter_gate.fill_(0.5)
        assert (model(ids, mask) - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("model_type", "impl"),
    [(t, i) for t in structure.MODEL_TYPES for i in ("eager", "sdpa") if i == "eager" or t in SDPA],
)
def test_zero_gates_are_exact_and_the_loss_is_cross_entropy_on_the_logits(tokenizer, model_type, impl):
    check_exact_and_loss(model_type, tokenizer, impl)


@pytest.mark.parametrize("order", [("llama", "gpt_oss"), ("gpt_oss", "llama")], ids="-then-".join)
def test_two_architectures_in_one_process_are_both_exact(tokenizer, order):
    """Their eager attention functions differ (gpt_oss adds attention sinks): each must wrap its own."""
    for model_type in order:
        check_exact_and_loss(model_type, tokenizer)


def test_a_model_type_outside_the_allow_list_is_refused(tokenizer):
    base = tiny_base("cohere", tokenizer)  # its head scales the logits, which the adapter's loss path would skip
    with pytest.raises(ValueError, match=r"'cohere' model .*checked on the model types llama, mistral, qwen2, gpt_oss"):
        LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
    assert base.config._attn_implementation == "eager" and not base.model.layers[0].self_attn._forward_pre_hooks


@pytest.mark.parametrize("method", ["series", "parallel"])
@pytest.mark.parametrize("model_type", structure.MODEL_TYPES)
def test_bottleneck_adapters_run_on_every_model_type(tokenizer, model_type, method):
    """gpt_oss's MLP returns its router's scores beside its output: the bottleneck goes on the output alone."""
    base = tiny_base(model_type, tokenizer)
    ids, mask = batch(tokenizer)
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(method=method, bottleneck_size=8))
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(model(ids, mask), plain)  # W_up starts at zero
        for module in model.method.bottlenecks:
            module.up.weight.normal_()
        assert (model(ids, mask) - plain).abs().max() > 1e-3
