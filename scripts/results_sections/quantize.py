"""A quantised base (`bench/quantize.py`): what int8 and nf4 measured on SmolLM2, and what they come to, by arithmetic,
on LLaMA-7B's shape."""

from .formatting import bullets, loss, mib, para, short_float, speed, table
from .sources import is_cpu, load, provenance


def quantize() -> list[str]:
    path = "bench/results/quantize.json"
    r = load(path)
    rows, b = r["measured"], r["budget"]
    peak_label = "peak RSS while training" if is_cpu(r) else "peak allocated CUDA memory while training"

    def with_ratio(row: dict, key: str, text: str, decimals: int = 2) -> str:
        return text + (f" ({row[key + '_vs_none']:.{decimals}f}×)" if key + "_vs_none" in row else "")

    body = [
        [
            row["quantize"],
            with_ratio(row, "weights_mib", f"{row['weights_mib']:,.0f} MiB"),
            with_ratio(row, "peak_mib", f"{row['peak_mib']:,.0f} MiB"),
            with_ratio(row, "train_tokens_per_s", speed(row["train_tokens_per_s"])),
            with_ratio(row, "generation_tokens_per_s", speed(row["generation_tokens_per_s"])),
            f"{loss(row['alpaca_val_loss'][0])} → {loss(row['alpaca_val_loss'][1])}",
        ]
        for row in rows
    ]
    return [
        "## A quantised base (`bench/quantize.py`)",
        "",
        *provenance(path, r),
        *para(
            f"Measured part: LLaMA-Adapter trained {b['steps']} steps of {b['batch_size']} real Alpaca rows (max",
            f"{b['max_len']} tokens, lr {short_float(b['lr'])}, the same seed and rows for each) on SmolLM2 loaded with",
            "each `--quantize`, each setting in a process of its own with nothing else on its core. Ratios are to the",
            "full-precision base (`none`) in the same run.",
        ),
        *table(
            [
                "`--quantize`",
                "base weights",
                peak_label,
                "train tok/s",
                "gen tok/s (batch 1)",
                "Alpaca val loss, before → after",
            ],
            body,
        ),
        *bullets(*measured_findings(r)),
        *llama_7b(r["llama_7b"]),
    ]


def measured_findings(r: dict) -> list[str]:
    """What the SmolLM2 rows show, each quantised setting against the full-precision `none` of the same run."""
    rows, b = r["measured"], r["budget"]
    none, by = rows[0], {row["quantize"]: row for row in rows}
    shrink = [none["weights_mib"] / row["weights_mib"] for row in rows[1:]]
    train_slow = sorted(round(100 * (1 - row["train_tokens_per_s_vs_none"])) for row in rows[1:])
    gen_slow = sorted(round(100 * (1 - row["generation_tokens_per_s_vs_none"])) for row in rows[1:])
    notes = [
        "The weights shrink " + " and ".join(f"{x:.1f}×" for x in shrink) + ", not 4× and 8× (fp32 to 8 and 4 bits):"
        " SmolLM2's large tied vocabulary embedding stays in fp32. On LLaMA-7B's shape, where the decoder's"
        " projections are most of the weights, it comes closer (below)."
    ]
    if is_cpu(r) and none.get("process_before_loading_mib"):
        lower = all(row["peak_mib"] < none["peak_mib"] for row in rows[1:])
        notes.append(
            f"On this CPU the peak resident set ({mib(none['process_before_loading_mib'])} MiB of it Python and the"
            " libraries, measured before loading the base) is "
            + ("lower" if lower else "not lower")
            + f": at {b['batch_size']} rows × {b['max_len']} tokens it is activations, the vocabulary projection's"
            " logits and the allocator's cache, and bitsandbytes' CPU int8 path casts inputs to fp16 and keeps extra"
            " buffers. What a CPU user saves is the weights; on a GPU the same script reports peak allocated memory."
        )
    if "nf4" in by and "int8" in by:
        nf4, int8 = by["nf4"]["alpaca_val_loss"], by["int8"]["alpaca_val_loss"]
        base_before = none["alpaca_val_loss"][0]
        notes.append(
            f"4 bits cost a 135M model {nf4[0] - base_before:.2f} nats of Alpaca loss before training"
            f" ({loss(base_before)} → {loss(nf4[0])}); the adapter trained on the nf4 base wins back"
            f" {nf4[0] - nf4[1]:.2f} in {b['steps']} steps. 8 bits cost {int8[0] - base_before:.3f}."
        )
    notes.append(
        f"Training is {train_slow[0]}-{train_slow[-1]}% slower, generation {gen_slow[0]}-{gen_slow[-1]}% slower"
        + (" (bitsandbytes dequantises on the CPU for every matrix product)." if is_cpu(r) else ".")
    )
    return notes


