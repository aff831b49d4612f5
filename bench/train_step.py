"""What one training step costs: our adapter against the frozen model's own floor and against PEFT.

    python bench/train_step.py                 # writes bench/results/train_step.json
    python bench/train_step.py --profile       # also where each method's time goes (torch.profiler)

One batch of 8 x 256 tokens whose second half is the response, measured in one run for
  floor   the frozen base: forward, then backward to its input embeddings (what any adapter in every layer pays)
  ours    LlamaAdapterModel (L=30, K=10): forward, backward, AdamW step on the adapter
  peft    Hugging Face PEFT's AdaptionPrompt with the same L and K: forward, backward, AdamW step
  compiled  (with --compile) ours with every decoder layer compiled by torch.compile; the first steps, which
          compile, are the warm-up. Its loss is compared with ours on the same batch and weights; on a CPU its peak
          memory is not measured (each fresh process would compile again).
All three compute the loss the same way (logits only at the response positions), so the ratios compare the
adapters, not loss heads. Repetitions interleave the three after warm-up; the median and the spread are
reported. Memory: the activations each method saves for its backward pass (exact, counted through autograd's
saved-tensor hooks), and the peak of the whole process -- on a GPU the peak allocated CUDA memory, on a CPU
the peak resident memory of fresh processes running one step (median of several: it varies from run to run).
On a GPU, MFU (model FLOPs utilisation) counts FLOPs as `common.frozen_training_flops` explains.
"""

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    MODELS,
    RESULTS,
    default_model,
    frozen_training_flops,
    load_base,
    our_adapter,
    peak_flops,
    peft_adapter,
    synchronize,
    write_results,
)

from llama_adapter import LlamaAdapterModel
from llama_adapter.base import structure
from llama_adapter.train.optim import adamw

