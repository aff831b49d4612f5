"""The adapter's math on a tiny random LLaMA: zero-init identity, the paper's formula, GQA, gradients, caching, loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llama_adapter import AdapterConfig
from llama_adapter.base import routing
from llama_adapter.data.batching import collate
from llama_adapter.data.encoding import IGNORE_INDEX, encode
from llama_adapter.model import LlamaAdapterModel

IMPLEMENTATIONS = ["eager", "sdpa"]
KV_HEADS = {"gqa": 2, "mha": 4, "mqa": 1}


def random_batch(vocab_size, batch=2, length=11, seed=0):
    """Token ids avoiding the special tokens, and a mask with right padding on the last row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, length - 3 :] = 0
    return ids, mask


@pytest.mark.parametrize("kv_heads", KV_HEADS.values(), ids=KV_HEADS.keys())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_zero_gates_reproduce_the_base_exactly(make_base, tokenizer, impl, kv_heads):
    base = make_base(impl, num_key_value_heads=kv_heads)
    ids, mask = random_batch(len(tokenizer))
    with torch.no_grad():
        expected_masked = base(input_ids=ids, attention_mask=mask).logits
        expected_unmasked = base(input_ids=ids).logits

    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=4, adapter_layers=3))
    # The adapter must really be in the forward path, or exact equality would prove nothing.
    assert base.config._attn_implementation != impl
    with torch.no_grad():
        assert torch.equal(model(ids, mask), expected_masked)
        assert torch.equal(model(ids), expected_unmasked)
        for prompt in model.prompts.values():
            prompt.adapter_gate.fill_(0.5)
        assert not torch.allclose(model(ids), expected_unmasked, atol=1e-3)


@pytest.mark.parametrize("kv_heads", KV_HEADS.values(), ids=KV_HEADS.keys())
def test_eager_and_sdpa_agree_with_nonzero_gates(make_model, make_base, tokenizer, randomize_adapter, kv_heads):
    eager = make_model("eager", adapter_len=5, adapter_layers=3, num_key_value_heads=kv_heads)
    sdpa = make_model("sdpa", adapter_len=5, adapter_layers=3, num_key_value_heads=kv_heads)
    randomize_adapter(eager, seed=1)
    randomize_adapter(sdpa, seed=1)
    ids, mask = random_batch(len(tokenizer))
    with torch.no_grad():
        base_logits = make_base("eager", num_key_value_heads=kv_heads)(input_ids=ids, attention_mask=mask).logits
        out_eager, out_sdpa = eager(ids, mask), sdpa(ids, mask)

    real = mask.bool()  # padded positions' outputs are unused, implementations may differ there
    torch.testing.assert_close(out_sdpa[real], out_eager[real], atol=2e-6, rtol=1e-5)
    assert (out_eager[real] - base_logits[real]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# The paper's formula, written out independently of the library


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_attention(attn, rotary, hidden, prompt=None, gate=None):
    """Causal self-attention of one LLaMA layer plus, if a prompt is given, LLaMA-Adapter's gated prompt attention:

    o_proj( softmax(QK^T/sqrt(d) + causal) V  +  tanh(g_h) softmax(Q (P W_k)^T / sqrt(d)) (P W_v) )

    with rotary position embedding on Q and K only, never on the prompt's keys.
    """
    batch, length, _ = hidden.shape
    cfg = attn.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    group = heads // kv_heads

    def split(x, n):  # (..., n*d) -> (..., n, seq, d)
        return x.view(*x.shape[:-1], n, d).transpose(-3, -2)

    q = split(attn.q_proj(hidden), heads)
    k = split(attn.k_proj(hidden), kv_heads)
    v = split(attn.v_proj(hidden), kv_heads)
    positions = torch.arange(length).expand(batch, length)
    cos, sin = (t.unsqueeze(1) for t in rotary(hidden, positions))
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    # Query head h reads key/value head h // group.
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    if prompt is not None:
        pk = split(attn.k_proj(prompt), kv_heads).repeat_interleave(group, dim=0)  # (H, K, d)
        pv = split(attn.v_proj(prompt), kv_heads).repeat_interleave(group, dim=0)
        prompt_probs = (q @ pk.transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # its own softmax, no mask
        out = out + torch.tanh(gate).view(1, heads, 1, 1) * (prompt_probs @ pv)

    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, heads * d))


