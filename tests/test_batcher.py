"""The server's batcher without the server: rows that join and leave a decoding batch, on every model type."""

import pytest
import torch
from conftest import _randomize_adapter
from transformers import AutoConfig, AutoModelForCausalLM

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig, hf
from llama_adapter.batcher import Job, _Batch
from llama_adapter.data import format_prompt
from llama_adapter.generation import generate_batch


@pytest.mark.parametrize("model_type", hf.MODEL_TYPES)
def test_a_batch_that_rows_join_and_leave_decodes_each_as_alone(tokenizer, model_type):
    """Rows joining a batch mid-decode and leaving it early change no row's greedy answer, on every model type the
    adapter takes. gpt_oss attends in a sliding window of 128 in half its layers, and mistral here in one of 64: the
    prompts are longer, so those layers' caches hold only the window, and the rows' windows end at different places."""
    window = {"mistral": {"sliding_window": 64}}.get(model_type, {})
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, initializer_range=0.2, **window,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    model = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=2))
    _randomize_adapter(model)
    prompts = [format_prompt(text) for text in ("Hi.", "Name three colours of the sea at night.", "Count.")]
    lengths = (20, 6, 14)  # the second leaves first, while the others go on
    texts = ["", "", ""]

    def job(i: int) -> Job:
        def emit(text, finish=None, completion_tokens=None):
            texts[i] += text

        return Job("m", model.tokenizer(prompts[i])["input_ids"], lengths[i], emit)

    assert all(len(model.tokenizer(p)["input_ids"]) > 128 for p in prompts)
    batch = _Batch(model)
    with torch.no_grad():
        batch.admit([job(0), job(1)])
        for _ in range(4):
            batch.step()
        batch.admit([job(2)])  # joins two rows four tokens in
        while batch.rows:
            batch.step()
    for i, prompt in enumerate(prompts):
        assert texts[i] == generate_batch(model, [prompt], SamplingConfig(max_new_tokens=lengths[i]))[0], (
            model_type,
            i,
        )
