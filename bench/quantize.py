"""A quantised frozen base (`--quantize int8|nf4`) against the full-precision one, and LLaMA-7B's memory with each.

    python bench/quantize.py          # writes bench/results/quantize.json and prints both tables

Measured, each setting in a process of its own so that each peak is its own: LLaMA-Adapter (K=10, L=30) trained
`--steps` steps on real Alpaca rows from the same seed, on the base loaded with each `--quantize`. Reported: the
base's weight memory, peak memory while training (CUDA: peak allocated; CPU: the process's resident set, sampled
every 5 ms, which includes Python and the libraries), training and batch-1 generation tokens/s, and the Alpaca
validation loss before and after; ratios are to the full-precision base, measured in the same run.

Arithmetic for LLaMA-7B (no 7B weights are here): weight bytes from bitsandbytes' actual storage of one linear layer
of each of LLaMA-7B's shapes, times their count, plus embeddings, norms and vocabulary projection in bf16; the
adapter with its gradients and AdamW state; and the activations training keeps for the backward pass, counted
tensor by tensor (saved-tensor hooks) in a real two-layer model of LLaMA-7B's width at one row of `--seq-len`
tokens, times the 30 layers from the first adapted one up, times the batch size. Gradient checkpointing keeps each
layer's input instead, and recomputes one layer at a time.
"""

import argparse
import ctypes
import gc
import multiprocessing
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch
from common import ALPACA, MODELS, RESULTS, generation_speed, load_base, write_results
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_adapter import DEFAULT_BASE, AdapterConfig, LlamaAdapterModel
from llama_adapter.config import PRECISIONS, BaseModelConfig
from llama_adapter.train.config import TrainConfig
from llama_adapter.train.loop import train

SETTINGS = ("none", "int8", "nf4")
LLAMA_7B = LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
ADAPTED_LAYERS = 30  # the paper's L: layers 2..31 run under the prompts, so their activations are kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--data", default=str(ALPACA), help="Alpaca-format rows to train on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=9e-3)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512, help="LLaMA-7B arithmetic: tokens per row")
    parser.add_argument(
        "--llama-7b-arithmetic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the LLaMA-7B arithmetic (CPU work, the same on any device: a GPU check skips it)",
    )
    parser.add_argument("--out", default=str(RESULTS / "quantize.json"))
    args = parser.parse_args()

    spawn = multiprocessing.get_context("spawn")  # a fresh process per setting: nothing of one in another's peak
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # bitsandbytes quantises while loading from files: a random base is saved once, for every setting to load
        base = DEFAULT_BASE if args.model == "smollm2" else save_random_base(args.model, Path(folder) / "base")
        for setting in SETTINGS:
            with ProcessPoolExecutor(1, mp_context=spawn) as child:
                rows.append(child.submit(measure, base, setting, args).result())
            print(format_measured(rows), flush=True)
    for row in rows[1:]:
        for key in ("weights_mib", "peak_mib", "train_tokens_per_s", "generation_tokens_per_s"):
            row[f"{key}_vs_none"] = row[key] / rows[0][key]
    llama_7b = llama_7b_memory(args.seq_len) if args.llama_7b_arithmetic else None
    tables = {"measured": format_measured(rows)} | ({"llama_7b": format_7b(llama_7b)} if llama_7b else {})
    results = {
        "model": args.model,
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len, "lr": args.lr},
        "measured": rows,
        "llama_7b": llama_7b,
        "tables": tables,
    }
    write_results(results, args.out)
    print("\n\n".join(tables.values()))