@pytest.mark.parametrize("kv_heads", KV_HEADS.values(), ids=KV_HEADS.keys())
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_attention_matches_the_papers_formula(make_model, tokenizer, randomize_adapter, impl, kv_heads):
    model = make_model(impl, adapter_len=6, adapter_layers=2, num_key_value_heads=kv_heads)
    randomize_adapter(model, seed=2)
    layers = model.base.model.layers
    adapted, plain = len(layers) - 1, 0
    assert adapted in model.prompts and plain not in model.prompts

    captured = {}

    def capture(index):
        def hook(module, args, kwargs, output):
            captured[index] = (kwargs["hidden_states"], output[0])

        return hook

    handles = [layers[i].self_attn.register_forward_hook(capture(i), with_kwargs=True) for i in (adapted, plain)]
    ids, _ = random_batch(len(tokenizer), length=13)
    with torch.no_grad():
        model(ids)
        for handle in handles:
            handle.remove()

        rotary = model.base.model.rotary_emb
        prompt = model.prompts[adapted]
        hidden, actual = captured[adapted]
        expected = reference_attention(
            layers[adapted].self_attn, rotary, hidden, prompt.adapter_prompt, prompt.adapter_gate
        )
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        # Guard: the prompt term is large enough here that dropping it would fail the comparison above.
        without_prompt = reference_attention(layers[adapted].self_attn, rotary, hidden)
        assert (without_prompt - expected).abs().max() > 1e-3

        hidden, actual = captured[plain]
        torch.testing.assert_close(
            actual, reference_attention(layers[plain].self_attn, rotary, hidden), atol=1e-5, rtol=1e-5
        )


def test_bf16_base_keeps_fp32_adapter_parameters(make_base, tokenizer):
    base = make_base("sdpa").to(torch.bfloat16)
    ids, mask = random_batch(len(tokenizer))
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
    assert {p.dtype for p in model.adapter_state().values()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(ids, mask), expected)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    model.loss(ids, mask, labels).backward()
    top = model.prompts[3]
    assert top.adapter_gate.grad.dtype == torch.float32 and top.adapter_gate.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# Parameter bookkeeping


def test_llama_7b_shape_trainable_parameter_count():
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )  # fmt: skip
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    model = LlamaAdapterModel(base, None, AdapterConfig(adapter_len=10, adapter_layers=30))

    # The paper's 1.2M: 30 layers x 10 prompts x 4096, plus one gate per head per layer.
    assert model.num_trainable_parameters() == 1_228_800 + 30 * 32
    assert sorted(model.prompts) == list(range(2, 32))
    # The prompts must be registered in the module tree (so .to(), state_dict and optimizers see them).
    carried = {int(name.split(".")[2]) for name, _ in model.named_parameters() if "adapter_" in name}
    assert carried == set(range(2, 32))
    state = model.adapter_state()
    assert state["layers.31.adapter_prompt"].shape == (10, 4096)
    assert state["layers.2.adapter_gate"].shape == (32,)
    assert "layers.1.adapter_gate" not in state


def test_adapter_layers_clamped_to_depth(make_model):
    model = make_model(adapter_len=3, adapter_layers=100)
    assert model.config.adapter_layers == 4
    assert sorted(model.prompts) == [0, 1, 2, 3]
    assert model.num_trainable_parameters() == 4 * (3 * 64 + 4)


@pytest.mark.parametrize("field", ["adapter_len", "adapter_layers"])
def test_adapter_config_rejects_non_positive_sizes(field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**{field: 0})


def test_only_adapter_parameters_are_trainable(make_model):
    model = make_model(adapter_len=3, adapter_layers=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("adapter_prompt", "adapter_gate")) for name in trainable)
    assert len(trainable) == 2 * 2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == model.num_trainable_parameters()


# ----------------------------------------------------------------------------------------------------------
# Gradients and loss


