"""The real embedded SmolLM2-135M-Instruct and the real Alpaca rows: zero-init, learning, checkpoints, generation."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama_adapter import DEFAULT_BASE, AdapterConfig, LlamaAdapterModel, SamplingConfig, VisualConfig
from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.base import loading
from llama_adapter.data import encoding, reading, templates
from llama_adapter.evaluation import scienceqa
from llama_adapter.train import distributed
from llama_adapter.train.loop import evaluate, train_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_cores")]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2() -> LlamaAdapterModel:
    torch.manual_seed(0)
    return LlamaAdapterModel.from_base(DEFAULT_BASE, device="cpu")


@pytest.fixture(scope="module")
def untrained() -> LlamaAdapterModel:
    """SmolLM2 with zero gates, which no test trains: the base model's own losses."""
    return LlamaAdapterModel.from_base(DEFAULT_BASE, device="cpu")


@pytest.fixture(scope="module")
def alpaca_rows(data_dir):
    return reading.load_rows(data_dir / "alpaca" / "alpaca_small.json")


def test_default_base_is_the_smollm2_from_the_wheel(smollm2):
    config = smollm2.base.config
    shape = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads)
    assert shape == (30, 576, 9, 3)
    assert smollm2.config.adapter_layers == 30
    assert smollm2.num_trainable_parameters() == 30 * (10 * 576 + 9)
    assert (loading.default_base_dir() / "model.safetensors").is_file()  # the dequantised cache later loads use


def test_zero_gates_equal_the_plain_base_model(smollm2):
    plain, tokenizer = loading.load_base(DEFAULT_BASE, torch.float32)
    ids = tokenizer([templates.format_prompt(QUESTION)], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(smollm2(ids), plain(input_ids=ids).logits)


def test_generation_answers_a_real_question(smollm2):
    answer = smollm2.generate(QUESTION, sampling=SamplingConfig(max_new_tokens=24))
    assert "Paris" in answer


def test_a_few_steps_on_real_alpaca_lower_the_loss(smollm2, alpaca_rows, tmp_path):
    examples, _ = encoding.encode_all(smollm2.tokenizer, alpaca_rows.select(range(8)), max_len=160)
    before = evaluate(smollm2, examples, batch_size=4, pad_id=smollm2.tokenizer.pad_token_id)
    after = loss_after_steps(smollm2, [examples[:4], examples[4:8]], lr=2e-2, steps=4)
    assert after < before - 0.05

    # The trained adapter round-trips through its checkpoint onto a freshly loaded base.
    smollm2.save(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 1_000_000  # adapter only: the base is 540 MB
    reloaded = LlamaAdapterModel.load(tmp_path, device="cpu")
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), smollm2(ids))


@pytest.mark.parametrize(
    ("method", "lr"),
    [
        ("lora", 1e-3),
        ("adalora", 1e-2),
        ("dylora", 1e-3),
        ("series", 1e-3),
        ("parallel", 1e-3),
        ("prefix", 3e-4),
        ("ptuning-v2", 3e-2),
        ("prompt", 3e-2),
    ],
)
def test_each_method_learns_real_math_rationales(untrained, data_dir, method, lr):
    """Three steps on two real math_data.json rows lower their loss; all but the virtual-token methods start as the
    base model. AdaLoRA's B diag(E) A starts from E = 0 and small A and B, so it needs ten times LoRA's rate."""
    rows = reading.load_rows(data_dir / "llm-adapters" / "math_data.json", skipped=[]).select(range(2))
    examples, _ = encoding.encode_all(untrained.tokenizer, rows, max_len=256)
    pad = untrained.tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlamaAdapterModel.from_base(DEFAULT_BASE, AdapterConfig(method=method), device="cpu")
    before = evaluate(model, examples, batch_size=4, pad_id=pad)
    if method not in ("prefix", "ptuning-v2", "prompt"):
        assert before == pytest.approx(evaluate(untrained, examples, batch_size=4, pad_id=pad), abs=1e-5)
    assert loss_after_steps(model, [examples], lr=lr, steps=3) < before - 0.05


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantised_smollm2_answers_and_its_adapter_learns(untrained, alpaca_rows, quantize):
    """The real model with 8- or 4-bit linear weights: far smaller, still right, and an adapter on it learns."""
    pytest.importorskip("bitsandbytes", reason="--quantize needs bitsandbytes (pip install 'llama-adapter[quantize]')")
    torch.manual_seed(0)
    model = LlamaAdapterModel.from_base(DEFAULT_BASE, device="cpu", quantize=quantize)
    ratio = model.base.get_memory_footprint() / untrained.base.get_memory_footprint()
    assert ratio < {"int8": 0.45, "nf4": 0.35}[quantize], ratio  # the tied 49152-token embedding stays fp32
    assert "Paris" in model.generate(QUESTION, sampling=SamplingConfig(max_new_tokens=24))

    examples, _ = encoding.encode_all(model.tokenizer, alpaca_rows.select(range(4)), max_len=128)
    before = evaluate(model, examples, batch_size=4, pad_id=model.tokenizer.pad_token_id)
    assert loss_after_steps(model, [examples], lr=1e-2, steps=3) < before - 0.05