def measure(base_name: str, setting: str, args) -> dict:
    """Train and time LLaMA-Adapter on the base loaded with `--quantize setting` (run in a child process)."""
    with tempfile.TemporaryDirectory() as folder:
        release_freed_memory()
        before = resident_mib()
        cfg = TrainConfig(
            data=args.data,
            out=str(Path(folder) / "run"),
            model=BaseModelConfig(base=base_name, quantize=setting),
            epochs=100,
            max_steps=args.steps,
            batch_size=args.batch_size,
            max_len=args.max_len,
            lr=args.lr,
            save_every=10**9,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(cfg.seed)
        adapter = AdapterConfig(adapter_len=10, adapter_layers=30)
        model = LlamaAdapterModel.from_base(
            base_name, adapter, PRECISIONS[cfg.model.precision], device, quantize=setting
        )
        weights_mib = model.base.get_memory_footprint() / 2**20
        release_freed_memory()
        with PeakMemory() as peak:
            summary = train(cfg, adapter, model)
        speed = generation_speed(model, args.gen_tokens)
    return {
        "quantize": setting,
        "weights_mib": weights_mib,
        "process_before_loading_mib": None if torch.cuda.is_available() else before,
        "peak_mib": peak.mib,
        "train_tokens_per_s": summary["tokens_per_s"],
        "generation_tokens_per_s": speed,
        "alpaca_val_loss": [summary["val_loss_before"], summary["val_loss_after"]],
    }


def save_random_base(name: str, folder: Path) -> str:
    """A random-weight base of a shape `common.MODELS` names, saved as a Hugging Face folder."""
    base, tokenizer = load_base(name)
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del base
    release_freed_memory()
    return str(folder)


class PeakMemory:
    """Peak memory inside a `with` block: CUDA's peak allocation, or the process's resident set sampled every 5 ms."""

    def __enter__(self):
        self.mib, self._running = 0.0, True
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while self._running:
            self.mib = max(self.mib, resident_mib())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._running = False
        if torch.cuda.is_available():
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._sampler.join()


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def release_freed_memory() -> None:
    """Return freed heap pages to the system, so that the resident set counts live memory (glibc keeps them)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def llama_7b_memory(seq_len: int) -> dict:
    """LLaMA-Adapter training on LLaMA-7B: weights per quantisation, adapter state and activations, in MiB."""
    shapes = {"attention (4096 x 4096)": (4096, 4096, 4), "mlp (11008 x 4096)": (11008, 4096, 3)}
    layers = LLAMA_7B.num_hidden_layers
    unquantised = 2 * LLAMA_7B.vocab_size * LLAMA_7B.hidden_size + (2 * layers + 1) * LLAMA_7B.hidden_size
    weights = {}
    for setting in SETTINGS:
        linear = sum(count * linear_bytes(out_f, in_f, setting) for out_f, in_f, count in shapes.values())
        weights[setting] = (layers * linear + 2 * unquantised) / 2**20  # bf16: 2 bytes a value
    adapter_params = ADAPTED_LAYERS * (10 * LLAMA_7B.hidden_size + LLAMA_7B.num_attention_heads)
    per_layer, head = saved_activation_bytes(seq_len)
    kept_input = seq_len * LLAMA_7B.hidden_size * 2  # a layer's bf16 input: all checkpointing keeps of it
    activations = {
        batch: {
            "plain": (batch * (ADAPTED_LAYERS * per_layer + head)) / 2**20,
            # each layer's input kept, one layer's activations rebuilt at a time during the backward pass
            "checkpointing": (batch * (ADAPTED_LAYERS * kept_input + per_layer + head)) / 2**20,
        }
        for batch in (1, 4, 8)
    }
    return {
        "seq_len": seq_len,
        "weights_mib": {k: v for k, v in weights.items()},
        "adapter_parameters": adapter_params,
        # fp32 parameter, gradient and AdamW's two moments
        "adapter_state_mib": adapter_params * 16 / 2**20,
        "activations_per_layer_per_row_mib": per_layer / 2**20,
        "activations_mib": {b: {k: v for k, v in a.items()} for b, a in activations.items()},
    }


def linear_bytes(out_features: int, in_features: int, setting: str) -> int:
    """Bytes one bf16 linear weight takes as bitsandbytes stores it (quantisation constants included)."""
    if setting == "none":
        return 2 * out_features * in_features
    import bitsandbytes as bnb

    kinds = {
        "int8": lambda: bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False),
        "nf4": lambda: bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4"),
    }
    layer = kinds[setting]().to(torch.bfloat16) if setting == "nf4" else kinds[setting]()
    layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")  # bitsandbytes quantises on this move
    return sum(t.nbytes for t in layer.state_dict().values())


def saved_activation_bytes(seq_len: int) -> tuple[int, int]:
    """Bytes saved for backward per adapted layer and for the rest (norm, vocabulary projection), for one row.

    Counted in real one- and two-layer models of LLaMA-7B's width in bf16 with every layer adapted, each storage
    once however many autograd nodes hold it, weights left out (the model holds them anyway). The base is full
    precision here: a quantised linear saves no more for its input's gradient than a frozen bf16 one.
    """
    totals = []
    for depth in (1, 2):
        config = LlamaConfig(**(LLAMA_7B.to_dict() | {"num_hidden_layers": depth}))
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        base.requires_grad_(False)
        model = LlamaAdapterModel(base, None, AdapterConfig(adapter_len=10, adapter_layers=depth)).train()
        ids = torch.randint(0, config.vocab_size, (1, seq_len))
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100  # Alpaca-like: the second half is the response that is scored
        saved = {}
        with torch.autograd.graph.saved_tensors_hooks(partial(_remember_storage, saved), lambda tensor: tensor):
            model.loss(ids, torch.ones_like(ids), labels)
        weights = {t.untyped_storage().data_ptr() for t in base.parameters()}
        totals.append(sum(size for ptr, size in saved.items() if ptr not in weights))
        del model, base
        gc.collect()
    # The first adapted layer's input needs no gradient, as in LLaMA-7B with L=30: the one-layer total holds it.
    per_layer = totals[1] - totals[0]
    return per_layer, totals[0] - per_layer


def _remember_storage(saved: dict, tensor: torch.Tensor) -> torch.Tensor:
    saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return tensor


def format_measured(rows: list[dict]) -> str:
    head = ["--quantize", "base weights", "peak while training", "train tok/s", "gen tok/s", "Alpaca val loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:

        def ratio(key, row=row):
            return f" ({row[key + '_vs_none']:.2f}×)" if key + "_vs_none" in row else ""

        before, after = row["alpaca_val_loss"]
        cells = [
            row["quantize"],
            f"{row['weights_mib']:,.0f} MiB{ratio('weights_mib')}",
            f"{row['peak_mib']:,.0f} MiB{ratio('peak_mib')}",
            f"{row['train_tokens_per_s']:.1f}{ratio('train_tokens_per_s')}",
            f"{row['generation_tokens_per_s']:.1f}{ratio('generation_tokens_per_s')}",
            f"{before:.3f} → {after:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_7b(memory: dict) -> str:
    batches = list(memory["activations_mib"])
    head = ["--quantize", "weights", *(f"total, batch {b} (checkpointing)" for b in batches)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, weights in memory["weights_mib"].items():
        fixed = weights + memory["adapter_state_mib"]
        totals = [
            f"{(fixed + a['plain']) / 1024:.1f} GiB ({(fixed + a['checkpointing']) / 1024:.1f} GiB)"
            for a in memory["activations_mib"].values()
        ]
        lines.append("| " + " | ".join([setting, f"{weights / 1024:.2f} GiB", *totals]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
