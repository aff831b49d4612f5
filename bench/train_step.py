"""What one training step costs: our adapter against the frozen model's own floor and against PEFT.

    python bench/train_step.py                 # writes bench/results/train_step.json

On the embedded SmolLM2-135M-Instruct (real weights), one batch of 8 x 256 tokens whose second half is the
response, measured in one run for
  floor   the frozen base: forward, then backward to its input embeddings (what any adapter in every layer pays)
  ours    LlamaAdapterModel (L=30, K=10): forward, backward, AdamW step on the adapter
  peft    Hugging Face PEFT's AdaptionPrompt with the same L and K: forward, backward, AdamW step
All three compute the loss the same way (logits only at the response positions), so the ratios compare the
adapters, not loss heads. Repetitions interleave the three after warm-up; the median and the spread are
reported. Peak memory is the peak resident memory of a fresh process running one step of each (CPU), or the
peak allocated CUDA memory on a GPU.
"""

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import torch.nn.functional as F

from llama_adapter import DEFAULT_BASE, AdapterConfig, LlamaAdapterModel, hf
from llama_adapter.config import PRECISIONS, default_device, default_precision

REPO = Path(__file__).resolve().parent.parent
METHODS = ("floor", "ours", "peft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    args = parser.parse_args()

    steps = build_steps(args.batch_size, args.seq_len)
    for _ in range(args.warmup):
        for method in METHODS:
            steps[method]()
    times = {method: [] for method in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            begin = time.perf_counter()
            steps[method]()
            times[method].append(time.perf_counter() - begin)
    del steps

    tokens = args.batch_size * args.seq_len
    memory = peak_memory(args.batch_size, args.seq_len)
    results = {
        "command": "python bench/train_step.py " + " ".join(sys.argv[1:]),
        "device": device_name(),
        "precision": default_precision(),
        "threads": torch.get_num_threads(),
        "batch": [args.batch_size, args.seq_len],
        "repeats": args.repeats,
        "methods": {
            method: {
                "median_s": round(statistics.median(times[method]), 4),
                "min_s": round(min(times[method]), 4),
                "max_s": round(max(times[method]), 4),
                "tokens_per_s": round(tokens / statistics.median(times[method]), 1),
                "peak_memory_mib": memory[method],
            }
            for method in METHODS
        },
    }
    median = {method: statistics.median(times[method]) for method in METHODS}
    results["ours_over_floor"] = round(median["ours"] / median["floor"], 3)
    results["peft_over_ours"] = round(median["peft"] / median["ours"], 3)
    results["targets"] = {
        "ours_over_floor <= 1.10": results["ours_over_floor"] <= 1.10,
        "peft_over_ours >= 1.4": results["peft_over_ours"] >= 1.4,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def build_steps(batch_size: int, seq_len: int, methods=METHODS) -> dict:
    """One closure per method that runs one full training step on the same batch."""
    torch.manual_seed(0)
    dtype, device = PRECISIONS[default_precision()], default_device()
    base, tokenizer = hf.load_base(DEFAULT_BASE, dtype)
    base.to(device)
    ids = torch.randint(10, base.config.vocab_size, (batch_size, seq_len), device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100  # the first half is the prompt
    config = AdapterConfig(adapter_len=10, adapter_layers=30)

    def own_base():  # each method gets an untouched base: ours re-routes its base's attention
        return copy.deepcopy(base) if len(methods) > 1 else base

    steps = {}
    for method in methods:
        if method == "floor":
            steps[method] = _floor_step(own_base(), ids, mask, labels)
        elif method == "peft":
            theirs = peft.get_peft_model(
                own_base(),
                peft.AdaptionPromptConfig(
                    adapter_len=config.adapter_len, adapter_layers=config.adapter_layers, task_type="CAUSAL_LM"
                ),
            )
            params = [p for p in theirs.parameters() if p.requires_grad]
            steps[method] = _adapter_step(theirs.base_model.model, params, ids, mask, labels)
        else:
            ours = LlamaAdapterModel(own_base(), tokenizer, config).to(device)
            steps[method] = _adapter_step(ours.base, list(ours.adapter_state().values()), ids, mask, labels, ours)
    return steps


def _floor_step(base, ids, mask, labels):
    embed = base.get_input_embeddings()

    def step():
        inputs = embed(ids).detach().requires_grad_()
        hidden = base.get_decoder()(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        _response_loss(base, hidden, labels).backward()

    return step


def _adapter_step(model, params, ids, mask, labels, ours: LlamaAdapterModel | None = None):
    """Forward, backward and an AdamW step; `ours` computes its loss through its own API."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        if ours is not None:
            loss = ours.loss(ids, mask, labels)
        else:
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = _response_loss(model, hidden, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _response_loss(model, hidden, labels):
    """The loss as LlamaAdapterModel.loss computes it: logits only where a response token is predicted."""
    targets = labels[:, 1:]
    scored = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    return F.cross_entropy(logits, targets[scored])


def peak_memory(batch_size: int, seq_len: int) -> dict:
    """Per method: CUDA peak allocation in MiB, or on CPU the resident memory of a fresh process during a step."""
    if torch.cuda.is_available():
        out = {}
        for method in METHODS:
            step = build_steps(batch_size, seq_len, (method,))[method]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            out[method] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            del step
        return out
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1, maxtasksperchild=1) as pool:
        return {m: pool.apply(_rss_of_one_step, (m, batch_size, seq_len)) for m in METHODS}


def _rss_of_one_step(method: str, batch_size: int, seq_len: int) -> dict:
    """Peak resident memory during the first step, and how much it added to the loaded model (Linux /proc)."""
    step = build_steps(batch_size, seq_len, (method,))[method]
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS: loading is over
    before = _proc_status_mib("VmRSS")
    step()
    peak = _proc_status_mib("VmHWM")
    return {"peak_rss_mib": peak, "step_adds_mib": round(peak - before, 1)}


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
