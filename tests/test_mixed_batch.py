"""Rows of different adapters in one forward pass: each row answers what its adapter alone answers, token for token,
in the server's batcher (rows joining and leaving) and in the library's `generate_batch` over (adapter, prompt) pairs,
on every model type the adapter takes."""

import pytest
import torch
from conftest import write_image
from test_methods import SMALL, randomize
from transformers import AutoConfig, AutoModelForCausalLM

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig
from llama_adapter.base import routing, structure
from llama_adapter.config import VisualConfig
from llama_adapter.data.templates import format_prompt
from llama_adapter.serving.batcher import Batcher, _Batch
from llama_adapter.serving.generation import answer_batch, generate_batch
from llama_adapter.serving.rows import Job

PROMPTS = [
    format_prompt(text)
    for text in ("Hi.", "Name three colours of the sea at night.", "Count.", "What is it?", "Why?", "Tell me more.")
]


def tiny_base(model_type, tokenizer):
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)


def adapters(base, tokenizer, tiny_clip) -> dict[str, LlamaAdapterModel]:
    """v1, V2, a multimodal v1, a series bottleneck and DyLoRA, each with its own random values, and the plain base
    (a fresh adapter: zero gates), all on one base object."""
    settings = {
        "v1": (AdapterConfig(**SMALL), None),
        "v2": (AdapterConfig(method="llama-adapter-v2", **SMALL), None),
        "visual": (AdapterConfig(**SMALL), VisualConfig(clip_model=tiny_clip)),
        "series": (AdapterConfig(method="series", **SMALL), None),
        "dylora": (AdapterConfig(method="dylora", **SMALL | {"lora_dropout": 0.0}), None),
    }
    models = {}
    for seed, (name, (config, visual)) in enumerate(settings.items()):
        models[name] = LlamaAdapterModel(base, tokenizer, config, visual).eval()
        randomize(models[name], seed)
    return models | {"base": LlamaAdapterModel(base, tokenizer, AdapterConfig(**SMALL)).eval()}


def alone(model, prompt, length, image=None) -> str:
    features = None if image is None else image[None]
    return generate_batch(model, [prompt], SamplingConfig(max_new_tokens=length), features)[0]


@pytest.mark.parametrize("model_type", structure.MODEL_TYPES)
def test_rows_of_six_adapters_joining_and_leaving_one_batch_each_answer_as_alone(
    tokenizer, tiny_clip, tmp_path, model_type
):
    models = adapters(tiny_base(model_type, tokenizer), tokenizer, tiny_clip)
    image = models["visual"].encode_images([write_image(tmp_path / "red.png", "red")])[0]
    asked = [  # (model, prompt, length, image): the visual adapter twice, with and without its image
        ("visual", 3, 10, image), ("v1", 0, 16, None), ("base", 1, 6, None), ("v2", 2, 14, None),
        ("visual", 4, 12, None), ("series", 5, 9, None), ("dylora", 0, 11, None), ("v2", 5, 7, None),
    ]  # fmt: skip
    texts = [""] * len(asked)

    def job(i: int) -> Job:
        name, prompt, length, features = asked[i]

        def emit(text, finish=None, completion_tokens=None, **_):
            texts[i] += text

        tokens = tokenizer(PROMPTS[prompt])["input_ids"]
        return Job(name, tokens, SamplingConfig(max_new_tokens=length), emit, image=features)

    batch = _Batch(models)
    with torch.no_grad():
        batch.admit([job(0), job(1), job(2)])
        for _ in range(3):
            batch.step()
        batch.admit([job(3), job(4)])  # join three rows three tokens in: among them, by model
        for _ in range(4):
            batch.step()  # the base's row (6 tokens) leaves
        batch.admit([job(5), job(6), job(7)])
        assert len({row.job.model for row in batch.rows}) >= 5  # five adapters in one forward pass
        while batch.rows:
            batch.step()
    for i, (name, prompt, length, features) in enumerate(asked):
        assert texts[i] == alone(models[name], PROMPTS[prompt], length, features), (model_type, i, name)


def test_generate_batch_over_adapter_prompt_pairs_answers_each_as_alone(tokenizer, tiny_clip, tmp_path):
    models = adapters(tiny_base("llama", tokenizer), tokenizer, tiny_clip)
    image = models["visual"].encode_images([write_image(tmp_path / "blue.png", "blue")])[0]
    names = ["v2", "visual", "v1", "base", "visual", "v2", "series"]  # one adapter's rows apart from each other
    features = torch.stack([image if i == 1 else torch.zeros_like(image) for i in range(len(names))])
    has_image = torch.tensor([i == 1 for i in range(len(names))])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    sampling = SamplingConfig(max_new_tokens=12)
    together = answer_batch([models[n] for n in names], prompts, sampling, features, has_image)
    for i, name in enumerate(names):
        assert together[i].text == alone(models[name], prompts[i], 12, image if i == 1 else None), (i, name)
    assert together[1].text != together[4].text or prompts[1] != prompts[4]


def test_a_mixed_batch_refuses_rows_it_cannot_run_together(tokenizer, make_base):
    first, other = make_base(), make_base()
    a = LlamaAdapterModel(first, tokenizer, AdapterConfig(**SMALL))
    elsewhere = LlamaAdapterModel(other, tokenizer, AdapterConfig(**SMALL))
    with pytest.raises(ValueError, match="one base object"):
        generate_batch([a, elsewhere], PROMPTS[:2], SamplingConfig(max_new_tokens=2))
    prefix = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method="prefix", adapter_len=3))
    with pytest.raises(ValueError, match="2 models for 3 prompts"):
        generate_batch([prefix, prefix], PROMPTS[:3], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="text-only"):
        generate_batch([a], PROMPTS[:1], SamplingConfig(max_new_tokens=2), torch.zeros(1, 8), torch.tensor([True]))


def test_the_batcher_puts_the_adapters_of_one_base_in_one_batch_and_other_bases_in_turns(tokenizer, make_base):
    base = make_base()
    shared = {n: LlamaAdapterModel(base, tokenizer, AdapterConfig(**SMALL)) for n in ("a", "b", "c")}
    lora = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method="lora", **SMALL))  # rewrites its own base
    batcher = Batcher(shared | {"lora": lora}, max_batch=8, queue=8)
    try:
        assert [sorted(batch.models) for batch in batcher.batches] == [["a", "b", "c"], ["lora"]]
    finally:
        batcher.close()


def test_a_part_without_modules_runs_the_plain_base_beside_an_adapters_rows(tokenizer, make_base):
    """A call's rows can also run no adapter at all: the plain model's logits, beside another part's adapter."""
    base = make_base()
    v2 = LlamaAdapterModel(base, tokenizer, AdapterConfig(method="llama-adapter-v2", **SMALL))
    randomize(v2)
    ids = torch.randint(4, len(tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = v2(ids)
        with v2.shared.running([v2.part(slice(0, 2)), routing.Part(rows=slice(2, 3))]):
            mixed = base(input_ids=ids).logits
    torch.testing.assert_close(mixed[:2], adapted[:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2:], plain[2:], rtol=0, atol=1e-5)
    assert (adapted[2:] - plain[2:]).abs().max() > 1e-3  # the adapter would have changed that row