def gib(x: float, decimals: int = 1) -> str:
    return f"{x / 1024:.{decimals}f} GiB"


def llama_7b(m: dict) -> list[str]:
    """LLaMA-7B's memory per `--quantize`, worked out from measured pieces: no 7B weights or GPU measured it whole."""
    batches = list(m["activations_mib"])
    fixed_mib = {setting: weights + m["adapter_state_mib"] for setting, weights in m["weights_mib"].items()}
    body = []
    for setting, weights in m["weights_mib"].items():
        plain = [gib(fixed_mib[setting] + m["activations_mib"][batch]["plain"]) for batch in batches]
        ckpt = [
            f"{(fixed_mib[setting] + m['activations_mib'][batch]['checkpointing']) / 1024:.1f}" for batch in batches
        ]
        label = "none (bf16)" if setting == "none" else setting
        body.append([label, gib(weights, 2), *plain, " / ".join(ckpt) + " GiB"])
    head = [
        "`--quantize`",
        "weights",
        *(f"total, batch {batch}" if i == 0 else f"batch {batch}" for i, batch in enumerate(batches)),
    ]
    head.append(f"batch {' / '.join(batches)} with `--gradient-checkpointing`")
    shrink = [m["weights_mib"]["none"] / m["weights_mib"][s] for s in m["weights_mib"] if s != "none"]
    out = [
        *para(
            "LLaMA-7B, by arithmetic (no 7B weights are here, and no GPU measured one): weight bytes from",
            "bitsandbytes' actual storage of one linear layer of each of LLaMA-7B's shapes (scales included) times",
            "their count, plus the embedding and output projection in bf16; the adapter's",
            f"{m['adapter_parameters']:,} parameters with gradients and AdamW state ({mib(m['adapter_state_mib'])} MiB);",
            "and the activations kept for the backward pass, counted tensor by tensor with saved-tensor hooks in a",
            "real model of LLaMA-7B's width in bf16:",
            f"{mib(m['activations_per_layer_per_row_mib'])} MiB per adapted layer per {m['seq_len']}-token row, times",
            "the layers from the first adapted one up. `--gradient-checkpointing` keeps each layer's input and",
            "rebuilds one layer at a time. bf16 → int8 → nf4 shrinks these weights",
            " and ".join(f"{x:.2f}×" for x in shrink) + " (of 2× and 4×).",
        ),
        *table(head, body),
    ]
    nf4_fixed = fixed_mib.get("nf4")
    if nf4_fixed is None:
        return out
    first, last = batches[0], batches[-1]
    return out + para(
        "With the 4-bit base, LLaMA-Adapter training on a 7B model fits, on paper, in",
        f"{gib(nf4_fixed + m['activations_mib'][first]['plain'])} at batch {first}, or",
        f"{gib(nf4_fixed + m['activations_mib'][last]['checkpointing'])} at batch {last} with gradient",
        "checkpointing. Not counted: the CUDA context, allocator fragmentation, and one layer's dequantised",
        "weight during its matrix product. Still to do on a GPU: `python bench/quantize.py --model llama-7b`",
        "measures the same three rows with peak allocated CUDA memory on random LLaMA-7B weights (it saves them",
        "once, to load them quantised).",
    )