def response_batch(tokenizer):
    """Two Alpaca examples of different lengths, right-padded, labels only on the responses."""
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi there"},
        {"instruction": "Count.", "input": "one two", "output": "three, four, five."},
    ]
    batch = collate([encode(tokenizer, row, max_len=256) for row in rows], tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the test needs right padding in the batch"
    return batch


def test_zero_init_gradients(make_model, tokenizer):
    """At tanh(0) = 0 the prompts get exactly zero gradient; only the gates can start to learn (the paper's point)."""
    model = make_model(adapter_len=4, adapter_layers=2)
    model.loss(**response_batch(tokenizer)).backward()

    assert all(p.grad is None for name, p in model.base.named_parameters() if "adapter_" not in name)
    for prompt in model.prompts.values():
        assert prompt.adapter_prompt.grad is not None
        assert torch.count_nonzero(prompt.adapter_prompt.grad) == 0
        assert torch.all(prompt.adapter_gate.grad != 0)  # every head's gate can move off zero


def test_nonzero_gates_give_prompt_gradients(make_model, tokenizer, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=2)
    randomize_adapter(model)
    model.loss(**response_batch(tokenizer)).backward()
    top = model.prompts[model.base.config.num_hidden_layers - 1]
    assert top.adapter_prompt.grad.abs().sum() > 0
    assert all(torch.all(p.adapter_gate.grad != 0) for p in model.prompts.values())


def saved_for_backward(run, scope=None) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while `run()` executes (only inside `scope`'s forwards, if given)."""
    saved, inside = [], [scope is None]
    if scope is not None:
        scope.register_forward_pre_hook(lambda *args: inside.__setitem__(0, True))
        scope.register_forward_hook(lambda *args: inside.__setitem__(0, False))

    def pack(tensor):
        if inside[0]:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return saved


def test_gradient_checkpointing_gives_the_same_gradients_keeping_less(make_model, tokenizer, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=2)  # fewer adapted layers than the base has
    randomize_adapter(model)
    model.train()
    batch = response_batch(tokenizer)

    def gradients():
        model.zero_grad(set_to_none=True)
        model.loss(**batch).backward()
        return {name: p.grad.clone() for name, p in model.adapter_state().items()}

    kept = sum(t.numel() for t in saved_for_backward(lambda: model.loss(**batch)))
    expected = gradients()
    routing.enable_gradient_checkpointing(model.base)
    kept_checkpointed = sum(t.numel() for t in saved_for_backward(lambda: model.loss(**batch)))
    actual = gradients()
    assert kept_checkpointed < kept / 2
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)
    frozen = model.base.get_input_embeddings().weight
    assert not frozen.requires_grad and frozen.grad is None


def test_bf16_adapter_keeps_bf16_activations_but_its_softmax_normaliser(make_base, tokenizer, randomize_adapter):
    """No needless float32 copies: inside the adapter only the softmax's log-sum-exp per query is kept in float32."""
    model = LlamaAdapterModel(make_base("sdpa").to(torch.bfloat16), tokenizer, AdapterConfig(3, 2))
    randomize_adapter(model)
    batch = response_batch(tokenizer)
    saved = saved_for_backward(lambda: model.loss(**batch), scope=model.prompts[3])
    config = model.base.config
    heads, length = config.num_attention_heads, batch["input_ids"].shape[1]
    head_dim = config.hidden_size // heads
    assert any(t.dtype == torch.bfloat16 and t.shape == (2, heads, length, head_dim) for t in saved)  # the queries
    float32 = [t for t in saved if t.dtype == torch.float32 and t.numel() > heads]  # tanh(gate): H numbers
    assert [tuple(t.shape) for t in float32] == [(2, heads, length)]


def test_loss_is_mean_cross_entropy_on_response_tokens(make_model, tokenizer, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model)
    batch = response_batch(tokenizer)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        loss = model.loss(ids, mask, labels)
        logits = model(ids, mask)

    # Independent of the library: shift, then average over response tokens of all rows (padding is -100).
    shifted_logits, shifted_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)

    # Right padding must not leak: each row alone gives the same logits on its real tokens.
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        with torch.no_grad():
            alone = model(ids[row : row + 1, :n])
        torch.testing.assert_close(logits[row : row + 1, :n], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# KV cache


def greedy_without_cache(model, ids, steps, eos_id):
    """Argmax over a full forward pass each step: no cache, nothing carried between steps."""
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if next_id.item() == eos_id:
            break
    return ids


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_cached_greedy_generation_matches_uncached(make_model, tokenizer, randomize_adapter, impl):
    model = make_model(impl, adapter_len=4, adapter_layers=3)
    randomize_adapter(model, seed=3)
    ids = tokenizer("Tell me a story:", return_tensors="pt")["input_ids"]
    steps = 16
    with torch.no_grad(), model.use():
        cached = model.base.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, use_cache=True,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    expected = greedy_without_cache(model, ids, steps, tokenizer.eos_token_id)
    assert expected.shape[1] > ids.shape[1] + 4, "too few tokens generated for a meaningful comparison"
    assert torch.equal(cached, expected)


def test_prompt_keys_values_are_projected_once_per_generation(make_model, tokenizer, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model, seed=3)
    prompt_projections = []
    for layer in model.prompts:
        k_proj = model.base.model.layers[layer].self_attn.k_proj
        # Token inputs are (B, T, dim); the prompt of a text-only adapter is (K, dim).
        k_proj.register_forward_hook(lambda module, args, out: prompt_projections.append(args[0].dim() == 2))
    ids = tokenizer("Tell me a story:", return_tensors="pt")["input_ids"]
    with torch.no_grad(), model.use():
        model.base.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, min_new_tokens=8
        )
    assert sum(prompt_projections) == len(model.prompts)  # once per layer, not once per decoded token


def test_prompt_cache_follows_weight_updates(make_model, tokenizer, randomize_adapter):
    model = make_model(adapter_len=4, adapter_layers=3)
    randomize_adapter(model, seed=3)
    ids, mask = random_batch(len(tokenizer))

    def uncached():
        for prompt in model.prompts.values():
            prompt._cached_kv = None
        return model(ids, mask)

    optimizer = torch.optim.SGD(model.adapter_state().values(), lr=0.5)
    with torch.no_grad():
        before = model(ids, mask)
    model.loss(ids, mask, labels=ids).backward()  # gradients on: nothing cached, nothing stale
    optimizer.step()  # an in-place update of the prompts the cache was made from
    with torch.no_grad():
        after = model(ids, mask)
        assert not torch.allclose(after, before, atol=1e-4)
        assert torch.equal(after, uncached())
        for prompt in model.prompts.values():  # new data behind the same parameters, as loading or casting does
            prompt.adapter_prompt.data = torch.randn_like(prompt.adapter_prompt)
        swapped = model(ids, mask)
        assert not torch.allclose(swapped, after, atol=1e-4)
        assert torch.equal(swapped, uncached())
        for prompt in model.prompts.values():  # the gate alone: it is folded into the cached values
            prompt.adapter_gate.mul_(-1)
        flipped = model(ids, mask)
        assert not torch.allclose(flipped, swapped, atol=1e-4)
        assert torch.equal(flipped, uncached())
