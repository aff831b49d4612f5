"""LLaMA-Adapter V2: the same logits as litgpt's adapter_v2 for the same values, zero-init exactness with images,
early fusion, the demo, joint training that changes only each kind of batch's own parameters (and resumes), and
folding. Training, saving and loading every method, V2 among them: test_methods.py; the eval command with V2:
test_evaluation.py."""

import json
from pathlib import Path

import pytest
import torch
from conftest import write_image
from litgpt.adapter_v2 import GPT, Config
from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
from test_methods import batch  # two rows of random tokens, the second left-padded
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llama_adapter import AdapterConfig, cli, merge
from llama_adapter.config import SamplingConfig, VisualConfig
from llama_adapter.data.templates import format_prompt
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving.generation import generate_batch
from llama_adapter.train import checkpoint, loop
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

V2 = {"method": "llama-adapter-v2", "adapter_len": 3}


def v2(base, tokenizer, visual: VisualConfig | None = None, **settings) -> LlamaAdapterModel:
    torch.manual_seed(1000)
    return LlamaAdapterModel(base, tokenizer, AdapterConfig(**(V2 | {"adapter_layers": 2} | settings)), visual)


def randomize(model: LlamaAdapterModel, seed: int = 0) -> None:
    """Every V2 parameter away from its start: prompts, gates, biases, scales around 1, norm shifts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.adapter_state().items():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if name.endswith("adapter_scale") else noise * (1 if "prompt" in name else 0.3))


# ----------------------------------------------------------------------------------------------------------
# litgpt's adapter_v2, the peer


def litgpt_copy(ours: LlamaAdapterModel) -> GPT:
    """litgpt's adapter_v2 GPT with our base's weights and our adapter's values, converted where litgpt differs:

    - its gate is used as it is, ours through tanh: its gating_factor = tanh(our gate);
    - it fuses q, k and v into one linear layer, rows interleaved per key/value group (q of the group, k, v), so
      our three biases and scales are interleaved alike;
    - it trains the norms' weights themselves: its weight = the base's + our shift;
    - it also tunes the vocabulary projection (lm_head), which we leave frozen: its lm_head tuning stays at rest.
    """
    base, config = ours.base, ours.base.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_size = config.hidden_size // heads
    lit = GPT(
        Config(
            block_size=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            padded_vocab_size=config.vocab_size,
            n_layer=config.num_hidden_layers,
            n_embd=config.hidden_size,
            n_head=heads,
            n_query_groups=groups,
            head_size=head_size,
            intermediate_size=config.intermediate_size,
            mlp_class_name="LLaMAMLP",
            norm_class_name="RMSNorm",
            norm_eps=config.rms_norm_eps,
            bias=False,
            parallel_residual=False,
            rotary_percentage=1.0,
            rope_base=config.rope_parameters["rope_theta"],
            adapter_prompt_length=ours.config.adapter_len,
            adapter_start_layer=config.num_hidden_layers - ours.config.adapter_layers,
        )
    ).eval()
    weights = {}
    copy_weights_hf_llama(lit.config, {}, weights, {k: v for k, v in base.state_dict().items() if "rotary" not in k})
    lit.load_state_dict(weights, strict=False)  # its adapter parameters are set below
    state = ours.adapter_state()

    def tuning(path: str) -> dict[str, torch.Tensor]:
        return {name: state[f"{path}.adapter_{name}"] for name in ("bias", "scale")}

    with torch.no_grad():
        for i, block in enumerate(lit.transformer.h):
            q, k, v = (tuning(f"layers.{i}.self_attn.{p}_proj") for p in "qkv")
            for name in ("bias", "scale"):
                per_group = [t[name].view(groups, -1) for t in (q, k, v)]
                getattr(block.attn.attn, f"adapter_{name}").copy_(torch.cat(per_group, dim=1).flatten())
            for module, path in [(block.attn.proj, "self_attn.o_proj"), (block.mlp.fc_1, "mlp.gate_proj"),
                                 (block.mlp.fc_2, "mlp.up_proj"), (block.mlp.proj, "mlp.down_proj")]:  # fmt: skip
                for name, tensor in tuning(f"layers.{i}.{path}").items():
                    getattr(module, f"adapter_{name}").copy_(tensor)
            for norm, path in [(block.norm_1, "input_layernorm"), (block.norm_2, "post_attention_layernorm")]:
                norm.weight.copy_(
                    base.model.layers[i].get_submodule(path).weight + state[f"layers.{i}.{path}.weight_shift"]
                )
            if i in ours.prompts:
                block.attn.adapter_wte.weight.copy_(state[f"layers.{i}.adapter_prompt"])
                block.attn.gating_factor.copy_(torch.tanh(state[f"layers.{i}.adapter_gate"]).view(1, 1, -1, 1))
            block.attn.adapter_kv_cache = None  # litgpt keeps the prompt's keys and values once computed
        lit.transformer.ln_f.weight.copy_(base.model.norm.weight + state["norm.weight_shift"])
    return lit


@pytest.mark.parametrize("groups", [2, 1, 4])  # grouped-query, multi-query, multi-head attention
def test_logits_equal_litgpt_adapter_v2_with_the_same_values(tokenizer, groups):
    """litgpt 0.5.4: from 0.5.5 (to 0.5.13 at least) its model lays the fused qkv out flat while its adapter still
    reads the prompt's keys and values in the interleaved layout, so with gates away from zero they are wrong rows."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=groups, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
        tie_word_embeddings=False,
    )  # fmt: skip
    base = LlamaForCausalLM._from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    ours = v2(base, tokenizer)  # prompts in the top two of three layers: the first layer has none in either
    ids = batch(tokenizer)[0][:1]
    with torch.no_grad():
        torch.testing.assert_close(litgpt_copy(ours)(ids), ours(ids), rtol=0, atol=1e-5)  # at rest
        randomize(ours)
        assert all(prompt.adapter_gate.abs().min() > 0 for prompt in ours.prompts.values())
        lit_logits, our_logits = litgpt_copy(ours)(ids), ours(ids)
    torch.testing.assert_close(lit_logits, our_logits, rtol=0, atol=1e-5)
    with ours.disabled(), torch.no_grad():
        assert (our_logits - base(ids).logits).abs().max() > 1  # the values matter: far from the base


