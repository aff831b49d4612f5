"""What the benchmarks share: the models they run on, the device they describe, and how results are written.

Models (`--model`):
  smollm2    the embedded SmolLM2-135M-Instruct, real weights (the default on CPU)
  llama-7b   LLaMA-7B's shape (hidden 4096, 32 layers, 32 heads, MLP 11008) with random weights, because no
             7B weights are here; SmolLM2's tokenizer, so its 49,152-token vocabulary (LLaMA has 32,000).
             The default on a CUDA GPU.
  tiny       a two-layer random LLaMA: seconds on a CPU, for checking that a benchmark runs (the tests use it)
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_adapter import DEFAULT_BASE, AdapterConfig, LlamaAdapterModel
from llama_adapter.base import loading
from llama_adapter.config import PRECISIONS, default_device, default_precision
from llama_adapter.data import batching, templates

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATA = Path(os.environ.get("LLAMA_ADAPTER_DATA") or REPO.parent / "shared" / "data")  # the real data (SOURCES.md)
ALPACA = DATA / "alpaca" / "alpaca_small.json"
MODELS = ("smollm2", "llama-7b", "tiny")
RANDOM_SHAPES = {
    "llama-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
    },
}
# Dense bf16 tensor-core peak FLOP/s by device name, for model FLOPs utilisation (MFU); the first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12))


def default_model() -> str:
    return "llama-7b" if torch.cuda.is_available() else "smollm2"


def load_base(name: str):
    """The frozen base model (on the default device, in the default precision, with SDPA attention) and tokenizer."""
    dtype, device = PRECISIONS[default_precision(answering=False)], default_device()
    attention = "sdpa"  # PyTorch's fused attention: flash / memory-efficient kernels on CUDA
    if name == "smollm2":
        base, tokenizer = loading.load_base(DEFAULT_BASE, dtype, attention)
        return base.to(device), tokenizer
    tokenizer = loading.load_tokenizer(DEFAULT_BASE)  # SmolLM2's: the weights below are random
    config = LlamaConfig(**RANDOM_SHAPES[name], vocab_size=len(tokenizer), attn_implementation=attention)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.requires_grad_(False)
    base.eval()
    base.name_or_path = f"random {name}"
    return base, tokenizer


def shared_copy(base):
    """A copy of the model's modules that shares its (frozen) weights: methods that rewire a model in place each
    get their own, at no memory cost."""
    return copy.deepcopy(base, memo={id(tensor): tensor for tensor in [*base.parameters(), *base.buffers()]})


def adapter_config(base) -> AdapterConfig:
    """The paper's K=10 prompts in the top L=30 layers, or in every layer of a shallower base."""
    return AdapterConfig(adapter_len=10, adapter_layers=min(30, base.config.num_hidden_layers))


def our_adapter(base) -> LlamaAdapterModel:
    """Our adapter on a weight-sharing copy of `base`, gates at zero."""
    return LlamaAdapterModel(shared_copy(base), None, adapter_config(base)).to(base.device)


def peft_adapter(base) -> peft.PeftModel:
    """Hugging Face PEFT's AdaptionPrompt with the same K and L on a weight-sharing copy of `base`, gates at zero."""
    config = adapter_config(base)
    return peft.get_peft_model(
        shared_copy(base),
        peft.AdaptionPromptConfig(
            adapter_len=config.adapter_len, adapter_layers=config.adapter_layers, task_type="CAUSAL_LM"
        ),
    )


def frozen_training_flops(base, tokens: int, seq_len: float, scored: int) -> float:
    """Model FLOPs to train an adapter on `tokens` tokens in sequences of `seq_len`, `scored` of them predicted.

    A frozen weight costs 4 FLOPs per token (forward, and backward to the activations: it gets no gradient of its
    own) where a trained one costs 6; attention costs PaLM's 12 L d T per token; the vocabulary projection runs
    only at the scored positions. The adapters' own FLOPs are negligible.
    """
    config = base.config
    linear = sum(p.numel() for p in base.get_decoder().layers.parameters() if p.dim() == 2)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return tokens * (4 * linear + attention) + scored * 4 * config.vocab_size * config.hidden_size


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def peak_flops() -> float | None:
    """The device's dense bf16 peak FLOP/s, when it is a GPU this table knows."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def generation_speed(model: LlamaAdapterModel, new_tokens: int) -> float:
    """Greedy tokens/s at batch 1 after a short prompt, exactly `new_tokens` of them (no early stop)."""
    encoded = model.tokenizer(templates.format_prompt("Explain what a prime number is."), return_tensors="pt")
    ids, mask = encoded["input_ids"].to(model.device), encoded["attention_mask"].to(model.device)
    settings = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    best = float("inf")
    with model.use():
        for run in range(3):  # the first run warms up (CUDA kernels, caches); the best of the other two counts
            synchronize()
            start = time.perf_counter()
            inputs = model.method.generation_inputs(ids, mask)  # fresh: generate fills a prefix's cache in place
            model.base.generate(**inputs, **settings, pad_token_id=batching.pad_id(model.tokenizer))
            synchronize()
            best = min(best, time.perf_counter() - start) if run else best
    return new_tokens / best


def write_results(results: dict, out: str | Path) -> None:
    """Print the results and write them, prefixed by the command that produced them and where it ran."""
    script = Path(sys.argv[0]).resolve()
    command = " ".join(["python", str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script)])
    results = {
        "command": " ".join([command, *sys.argv[1:]]),
        "device": device_name(),
        "precision": default_precision(answering=False),
        "torch": torch.__version__,
    } | results
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
