"""Cross-check against Hugging Face PEFT's AdaptionPrompt, an independent implementation of the same paper.

PEFT has one scalar gate per layer applied without tanh; ours has one gate per head applied through tanh. With every
head's gate set to atanh(PEFT's gate) and the same prompts, both must compute the same function.
"""

import copy
import math

import pytest
import torch

from llama_adapter import AdapterConfig
from llama_adapter.model import LlamaAdapterModel

peft = pytest.importorskip("peft")

ADAPTER_LEN, ADAPTER_LAYERS = 5, 3


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_logits_match_peft_adaption_prompt(make_base, tokenizer, kv_heads):
    check_matches_peft(make_base("eager", num_key_value_heads=kv_heads), tokenizer)


def check_matches_peft(base, tokenizer, device: str | torch.device = "cpu") -> None:
    """Our adapter and PEFT's, each on a copy of `base` with the same prompts and matching gates, give the same
    logits on `device` (tests/test_cuda.py runs this on the GPU)."""
    attn = base.model.layers[0].self_attn
    kv_heads = base.config.num_key_value_heads
    # PEFT infers the kv head count as heads // (hidden // kv_out); this config must satisfy its assumption.
    assert base.config.num_attention_heads // (attn.k_proj.in_features // attn.k_proj.out_features) == kv_heads

    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.AdaptionPromptConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS, task_type="CAUSAL_LM"),
    )
    ours = LlamaAdapterModel(copy.deepcopy(base), tokenizer, AdapterConfig(ADAPTER_LEN, ADAPTER_LAYERS))

    their_layers = {
        int(name.split(".")[-2]): module  # "...layers.<i>.self_attn"
        for name, module in theirs.named_modules()
        if type(module).__name__ == "AdaptedAttention"
    }  # fmt: skip
    assert sorted(their_layers) == sorted(ours.prompts) == [1, 2, 3]

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for position, (idx, their) in enumerate(sorted(their_layers.items())):
            their.adaption_prompt.normal_(generator=generator)
            gate = -0.8 + 0.7 * position  # distinct per layer, inside (-1, 1) where atanh exists
            their.adaption_gate.fill_(gate)
            ours.prompts[idx].adapter_prompt.copy_(their.adaption_prompt[0])
            ours.prompts[idx].adapter_gate.fill_(math.atanh(gate))

    ids = torch.randint(4, len(tokenizer), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    theirs, ours, base = theirs.to(device), ours.to(device), copy.deepcopy(base).to(device)
    ids, mask = ids.to(device), mask.to(device)
    real = mask.bool()  # what either side computes at padded positions is unused
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits[real]
        actual = ours(ids, mask)[real]
        reference = base(input_ids=ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (expected - reference).abs().max() > 1e-2  # the adapters really changed the output
