"""The adapter family behind --method: zero-init equivalence, the bottleneck formulas, PEFT parity, save/load,
training, LoRA merging and which adapters may share a base."""

import itertools

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llama_adapter import AdapterConfig, cli
from llama_adapter.base import loading
from llama_adapter.config import ModelConfig, VisualConfig
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving.logprobs import options_logprobs
from llama_adapter.serving.models import load_model
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

METHODS = [
    "llama-adapter",
    "llama-adapter-v2",
    "series",
    "parallel",
    "lora",
    "prefix",
    "ptuning-v2",
    "prompt",
    "adalora",
    "dylora",
]
SHARING = {
    "llama-adapter",
    "llama-adapter-v2",
    "series",
    "parallel",
    "dylora",
}  # leave the base's weights alone: may share one base
SMALL = {
    "lora_rank": 4,
    "bottleneck_size": 8,
    "adapter_len": 3,
    "adapter_layers": 2,
    "prefix_hidden_size": 16,
    "adalora_init_rank": 4,
    "adalora_target_rank": 2,
}


def adapter(make_base, tokenizer, method: str, seed: int = 0, **overrides) -> LlamaAdapterModel:
    torch.manual_seed(seed + 1000)
    return LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method=method, **(SMALL | overrides)))


def randomize(model: LlamaAdapterModel, seed: int = 0) -> None:
    """Every trainable tensor random, so that each method clearly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_state().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def batch(tokenizer):
    torch.manual_seed(7)
    ids = torch.randint(4, len(tokenizer), (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    return ids, mask


@pytest.mark.parametrize(
    "method", ["llama-adapter", "llama-adapter-v2", "series", "parallel", "lora", "adalora", "dylora"]
)
def test_a_fresh_adapter_is_exactly_the_base(make_base, tokenizer, method):
    ids, mask = batch(tokenizer)
    expected = make_base()(input_ids=ids, attention_mask=mask).logits
    model = adapter(make_base, tokenizer, method)
    assert torch.equal(model(ids, mask), expected)


@pytest.mark.parametrize("method", METHODS)
def test_a_trained_adapter_changes_the_output(make_base, tokenizer, method):
    ids, mask = batch(tokenizer)
    expected = make_base()(input_ids=ids, attention_mask=mask).logits
    model = adapter(make_base, tokenizer, method)
    randomize(model)
    assert (model(ids, mask) - expected).abs().max() > 1e-2


class _ReferenceMLP(nn.Module):
    """The formulas of the issue, written out: series h + f(h Wd) Wu, parallel h + f(x Wd) Wu, h = mlp(x)."""

    def __init__(self, mlp, down, up, parallel):
        super().__init__()
        self.mlp, self.down, self.up, self.parallel = mlp, down, up, parallel

    def forward(self, x):
        h = self.mlp(x)
        return h + torch.tanh((x if self.parallel else h) @ self.down.T) @ self.up.T


@pytest.mark.parametrize("method", ["series", "parallel"])
def test_bottleneck_adapters_follow_their_formulas(make_base, tokenizer, method):
    ids, mask = batch(tokenizer)
    model = adapter(make_base, tokenizer, method)
    randomize(model)
    reference = make_base()
    for idx, layer in enumerate(reference.model.layers):
        state = model.adapter_state()
        down, up = state[f"layers.{idx}.mlp.down.weight"], state[f"layers.{idx}.mlp.up.weight"]
        layer.mlp = _ReferenceMLP(layer.mlp, down.detach(), up.detach(), method == "parallel")
    expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, mask), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, make_base()(input_ids=ids, attention_mask=mask).logits, atol=1e-2)


def test_method_defaults_are_llm_adapters_and_parameter_counts_match(make_base, tokenizer):
    config = AdapterConfig()
    assert (config.lora_rank, config.lora_alpha, config.bottleneck_size, config.adapter_len) == (32, 64.0, 256, 10)
    assert config.lora_targets == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    hidden, inner, layers, kv = 64, 128, 4, 32  # the tiny base: 4 heads, 2 of them key/value heads of width 16
    counts = {m: adapter(make_base, tokenizer, m).num_trainable_parameters() for m in METHODS}
    r = SMALL["lora_rank"]
    lora_per_layer = r * (hidden + hidden) + 2 * r * (hidden + kv) + r * (hidden + inner) + r * (inner + hidden)
    assert counts == {
        "llama-adapter": SMALL["adapter_layers"] * (SMALL["adapter_len"] * hidden + 4),
        # v1's prompts; a bias and a scale per output of q, k, v, o, gate, up, down; a shift per norm (2 a layer, 1)
        "llama-adapter-v2": SMALL["adapter_layers"] * (SMALL["adapter_len"] * hidden + 4)
        + layers * 2 * (hidden + kv + kv + hidden + inner + inner + hidden)
        + (2 * layers + 1) * hidden,
        "series": layers * 2 * hidden * SMALL["bottleneck_size"],
        "parallel": layers * 2 * hidden * SMALL["bottleneck_size"],
        "lora": layers * lora_per_layer,
        "dylora": layers * lora_per_layer,
        # A, B and the singular values E of rank 4 on each of the five projections
        "adalora": layers * (lora_per_layer + 5 * SMALL["adalora_init_rank"]),
        "ptuning-v2": SMALL["adapter_len"] * layers * 2 * kv,
        # K embeddings of the key/value width through kv -> 16 -> (layers x 2 x kv), with biases
        "prefix": SMALL["adapter_len"] * kv + (kv + 1) * 16 + (16 + 1) * layers * 2 * kv,
        "prompt": SMALL["adapter_len"] * hidden,
    }


@pytest.mark.parametrize("method", ["prefix", "ptuning-v2", "prompt"])
def test_virtual_tokens_match_peft_forward_scoring_and_greedy_generation(make_base, tokenizer, method):
    ids, mask = batch(tokenizer)
    model = adapter(make_base, tokenizer, method)
    randomize(model)
    peft_logits = model.method.peft_model(input_ids=ids, attention_mask=mask).logits
    # Prompt tuning's outputs start with its K virtual positions; ours start at the input's first token.
    peft_logits = peft_logits[:, model.method.virtual_tokens :]
    torch.testing.assert_close(model(ids, mask), peft_logits, rtol=1e-5, atol=1e-5)

    # Scoring options after their cached (left-padded) prompts equals scoring each whole row alone.
    prompts, options = ["Q: 1 2", "Q: 3 4 5 6 7"], [["a", "bb c"], ["d e f"]]
    for prompt, texts, scores in zip(prompts, options, options_logprobs(model, prompts, options)):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for option, score in zip(texts, scores):
            cont = [*tokenizer(option, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            row = torch.tensor([prompt_ids + cont])
            logprobs = model(row, torch.ones_like(row)).log_softmax(-1)[0, len(prompt_ids) - 1 : -1]
            assert score == pytest.approx(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)

    # Cached greedy decoding picks, token by token, the argmax of our full forward.
    from llama_adapter.config import SamplingConfig
    from llama_adapter.data.templates import format_prompt

    answer = model.generate("Say hi.", sampling=SamplingConfig(max_new_tokens=6))
    row = tokenizer(format_prompt("Say hi."), return_tensors="pt")["input_ids"]
    for _ in range(6):
        row = torch.cat([row, model(row, torch.ones_like(row))[:, -1].argmax(-1, keepdim=True)], 1)
    expected = tokenizer.decode(row[0, -6:], skip_special_tokens=True)
    assert answer == expected
    assert answer != adapter(make_base, tokenizer, "llama-adapter").generate(
        "Say hi.", sampling=SamplingConfig(max_new_tokens=6)
    )


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(make_base, tokenizer, tiny_base_dir, tmp_path, method):
    ids, mask = batch(tokenizer)
    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method=method, **SMALL), device="cpu")
    randomize(model)
    model.save(tmp_path / "saved")
    loaded = LlamaAdapterModel.load(tmp_path / "saved", device="cpu")
    assert loaded.config.to_dict() == model.config.to_dict() and loaded.config.method == method
    torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=0, atol=0)
    header = 256 * len(model.adapter_state())  # safetensors' JSON header: a name, shape and offsets per tensor
    assert (tmp_path / "saved" / "adapter.safetensors").stat().st_size < 4 * model.num_trainable_parameters() + header


def test_saved_config_names_the_method_and_only_its_fields(tiny_base_dir, tmp_path):
    import json

    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="lora", lora_rank=4), device="cpu")
    model.save(tmp_path)
    saved = json.loads((tmp_path / "llama_adapter_config.json").read_text())["adapter"]
    assert saved == {
        "method": "lora",
        "lora_rank": 4,
        "lora_alpha": 64.0,
        "lora_dropout": 0.05,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    }


@pytest.mark.parametrize(
    ("method", "lr"),
    [
        ("llama-adapter", 0.2),
        ("llama-adapter-v2", 0.05),
        ("series", 0.02),
        ("parallel", 0.02),
        ("lora", 0.02),
        ("prefix", 0.02),
        ("ptuning-v2", 0.2),
        ("prompt", 0.05),
        ("adalora", 0.02),
        ("dylora", 0.02),
    ],
)
def test_a_few_training_steps_lower_the_loss(make_base, tokenizer, rows_file, tmp_path, method, lr):
    model = adapter(make_base, tokenizer, method)
    cfg = TrainConfig(
        data=str(rows_file), out=str(tmp_path), epochs=3, batch_size=4, grad_accum=1, lr=lr, val_fraction=0.25
    )
    summary = train(cfg, model.config, model)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05, summary
    reloaded = LlamaAdapterModel(make_base(), tokenizer, model.config)
    reloaded.load_adapter_weights(tmp_path / "adapter.safetensors")
    ids, mask = batch(tokenizer)
    torch.testing.assert_close(reloaded(ids, mask), model(ids, mask), rtol=0, atol=0)


def test_lora_merges_into_the_base_weights(tiny_base_dir, tmp_path, capsys):
    ids, mask = batch_tokens = batch(LlamaAdapterModel.from_base(str(tiny_base_dir), device="cpu").tokenizer)
    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="lora", lora_rank=4), device="cpu")
    randomize(model)
    model.save(tmp_path / "lora")
    unmerged = model(ids, mask)

    served = load_model(ModelConfig(base=str(tiny_base_dir), precision="fp32"), str(tmp_path / "lora"))
    assert all(module.merged for module in served.base.modules() if hasattr(module, "merged"))
    torch.testing.assert_close(served(ids, mask), unmerged, rtol=1e-5, atol=1e-5)

    cli.main(["merge", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])
    assert "folded into its weights" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert batch_tokens  # the same rows throughout


def test_only_lora_and_v2_merge(tiny_base_dir, tmp_path):
    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="series"), device="cpu")
    model.save(tmp_path / "series")
    with pytest.raises(SystemExit, match=r"series.*only llama-adapter-v2 and lora fold into the base"):
        cli.main(["merge", "--adapter", str(tmp_path / "series"), "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def test_bottleneck_and_prompt_adapters_share_a_base_and_peft_ones_get_their_own(tiny_base_dir, tmp_path, monkeypatch):
    ids, mask = batch(LlamaAdapterModel.from_base(str(tiny_base_dir), device="cpu").tokenizer)
    alone = {}
    for seed, method in enumerate(METHODS):
        model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method=method, **SMALL), device="cpu")
        randomize(model, seed)
        model.save(tmp_path / method)
        alone[method] = model(ids, mask)
    cfg = ModelConfig(base=str(tiny_base_dir), precision="fp32")
    first = load_model(cfg, str(tmp_path / "llama-adapter"))
    with monkeypatch.context() as patch:  # the others get a copy of first's base, not one read from disk again
        patch.setattr(loading, "load_base", lambda *args: pytest.fail(f"load_base{args}: a base read again"))
        models = {m: load_model(cfg, str(tmp_path / m), alongside=first) for m in METHODS[1:]}
    assert {m for m, model in models.items() if model.base is first.base} == SHARING - {"llama-adapter"}
    for _ in range(2):  # taking turns, in both orders
        for method, model in [("llama-adapter", first), *models.items()]:
            torch.testing.assert_close(model(ids, mask), alone[method], rtol=1e-5, atol=1e-5)


def test_methods_refuse_what_they_cannot_do(make_base, tokenizer, rows_file, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        AdapterConfig(method="ia3")
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        AdapterConfig(method="lora", lora_rank=0)
    with pytest.raises(ValueError, match="clip_model.*needs method 'llama-adapter'"):
        LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method="lora"), VisualConfig(clip_model="ViT-B-32"))
    with pytest.raises(ValueError, match=r"adalora_target_rank \(9\) must be <= adalora_init_rank \(8\)"):
        AdapterConfig(method="adalora", adalora_init_rank=8, adalora_target_rank=9)
    with pytest.raises(ValueError, match="lora_targets .'w_proj'.: no module of the base model has such a name"):
        LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method="dylora", lora_targets=("w_proj",)))
    cfg = TrainConfig(data=str(rows_file), out=str(tmp_path / "run"), gradient_checkpointing=True)
    for method in ("prefix", "ptuning-v2"):
        with pytest.raises(ValueError, match=f"--gradient-checkpointing does not work with --method {method}"):
            train(cfg, AdapterConfig(method=method))
    assert not (tmp_path / "run").exists()


def test_cli_trains_each_method_by_flag(tiny_base_dir, rows_file, tmp_path):
    import json

    for method in ["series", "lora"]:
        out = tmp_path / method
        args = ["train", "--data", str(rows_file), "--out", str(out), "--base", str(tiny_base_dir), "--max-steps", "2"]
        cli.main([*args, "--batch-size", "4", "--method", method, "--bottleneck-size", "16", "--lora-rank", "2"])
        saved = json.loads((out / "llama_adapter_config.json").read_text())["adapter"]
        assert saved["method"] == method
        assert saved.get("bottleneck_size", 16) == 16 and saved.get("lora_rank", 2) == 2


def test_dylora_answers_at_every_rank_by_its_formula(make_base, tokenizer):
    ids, mask = batch(tokenizer)
    model = adapter(make_base, tokenizer, "dylora")
    randomize(model)
    state = model.adapter_state()
    outputs = []
    for rank in range(1, SMALL["lora_rank"] + 1):
        model.method.set_rank(rank)
        reference = make_base()
        for path, module in reference.model.named_modules():
            if path.rsplit(".", 1)[-1] in model.config.lora_targets:
                a, b = state[f"{path}.lora_A"].detach()[:rank], state[f"{path}.lora_B"].detach()[:, :rank]
                delta = (b @ a) * (model.config.lora_alpha / rank)  # W + (alpha / b) B[:, :b] A[:b]
                module.weight.data += delta
        expected = reference(input_ids=ids, attention_mask=mask).logits
        outputs.append(model(ids, mask))
        torch.testing.assert_close(outputs[-1], expected, rtol=1e-4, atol=1e-4)
    assert all((x - y).abs().max() > 1e-3 for x, y in itertools.pairwise(outputs))  # each rank answers differently
    with pytest.raises(ValueError, match=r"dylora rank must be in 1..4 \(the adapter's lora_rank\), got 5"):
        model.method.set_rank(5)


def test_dylora_draws_one_rank_per_step_the_same_on_resuming(make_base, tokenizer):
    model = adapter(make_base, tokenizer, "dylora")
    loras = list(model.method.loras.values())
    draws = []
    for step in range(1, 41):
        model.method.begin_step(step)
        assert len({lora.training_rank for lora in loras}) == 1  # one rank for every projection in a step
        draws.append(loras[0].training_rank)
    assert set(draws) == {1, 2, 3, 4}
    again = adapter(make_base, tokenizer, "dylora")
    again.method.begin_step(17)
    assert next(iter(again.method.loras.values())).training_rank == draws[16]
    # Training mode uses the drawn rank; answering uses the chosen one (all of them unless set).
    ids, mask = batch(tokenizer)
    randomize(model)
    model.method.begin_step(draws.index(1) + 1)
    model.train()
    for lora in loras:
        lora.dropout.p = 0.0  # so that training mode differs from answering in the rank alone
    trained = model(ids, mask)
    model.eval()
    full = model(ids, mask)
    model.method.set_rank(1)
    torch.testing.assert_close(trained, model(ids, mask), rtol=0, atol=0)
    assert (full - trained).abs().max() > 1e-3


def test_adalora_penalty_is_peft_s_and_pruning_keeps_the_budget(make_base, tokenizer, rows_file, tmp_path):
    ids, mask = batch(tokenizer)
    model = adapter(make_base, tokenizer, "adalora")
    randomize(model)
    labels = ids.masked_fill(mask == 0, -100)
    # PEFT's AdaLoRA forward adds its penalty to the loss whenever labels are given; our loss adds it in training.
    with_penalty = model.method.peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    plain = model.loss(ids, mask, labels)
    assert model.method.penalty().item() == pytest.approx((with_penalty - plain).item(), rel=1e-4)
    model.train()
    model.method.peft_model.base_model.model.eval()  # no dropout: the same cross-entropy, plus the penalty
    assert model.loss(ids, mask, labels).item() == pytest.approx(with_penalty.item(), rel=1e-5)

    fresh = adapter(make_base, tokenizer, "adalora")
    cfg = TrainConfig(data=str(rows_file), out=str(tmp_path), epochs=5, batch_size=4, lr=0.02, val_fraction=0.25)
    train(cfg, fresh.config, fresh)
    singular = [p for name, p in fresh.adapter_state().items() if name.endswith("lora_E")]
    kept = sum(int((p != 0).sum()) for p in singular)
    # AdaLoRA's budget: the target rank on average over the adapted projections
    assert kept <= SMALL["adalora_target_rank"] * len(singular) < SMALL["adalora_init_rank"] * len(singular)
    assert kept > 0


def test_dylora_rank_flag_answers_with_fewer_ranks(tiny_base_dir, tmp_path, capsys):
    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="dylora", **SMALL), device="cpu")
    randomize(model)
    model.save(tmp_path / "dylora")
    ids, mask = batch(model.tokenizer)
    served = load_model(ModelConfig(base=str(tiny_base_dir), precision="fp32", dylora_rank=2), str(tmp_path / "dylora"))
    model.method.set_rank(2)
    torch.testing.assert_close(served(ids, mask), model(ids, mask), rtol=0, atol=0)
    cli.main(["chat", "Hi.", "--adapter", str(tmp_path / "dylora"), "--dylora-rank", "1", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.strip()
    base_alone = load_model(ModelConfig(base=str(tiny_base_dir), dylora_rank=2), None)  # the demo's base choice
    assert base_alone.config.method == "llama-adapter"
    lora = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(method="lora", lora_rank=2), device="cpu")
    lora.save(tmp_path / "lora")
    with pytest.raises(SystemExit, match="--dylora-rank: .* is a lora adapter, not a DyLoRA one"):
        cli.main(["chat", "Hi.", "--adapter", str(tmp_path / "lora"), "--dylora-rank", "1"])
