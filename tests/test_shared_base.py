"""Adapters own their state: a shared base they take turns on, which unloading restores bit for bit, and modules
that torch sees (`.train()`, `.to()`, `.parameters()`) whichever adapter is active."""

import gc
import time
import weakref

import pytest
import torch
from test_methods import SMALL, batch, randomize

from llama_adapter import AdapterConfig, LlamaAdapterModel, SharedBase, VisualConfig
from llama_adapter.adapter_files import WEIGHTS_NAME

SHARING = ["llama-adapter", "series", "parallel", "dylora"]
OWN_BASE = ["lora", "adalora", "prefix", "ptuning-v2", "prompt"]


def hooks(base) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())


def adapted(make_base, tokenizer, method: str):
    """A randomised adapter of `method` on a fresh tiny base, and a batch."""
    base = make_base()
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(method=method, **SMALL))
    randomize(model)
    return base, model, *batch(tokenizer)


def plain_logits(make_base, tokenizer):
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        return make_base()(input_ids=ids, attention_mask=mask).logits


def test_unloading_every_adapter_of_a_shared_base_restores_it_bit_for_bit(make_base, tokenizer, tiny_clip):
    base = make_base()
    ids, mask = batch(tokenizer)
    models = []
    for seed, method in enumerate(SHARING):
        torch.manual_seed(seed)
        models.append(LlamaAdapterModel(base, tokenizer, AdapterConfig(method=method, **SMALL)))
        randomize(models[-1], seed)
    models.append(LlamaAdapterModel(base, tokenizer, AdapterConfig(**SMALL), VisualConfig(clip_model=tiny_clip)))
    randomize(models[-1], 9)
    assert len({m.shared for m in models}) == 1 and [m.name for m in models][-1] == "llama-adapter-2"
    with torch.no_grad():
        for model in models:
            assert (model(ids, mask) - plain_logits(make_base, tokenizer)).abs().max() > 1e-3
    assert hooks(base) > 0 and base.config._attn_implementation.startswith("llama_adapter_")
    for model in models[:-1]:
        model.unload()
        with torch.no_grad():  # the others still answer as themselves
            assert (models[-1](ids, mask) - plain_logits(make_base, tokenizer)).abs().max() > 1e-3
    models[-1].unload()
    assert hooks(base) == 0 and base.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=mask).logits, plain_logits(make_base, tokenizer))
    with pytest.raises(ValueError, match="has been removed from its base"):
        models[0](ids, mask)


@pytest.mark.parametrize("method", OWN_BASE)
def test_unloading_an_adapter_that_rebuilds_its_base_restores_it(make_base, tokenizer, method):
    base, model, ids, mask = adapted(make_base, tokenizer, method)
    with torch.no_grad():
        assert (model(ids, mask) - plain_logits(make_base, tokenizer)).abs().max() > 1e-3
    model.unload()
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=mask).logits, plain_logits(make_base, tokenizer))


def test_a_merged_lora_comes_off_up_to_rounding(make_base, tokenizer):
    base, model, ids, mask = adapted(make_base, tokenizer, "lora")
    model.method.merge()
    model.unload()
    with torch.no_grad():
        restored = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(restored, plain_logits(make_base, tokenizer), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["llama-adapter", "series", "lora"])
def test_disabled_runs_the_plain_base_and_the_adapter_comes_back(make_base, tokenizer, method):
    _, model, ids, mask = adapted(make_base, tokenizer, method)
    with torch.no_grad():
        answer = model(ids, mask)
        with model.disabled():
            assert torch.equal(
                model.base(input_ids=ids, attention_mask=mask).logits, plain_logits(make_base, tokenizer)
            )
        assert torch.equal(model(ids, mask), answer)


def test_a_dylora_adapter_on_a_shared_base_trains_at_its_drawn_rank(make_base, tokenizer):
    """Not the last adapter attached, it still sees .train(), .to() and .parameters() (R4)."""
    base = make_base()
    torch.manual_seed(1)
    dylora = LlamaAdapterModel(base, tokenizer, AdapterConfig(method="dylora", **SMALL | {"lora_dropout": 0.0}))
    LlamaAdapterModel(base, tokenizer, AdapterConfig(method="series", **SMALL))  # on the same base, after it
    randomize(dylora)
    assert {id(p) for p in dylora.parameters() if p.requires_grad} == {id(p) for p in dylora.adapter_state().values()}
    step = next(s for s in range(1, 50) if int(torch.randint(1, 5, (), generator=torch.Generator().manual_seed(s))) < 4)
    rank = int(torch.randint(1, 5, (), generator=torch.Generator().manual_seed(step)))
    dylora.method.begin_step(step)
    dylora.train()
    ids, mask = batch(tokenizer)
    trained = dylora(ids, mask)

    reference = make_base()
    state = dylora.adapter_state()
    for path, module in reference.model.named_modules():
        if path.rsplit(".", 1)[-1] in dylora.config.lora_targets:
            a, b = state[f"{path}.lora_A"].detach()[:rank], state[f"{path}.lora_B"].detach()[:, :rank]
            module.weight.data += (b @ a) * (dylora.config.lora_alpha / rank)  # W + (alpha / b) B[:, :b] A[:b]
    torch.testing.assert_close(trained, reference(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
    dylora.to(torch.float64)
    assert {p.dtype for p in dylora.adapter_state().values()} == {torch.float64}


def test_an_adapter_that_fails_to_build_or_load_leaves_the_base_as_it_was(make_base, tokenizer, tmp_path):
    base = make_base()
    with pytest.raises(ValueError, match="no module of the base model has such a name"):
        LlamaAdapterModel(base, tokenizer, AdapterConfig(method="dylora", lora_targets=("w_proj",)))
    assert hooks(base) == 0 and base.config._attn_implementation == "sdpa"
    first = LlamaAdapterModel.from_base(_saved_base(make_base, tokenizer, tmp_path), device="cpu")
    first.save(tmp_path / "adapter")
    (tmp_path / "adapter" / WEIGHTS_NAME).write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LlamaAdapterModel.load(tmp_path / "adapter", alongside=first)
    assert list(first.shared.adapters) == ["llama-adapter"]


def test_one_shared_base_per_model_object_freed_with_it(make_base, tokenizer):
    base = make_base()
    assert SharedBase.of(base, tokenizer) is SharedBase.of(base, tokenizer)
    assert SharedBase.of(make_base(), tokenizer) is not SharedBase.of(base, tokenizer)
    models = [LlamaAdapterModel(base, tokenizer, AdapterConfig(method=m, **SMALL)) for m in SHARING]
    freed = weakref.ref(base)
    del base, models
    assert collected(freed)  # nothing global keeps a base (and its adapters) alive


def collected(ref: weakref.ref) -> bool:
    """Whether the object is freed once the garbage collector has run. `gc.collect()` does nothing while another
    thread is collecting (threads an earlier test left, a server's, run Python too), so one call proves nothing."""
    for _ in range(20):
        gc.collect()
        if ref() is None:
            return True
        time.sleep(0.05)
    return False


def _saved_base(make_base, tokenizer, tmp_path) -> str:
    make_base().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")