def loss_after_steps(model: LlamaAdapterModel, batches: list, lr: float, steps: int) -> float:
    """Train `steps` AdamW steps, each over every batch in `batches`; then the loss over their examples."""
    pad = model.tokenizer.pad_token_id
    world = distributed.setup()
    loss_fn = distributed.prepare(model, world, fsdp=False)
    optimizer = torch.optim.AdamW(list(model.adapter_state().values()), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        train_step(loss_fn, batches, pad, None, world, model.device)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return evaluate(model, [example for batch in batches for example in batch], batch_size=4, pad_id=pad)


def test_chat_command_streams_an_answer():
    # pip puts the console script beside the interpreter; the venv need not be activated (not on PATH).
    script = Path(sys.executable).with_name("llama-adapter")
    assert script.is_file(), f"{script} missing: install the package with pip install -e ."
    done = subprocess.run(
        [str(script), "chat", "--max-new-tokens", "24", QUESTION],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_demo_app_answers_through_its_http_api():
    """`python demo/app.py` on the embedded model: a browser-less client asks a question and gets Paris."""
    from conftest import REPO_ROOT, free_port
    from gradio_client import Client

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "demo" / "app.py"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = _connect(f"http://127.0.0.1:{port}/", server, Client)
        message = {"text": QUESTION, "files": []}
        messages, notes, _ = client.predict(message, "base model (no adapter)", 0.0, 1.0, 24, api_name="/chat")
        assert "Paris" in messages[-1]["content"][0]["text"] and notes == ""
    finally:
        server.terminate()
        server.wait(timeout=30)


def _connect(url, server, client_class, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}: {server.stdout.read()}")
        try:
            return client_class(url, verbose=False, download_files=False)
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(1)
    pytest.fail(f"the demo did not answer at {url} within {timeout} s")


def test_train_module_entry_point_runs_on_real_data(data_dir, tmp_path):
    out = tmp_path / "run"
    data_file = data_dir / "alpaca" / "alpaca_small.json"
    flags = ["--max-steps", "2", "--batch-size", "2", "--max-len", "96", "--val-fraction", "0.002"]
    done = subprocess.run(
        [sys.executable, "-m", "llama_adapter.train", "--data", str(data_file), "--out", str(out), *flags],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
    assert '"steps": 2' in done.stdout


def test_real_scienceqa_image_through_a_zero_init_multimodal_adapter(data_dir):
    problems, _ = scienceqa.load_problems(data_dir / "scienceqa", "test", "problems_think_partial.json")
    problem = next(p for p in problems if p.image is not None)
    model = LlamaAdapterModel.from_base(DEFAULT_BASE, visual=VisualConfig(clip_model="ViT-B-32"), device="cpu")
    instruction, context = scienceqa.question_prompt(problem)
    ids = model.tokenizer([templates.format_prompt(instruction, context)], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        features = model.encode_images([problem.image])
        expected = loading.load_base(DEFAULT_BASE, torch.float32)[0](input_ids=ids).logits  # a plain SmolLM2
        assert torch.equal(model(ids, image_features=features), expected)  # zero gates: the image adds nothing yet
    sampling = SamplingConfig(max_new_tokens=12)
    answer = model.generate(instruction, context, sampling, image=problem.image)
    assert answer.strip() and answer == model.generate(instruction, context, sampling)
