"""LLaMA-Adapter V2 against v1 at the same budget (`bench/v2.py`)."""

from .formatting import bullets, command_block, para, percent
from .sources import load, note, where

# task: (measurement, better when higher, how it reads, its format)
COLUMNS = {
    "alpaca": ("held_out_loss", False, "Alpaca held-out loss", ".3f"),
    "math": ("held_out_loss", False, "math held-out loss", ".3f"),
    "shapes": ("accuracy", True, "shapes accuracy", ".1f"),
    "scienceqa": ("accuracy", True, "ScienceQA accuracy", ".2f"),
}


def v2_comparison() -> list[str]:
    path = "bench/results/v2.json"
    r = load(path)
    budget, speeds = r["budget"], r.get("speed", {}).get("tokens_per_s", {})
    out = [
        "## LLaMA-Adapter V2 against v1 at the same budget (`bench/v2.py`)",
        "",
        *para(f"Commands (results in `{path}`; ran on {where(r)}):"),
        *command_block(" && ".join(r["commands"])),
        *para(
            f"Each task trains a fresh adapter per row for {budget['steps']} steps of {budget['batch_size']} rows",
            f"(warm-up {percent(budget['warmup'], 0)}, at most {budget['max_len']} tokens a row), the paper's K=10",
            "prompts in the top L=30 layers, V2 with bias, scale and norm tuning besides and V=1 early-fusion layer,",
            "on the embedded SmolLM2-135M-Instruct. Alpaca and math: the held-out response loss on the last 200",
            "rows of each file, trained on the others. Shapes: accuracy on 200 held-out drawings with shuffled",
            "options (chance 33.3%), CLIP random (ViT-B-32, seed 0), so it measures reading colour from random",
            "features. ScienceQA: accuracy on the 361 test problems with metadata (chance about 40%), text-only with",
            "the captions as context, trained on the 1,041 train problems, scored by the most likely option; the",
            "shapes are answered greedily and parsed as ScienceQA's (their targets name the colour before the",
            "letter, as the shelf's `shapes` adapter's do). train tok/s: the two methods' steps taken in turn on the",
            "same batches of",
            f"{r['speed']['batch_size'] if 'speed' in r else budget['batch_size']} Alpaca rows in one process.",
        ),
        *r["table"].splitlines(),
        "",
    ]
    if len(speeds) == 2:
        out += para(
            f"V2 trains at {speeds['llama-adapter-v2'] / speeds['llama-adapter']:.2f}× v1's tokens/s: its bias, scale",
            "and norm tuning adds a hook and an elementwise step to each of the 210 linear layers and 61 norms.",
        )
    return out + ["V2:", "", *bullets(*v2_findings(r["cells"])), *note(path)]


def v2_findings(cells: dict) -> list[str]:
    """Each V2 row (a learning rate, and where given the early-fusion depth V) against v1 on every task it ran."""
    rows = list(dict.fromkeys(key.split("/", 1)[1] for key in cells if not key.endswith("/base")))
    v1 = next(row for row in rows if row.startswith("llama-adapter@"))
    findings = []
    for row in (row for row in rows if row != v1):
        for task, (key, higher, what, form) in COLUMNS.items():
            ours, theirs = cells.get(f"{task}/{row}", {}).get(key), cells.get(f"{task}/{v1}", {}).get(key)
            if ours is None or theirs is None:
                continue
            beats = ours > theirs if higher else ours < theirs
            base = cells[f"{task}/base"][key]
            below_base = f" (the untrained base's is {base:{form}})" if not higher and ours > base else ""
            findings.append(
                f"{'beats' if beats else '**does not beat**'} v1 on {what} at lr {row.split('@')[1]}"
                + "".join(f", V={v}" for v in row.split("@")[2:])
                + f": {ours:{form}} against {theirs:{form}}{below_base}"
            )
    return findings