def test_the_prompts_cached_keys_follow_a_change_of_the_key_and_value_tuning_alone(make_base, tokenizer):
    """Answering caches each prompt's keys and values; V2's k and v bias and scale make them, so they must renew it."""
    model = v2(make_base(initializer_range=0.2), tokenizer)
    randomize(model)
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        before = model(ids, mask)  # caches
        model.method.bias_scales[model.method.linear_paths.index("layers.3.self_attn.v_proj")].adapter_bias.add_(1.0)
        after = model(ids, mask)
        for prompt in model.prompts.values():
            prompt._cached_kv = None
        torch.testing.assert_close(after, model(ids, mask), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Images: zero-init and early fusion


def test_a_fresh_multimodal_v2_is_exactly_the_base_with_or_without_images(make_base, tokenizer, tiny_clip, images):
    ids, mask = batch(tokenizer)
    expected = make_base()(input_ids=ids, attention_mask=mask).logits
    model = v2(make_base(), tokenizer, VisualConfig(clip_model=tiny_clip), adapter_layers=3, visual_layers=2)
    features = model.encode_images(images)
    assert torch.equal(model(ids, mask), expected)
    assert torch.equal(model(ids, mask, features), expected)


def test_the_image_reaches_only_the_first_v_adapted_layers(make_base, tokenizer, tiny_clip, images):
    """V = 2 of L = 3 adapted layers (1, 2, 3 of 0-3) take the image; layer 3's prompts stay text-only."""
    model = v2(
        make_base(initializer_range=0.2),
        tokenizer,
        VisualConfig(clip_model=tiny_clip),
        adapter_layers=3,
        visual_layers=2,
    )
    assert {layer: prompt.takes_image for layer, prompt in model.prompts.items()} == {1: True, 2: True, 3: False}
    randomize(model)
    ids, mask = batch(tokenizer)
    features = model.encode_images(images)
    with torch.no_grad():
        assert (model(ids, mask, features) - model(ids, mask)).abs().max() > 1e-2
        for layer in (1, 2):
            model.prompts[layer].adapter_gate.zero_()
        torch.testing.assert_close(model(ids, mask, features), model(ids, mask), rtol=0, atol=0)


def test_a_multimodal_v2_round_trips_through_its_folder(tiny_base_dir, tiny_clip, images, tmp_path):
    visual = VisualConfig(clip_model=tiny_clip)
    model = LlamaAdapterModel.from_base(
        str(tiny_base_dir), AdapterConfig(**V2, visual_layers=2), device="cpu", visual=visual
    )
    randomize(model)
    model.save(tmp_path / "v2")
    loaded = LlamaAdapterModel.load(tmp_path / "v2", device="cpu")
    assert loaded.config == model.config  # L = 30 clamped to the tiny base's 4 layers; V = 2 of them see the image
    assert [prompt.takes_image for prompt in loaded.prompts.values()] == [True, True, False, False]
    ids, mask = batch(model.tokenizer)
    features = model.encode_images(images)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, features), model(ids, mask, features), rtol=0, atol=0)


