"""Each call carries its adapter: which adapter runs is never state that another thread, or an earlier call, can
change under it. Each test here reproduces a bug of the design that kept an "active adapter" on the shared base."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from llama_adapter import AdapterConfig, LlamaAdapterModel, SamplingConfig
from llama_adapter.base import routing
from llama_adapter.data.batching import collate
from llama_adapter.data.encoding import encode
from llama_adapter.serving.batcher import Batcher
from llama_adapter.serving.rows import Job
from llama_adapter.train import checkpoint
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

ROWS = [
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
    {"instruction": "Count.", "input": "one two", "output": "three, four, five."},
]


def two_adapters(make_base, tokenizer, randomize_adapter):
    """Adapters A and B, both with moving prompts, on one base object."""
    base = make_base()
    a = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=3))
    b = LlamaAdapterModel(base, tokenizer, AdapterConfig(adapter_len=3, adapter_layers=3))
    randomize_adapter(a, seed=1)
    randomize_adapter(b, seed=2)
    return a, b


def ids_and_mask(tokenizer):
    encoded = tokenizer(["Tell me a story:", "Hi."], return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def finishes(work, timeout: float = 30.0):
    """Runs `work()` in a thread; its result, or a failure if it has not returned within `timeout` seconds."""
    result, failure = [], []

    def run():
        try:
            result.append(work())
        except BaseException as err:  # noqa: BLE001 - handed to the test
            failure.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s: a deadlock"
    if failure:
        raise failure[0]
    return result[0]


def test_checkpointed_gradients_are_the_adapters_own_while_another_thread_runs_another(
    make_base, tokenizer, randomize_adapter
):
    """Between A's forward pass and its backward pass (which recomputes each layer under gradient checkpointing),
    another thread answers with B on the same base: A's gradients stay A's."""
    a, b = two_adapters(make_base, tokenizer, randomize_adapter)
    batch = collate([encode(tokenizer, row, max_len=256) for row in ROWS], tokenizer.pad_token_id)
    ids, mask = ids_and_mask(tokenizer)
    a.train()

    def gradients(between=None) -> dict[str, torch.Tensor]:
        a.zero_grad(set_to_none=True)
        loss = a.loss(**batch)
        if between is not None:
            finishes(between)
        loss.backward()
        return {name: p.grad.clone() for name, p in a.adapter_state().items()}

    expected = gradients()
    routing.enable_gradient_checkpointing(a.base)  # each layer recomputed in the backward pass

    def answer_with_b():
        with torch.no_grad():
            return b(ids, mask)

    actual = gradients(between=answer_with_b)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_generate_inside_disabled_or_another_adapters_block_returns(make_base, tokenizer, randomize_adapter):
    a, b = two_adapters(make_base, tokenizer, randomize_adapter)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    plain = LlamaAdapterModel(make_base(), tokenizer)  # zero gates: the plain base
    expected = plain.generate("Name a colour.", sampling=sampling)
    assert a.generate("Name a colour.", sampling=sampling) != expected  # the adapter changes the answer

    def disabled():
        with a.disabled():
            return a.generate("Name a colour.", sampling=sampling)

    assert finishes(disabled) == expected

    def inside_b():
        with b.shared.use(b.method):
            return a.generate("Name a colour.", sampling=sampling)

    assert finishes(inside_b) == a.generate("Name a colour.", sampling=sampling)


def test_disabled_holds_for_every_call_in_its_block(make_base, tokenizer, randomize_adapter):
    a, _ = two_adapters(make_base, tokenizer, randomize_adapter)
    ids, mask = ids_and_mask(tokenizer)
    with torch.no_grad():
        plain = LlamaAdapterModel(make_base(), tokenizer).base(input_ids=ids, attention_mask=mask).logits
        adapted = a(ids, mask)
        assert (adapted - plain).abs().max() > 1e-3
        with a.disabled():
            torch.testing.assert_close(a(ids, mask), plain, rtol=1e-5, atol=1e-5)  # the adapter model's own call
            torch.testing.assert_close(a.base(input_ids=ids, attention_mask=mask).logits, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(ids, mask), adapted, rtol=0, atol=0)  # and after the block, adapted again


def test_a_nested_block_gives_back_the_adapter_of_the_block_around_it(make_base, tokenizer, randomize_adapter):
    a, b = two_adapters(make_base, tokenizer, randomize_adapter)
    ids, mask = ids_and_mask(tokenizer)
    base = a.base
    with torch.no_grad():
        as_a, as_b = a(ids, mask), b(ids, mask)
        assert (as_a - as_b).abs().max() > 1e-3
        with a.shared.use(a.method):
            with b.shared.use(b.method):
                torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).logits, as_b, rtol=0, atol=0)
            torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).logits, as_a, rtol=0, atol=0)
            with a.disabled():
                b(ids, mask)  # another adapter's call inside changes nothing for the block
                plain = base(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).logits, as_a, rtol=0, atol=0)
        assert (plain - as_a).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_the_batcher_refuses_an_adapter_with_virtual_tokens_instead_of_serving_the_plain_base(
    make_base, tokenizer, method
):
    model = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method=method, adapter_len=3))
    with pytest.raises(ValueError, match=r"cannot batch p: .*virtual tokens"):
        Batcher({"p": model}, max_batch=4, queue=4)


def test_checkpoints_keep_each_parameters_optimizer_moments_under_its_own_name(
    make_base, tokenizer, rows_file, tmp_path
):
    """V2 trains its scales without weight decay, in a second parameter group: each parameter's AdamW moments must
    still be saved under that parameter's name."""
    model = LlamaAdapterModel(make_base(), tokenizer, AdapterConfig(method="llama-adapter-v2", adapter_layers=2))
    config = TrainConfig(data=str(rows_file), out=str(tmp_path / "run"), max_steps=1, batch_size=4, val_fraction=0)
    train(config, model.config, model)
    folder = checkpoint.latest(tmp_path / "run")
    tensors, trained = load_file(folder / checkpoint.STATE_TENSORS), model.adapter_state()
    wrong = [name for name, p in trained.items() if tensors[f"optimizer.{name}.exp_avg"].shape != p.shape]
    assert not wrong
    # A bias starts at zero and, after one AdamW step, has moved against its gradient's sign, whose moment is
    # (1 - beta1) times the gradient: the moment saved under each bias's name is that bias's own.
    for name, p in trained.items():
        if name.endswith("adapter_bias"):
            moment = tensors[f"optimizer.{name}.exp_avg"]
            moved = p.detach() != 0
            assert moved.any() and torch.equal(moment[moved].sign(), -p.detach()[moved].sign()), name


def test_an_unseeded_sampled_request_leaves_the_process_random_stream_alone(make_base, tokenizer):
    model = LlamaAdapterModel(make_base(), tokenizer)
    done = threading.Event()

    def emit(text, finish=None, completion_tokens=None):
        if finish is not None:
            done.set()

    batcher = Batcher({"m": model}, max_batch=4, queue=4)
    try:
        torch.manual_seed(123)
        state = torch.get_rng_state()
        prompt = tokenizer("Hi.")["input_ids"]
        batcher.submit(Job("m", prompt, SamplingConfig(max_new_tokens=4, temperature=1.0), emit))
        assert done.wait(60)
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        batcher.close()