METHODS = ("floor", "ours", "peft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default=default_model())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-runs", type=int, default=3, help="CPU: fresh processes per method for peak memory")
    parser.add_argument("--profile", action="store_true", help="also record the top operators of one step each")
    parser.add_argument("--compile", action="store_true", help="also ours with torch.compile'd decoder layers")
    parser.add_argument("--out", default=str(RESULTS / "train_step.json"))
    args = parser.parse_args()

    base, _ = load_base(args.model)
    methods = (*METHODS, "compiled") if args.compile else METHODS
    steps = build_steps(base, args.batch_size, args.seq_len, methods)
    warm_up = 3 if args.compile else 1  # torch.compile compiles on the first calls, forward and backward
    first_losses = {}
    for method in methods:
        for _ in range(warm_up):
            first_losses.setdefault(method, steps[method]())
    times = {method: [] for method in methods}
    for _ in range(args.repeats):
        for method in methods:
            synchronize()
            begin = time.perf_counter()
            steps[method]()
            synchronize()
            times[method].append(time.perf_counter() - begin)
    saved = {method: saved_activation_mib(steps[method], base) for method in methods}
    profiles = {method: profile(steps[method]) for method in methods} if args.profile else None
    del steps
    peaks = peak_memory_mib(args.model, base, args.batch_size, args.seq_len, args.memory_runs, methods)

    tokens = args.batch_size * args.seq_len
    flops = frozen_training_flops(base, tokens, args.seq_len, args.batch_size * (args.seq_len - args.seq_len // 2))
    median = {method: statistics.median(times[method]) for method in methods}
    results = {
        "model": args.model,
        "batch": [args.batch_size, args.seq_len],
        "repeats": args.repeats,
        "methods": {
            method: {
                "median_s": median[method],
                "min_s": min(times[method]),
                "max_s": max(times[method]),
                "tokens_per_s": tokens / median[method],
                "saved_activations_mib": saved[method],
                "peak_memory_mib": peaks[method],
                **({"mfu": flops / median[method] / peak_flops()} if peak_flops() else {}),
            }
            for method in methods
        },
        "ours_over_floor": median["ours"] / median["floor"],
        "peft_over_ours": median["peft"] / median["ours"],
        "peft_over_floor": median["peft"] / median["floor"],
    }
    if args.compile:  # the same weights and batch: the first step of each computes the same loss
        results["compiled_over_ours"] = median["compiled"] / median["ours"]
        results["compiled_first_loss_difference"] = abs(first_losses["compiled"] - first_losses["ours"])
    results["targets"] = {
        "ours_over_floor <= 1.10": results["ours_over_floor"] <= 1.10,
        "peft_over_ours >= 1.4": results["peft_over_ours"] >= 1.4,
    }
    if profiles:
        results["profile_top_ops_ms"] = profiles
    if not results["targets"]["peft_over_ours >= 1.4"]:
        results["missed"] = {"peft_over_ours >= 1.4": why_peft_is_not_slower(results, base.config.num_hidden_layers)}
    write_results(results, args.out)


def why_peft_is_not_slower(results: dict, layers: int) -> dict:
    """How far the PEFT target is missed, and why, from this run's own numbers."""
    needed = results["peft_over_floor"] / 1.4
    why = (
        f"PEFT measured {results['peft_over_floor']}x the frozen floor in this run, so being 1.4x faster than PEFT "
        f"would need our step at {needed:.3f}x the floor: below the forward and backward through all {layers} "
        f"layers that any adapter in every layer has to pay. Ours is {results['ours_over_floor']}x the floor."
    )
    profiles = results.get("profile_top_ops_ms")
    if profiles:
        mm = {method: _matmuls(ops) for method, ops in profiles.items()}
        why += (
            f" PEFT's profile has {mm['peft'][0] - mm['ours'][0]} more matrix products than ours "
            f"({(mm['peft'][1] - mm['ours'][1]) / 1000:.2f} s more matmul time): in each adapted layer it "
            "projects the queries a second time and runs o_proj a second time on the prompt's output (and both "
            "backward), where ours reuses the layer's rotary-embedded queries and adds before its o_proj."
        )
    return {"by": f"{1 - results['peft_over_ours'] / 1.4:.0%} short of 1.4x", "why": why}


def _matmuls(ops: dict) -> tuple[int, float]:
    """(calls, ms) of aten::mm in a profile summary whose keys read 'aten::mm xN'."""
    key = next(key for key in ops if key.startswith("aten::mm x"))
    return int(key.removeprefix("aten::mm x")), ops[key]


def build_steps(base, batch_size: int, seq_len: int, methods=METHODS) -> dict:
    """One closure per method that runs one full training step on the same batch and returns its loss (None for the
    floor, which has no adapter to step)."""
    torch.manual_seed(0)
    ids = torch.randint(10, base.config.vocab_size, (batch_size, seq_len), device=base.device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100  # the first half is the prompt

    steps = {}
    for method in methods:
        if method == "floor":
            steps[method] = _floor_step(base, ids, mask, labels)
        elif method == "peft":
            theirs = peft_adapter(base)
            params = [p for p in theirs.parameters() if p.requires_grad]
            steps[method] = _adapter_step(theirs.base_model.model, params, ids, mask, labels)
        else:
            ours = our_adapter(base)
            if method == "compiled":
                for layer in structure.decoder_layers(ours.base):
                    layer.compile()
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
    optimizer = adamw(params, lr=1e-3, weight_decay=0.0)  # the training loop's, for both adapters

    def step():
        if ours is not None:
            loss = ours.loss(ids, mask, labels)
        else:
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = _response_loss(model, hidden, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _response_loss(model, hidden, labels):
    """The loss as LlamaAdapterModel.loss computes it: logits only where a response token is predicted."""
    targets = labels[:, 1:]
    scored = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()
    return F.cross_entropy(logits, targets[scored])


def saved_activation_mib(step, base) -> float:
    """MiB of tensors autograd keeps for the backward pass of one step, each storage counted once, frozen weights
    (which every method shares with `base`) excluded."""
    weights = {p.untyped_storage().data_ptr() for p in base.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(storages.values()) / 2**20


def profile(step, top: int = 8) -> dict:
    """Self time in ms of the operators that take the most of one step."""
    with torch.profiler.profile(activities=_profiler_activities()) as prof:
        step()
        synchronize()
    attribute = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)[:top]
    return {f"{e.key} x{e.count}": getattr(e, attribute) / 1000 for e in events}


def _profiler_activities():
    activities = [torch.profiler.ProfilerActivity.CPU]
    return activities + [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else activities


def peak_memory_mib(model: str, base, batch_size: int, seq_len: int, runs: int, methods=METHODS) -> dict:
    """Per method: the CUDA peak allocation during a step, or on CPU the median and spread of fresh processes'
    peak resident memory during their first step (None for a compiled one, whose first step compiles)."""
    if torch.cuda.is_available():
        out = {}
        for method in methods:
            step = build_steps(base, batch_size, seq_len, (method,))[method]
            synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            synchronize()
            out[method] = torch.cuda.max_memory_allocated() / 2**20
            del step
        return out
    spawn = multiprocessing.get_context("spawn")
    peaks = {method: [] for method in METHODS}
    with spawn.Pool(1, maxtasksperchild=1) as pool:
        for _ in range(runs):
            for method in METHODS:
                peaks[method].append(pool.apply(_rss_of_one_step, (model, method, batch_size, seq_len)))
    return {
        method: {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for method, values in peaks.items()
    } | {method: None for method in methods if method not in METHODS}


def _rss_of_one_step(model: str, method: str, batch_size: int, seq_len: int) -> float:
    """Peak resident memory (MiB) of this process during the first step of `method` (Linux /proc)."""
    base, _ = load_base(model)
    step = build_steps(base, batch_size, seq_len, (method,))[method]
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS: loading is over
    step()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM")


if __name__ == "__main__":
    main()