def test_the_demo_answers_about_an_image_with_a_v2_adapter(make_base, tokenizer, tiny_clip, images):
    from llama_adapter.serving import demo

    visual = VisualConfig(clip_model=tiny_clip)
    model = v2(make_base(initializer_range=0.3), tokenizer, visual, adapter_layers=3, visual_layers=3)
    randomize(model)
    with torch.no_grad():
        for prompt in model.prompts.values():
            prompt.adapter_gate.fill_(2.0)  # open: the image then changes the greedy answer
    message = {"text": "What colour is it?", "files": [{"path": str(images[0])}]}
    *_, (_, turns, notes, _) = demo._Chat({"v2": model}).send(message, [], "v2", 0.0, 1.0, 12)
    features = model.encode_images([images[0]])
    prompt = format_prompt("What colour is it?")
    want = generate_batch(model, [prompt], SamplingConfig(max_new_tokens=12), features)[0]
    assert turns[-1]["answer"] == want and not notes
    assert want != generate_batch(model, [prompt], SamplingConfig(max_new_tokens=12))[0]  # the image mattered


# ----------------------------------------------------------------------------------------------------------
# Joint training on disjoint parameters


@pytest.fixture
def joint_data(tmp_path, monkeypatch):
    """Instruction rows (text) and image-text rows, each image a coloured square named by its caption."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the run's image features go here
    colours = ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy"]
    text = [{"instruction": f"Repeat the word {c}.", "input": "", "output": f"{c} {c}"} for c in colours]
    captions = []
    for c in colours:
        write_image(tmp_path / f"{c}.png", c)
        captions.append({"instruction": "What colour is the square?", "input": "", "output": c, "image": f"{c}.png"})
    (tmp_path / "text.json").write_text(json.dumps(text))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path


def joint_config(folder, out, **settings) -> TrainConfig:
    return TrainConfig(
        **{"data": str(folder / "text.json"), "image_data": str(folder / "captions.json"), "out": str(out),
           "epochs": 2, "batch_size": 2, "lr": 0.05, "val_fraction": 0.25, "warmup": 0.0} | settings
    )  # fmt: skip


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.adapter_state().items()}


def test_each_kind_of_batch_changes_only_its_own_parameters(make_base, tokenizer, tiny_clip, joint_data):
    """Step 1 is an instruction step, step 2 an image-text one (ratio 1): the first changes the late prompts, the
    biases, scales and norms and nothing else; the second the visual projection and the early prompts alone."""
    visual = VisualConfig(clip_model=tiny_clip)
    steps = []
    for max_steps in (1, 2):
        model = v2(make_base(), tokenizer, visual, adapter_layers=3, visual_layers=1)
        randomize(model)  # every gradient away from zero: at rest, a zero gate would stop some
        before = snapshot(model)
        train(joint_config(joint_data, joint_data / f"run{max_steps}", max_steps=max_steps), model.config, model,
              visual_cfg=visual)  # fmt: skip
        steps.append(snapshot(model))
    image_side = model.image_parameter_names()
    assert image_side == {"layers.1.adapter_prompt", "layers.1.adapter_gate"} | {
        f"visual_proj.{name}" for name in ("linear.weight", "linear.bias", "norm.weight", "norm.bias")
    }
    moved = [{name for name in before if not torch.equal(a[name], b[name])} for a, b in [(before, steps[0]), steps]]
    assert moved[0] == set(before) - image_side
    assert moved[1] == image_side


def test_a_joint_run_that_dies_resumes_to_the_uninterrupted_adapter(make_base, tokenizer, tiny_clip, joint_data,
                                                                    monkeypatch):  # fmt: skip

    visual = VisualConfig(clip_model=tiny_clip)
    whole = v2(make_base(), tokenizer, visual, visual_layers=1)
    train(joint_config(joint_data, joint_data / "whole", image_ratio=0.5), whole.config, whole, visual_cfg=visual)

    real, calls = loop.train_step, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # steps 1-4 done (text, text, image, text); checkpoints after steps 3 and 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying)
    cut = v2(make_base(), tokenizer, visual, visual_layers=1)
    cfg = joint_config(joint_data, joint_data / "cut", image_ratio=0.5, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, cut.config, cut, visual_cfg=visual)
    state = checkpoint.read_state(checkpoint.latest(cfg.out))["progress"]
    assert (state["step"], state["image_steps"]) == (4, 1)
    monkeypatch.setattr(loop, "train_step", real)
    resumed = v2(make_base(), tokenizer, visual, visual_layers=1)
    summary = train(cfg, resumed.config, resumed, visual_cfg=visual)
    assert summary["resumed_from_step"] == 4
    for name, param in whole.adapter_state().items():
        torch.testing.assert_close(resumed.adapter_state()[name], param, rtol=0, atol=0, msg=name)


def test_image_data_needs_v2_a_clip_and_an_image_in_every_row(make_base, tokenizer, tiny_clip, joint_data):
    v1 = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
    with pytest.raises(ValueError, match="needs --method llama-adapter-v2 and --clip-model"):
        train(joint_config(joint_data, joint_data / "v1"), v1.config, v1, visual_cfg=VisualConfig(clip_model=tiny_clip))
    rows = json.loads((joint_data / "captions.json").read_text())
    del rows[2]["image"]
    (joint_data / "captions.json").write_text(json.dumps(rows))
    visual = VisualConfig(clip_model=tiny_clip)
    model = v2(make_base(), tokenizer, visual)
    with pytest.raises(ValueError, match=r"captions.json: row 3 has no image"):
        train(joint_config(joint_data, joint_data / "v2"), model.config, model, visual_cfg=visual)


# ----------------------------------------------------------------------------------------------------------
# Folding biases, scales and norms into the weights


def test_folding_gives_a_plain_model_and_a_prompt_adapter_with_the_same_logits(tiny_base_dir, tmp_path, capsys):
    model = LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(**V2), device="cpu")
    randomize(model)
    model.save(tmp_path / "v2")
    ids, mask = batch(model.tokenizer)
    with torch.no_grad():
        expected = model(ids, mask)
        folded = merge.folded(model)
        assert folded.config.method == "llama-adapter" and folded.base.config.attention_bias
        torch.testing.assert_close(folded(ids, mask), expected, rtol=1e-5, atol=1e-5)
        with folded.disabled():  # the plain folded model: the prompts matter
            assert (expected - folded.base(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3

    cli.main(["merge", "--adapter", str(tmp_path / "v2"), "--out", str(tmp_path / "merged")])
    assert "folded into its weights" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain) is LlamaForCausalLM and plain.config.mlp_bias
    prompts = LlamaAdapterModel.load(tmp_path / "merged" / "prompts", device="cpu")
    assert prompts.config.method == "llama-adapter"
    with torch.no_grad():
        torch.testing.assert_close(prompts(ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_merge_records_the_merged_base_so_its_prompts_load_from_any_folder(tiny_base_dir, tmp_path, monkeypatch):
    LlamaAdapterModel.from_base(str(tiny_base_dir), AdapterConfig(**V2), device="cpu").save(tmp_path / "v2")
    monkeypatch.chdir(tmp_path)
    cli.main(["merge", "--adapter", "v2", "--out", "v2m"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prompts = LlamaAdapterModel.load(tmp_path / "v2m" / "prompts", device="cpu")
    assert Path(prompts.base.name_or_path) == (tmp_path / "v2m").resolve()  # as recorded: the folder, absolute


def test_folding_a_multimodal_v2_keeps_its_early_fusion(make_base, tokenizer, tiny_clip, images):
    model = v2(make_base(), tokenizer, VisualConfig(clip_model=tiny_clip), adapter_layers=3, visual_layers=1)
    randomize(model)
    ids, mask = batch(tokenizer)
    features = model.encode_images(images)
    with torch.no_grad():
        folded = merge.folded(model)
        assert folded.config.method == "llama-adapter-v2"  # its tuning at rest; its prompts as they were
        torch.testing.assert_close(folded(ids, mask, features), model(ids, mask, features), rtol=1e-5, atol=1e-5)


def test_a_model_type_without_bias_switches_refuses_to_fold(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = v2(MistralForCausalLM._from_config(config).eval(), tokenizer)
    with pytest.raises(ValueError, match=r"self_attn.q_proj of a mistral model has no bias.*llama only"):
        merge.folded(model)
