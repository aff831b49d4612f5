"""How the adapter-family tables read a row of `bench/methods.py`'s results, and how they name and show it."""

from collections import Counter

from .formatting import loss, short_float, speed

PROSE_NAMES = {
    "llama-adapter": "LLaMA-Adapter",
    "lora": "LoRA",
    "adalora": "AdaLoRA",
    "dylora": "DyLoRA",
    "series": "Series",
    "parallel": "Parallel",
    "prefix": "prefix",
    "ptuning-v2": "ptuning-v2",
    "prompt": "prompt",
}


def name_of(method: str) -> str:
    return PROSE_NAMES.get(method, method)


def possessive(method: str) -> str:
    name = name_of(method)
    return name + ("'" if name.endswith("s") else "'s")


# The first runs wrote math-only keys; later ones name the task generically. Both kinds of file are committed.
def val_loss(row: dict) -> list[float] | None:
    return row.get("task_val_loss") or row.get("math_val_loss")


def accuracy(row: dict) -> dict:
    return row.get("accuracy") or row.get("math_accuracy") or {}


def questions_per_set(results: dict) -> int:
    return results.get("questions_per_set") or results["math_questions_per_set"]


def trained_rows(rows: list[dict]) -> list[dict]:
    """The rows of methods that trained something: all but the base model's."""
    return [row for row in rows if "trainable_parameters" in row]


def row_named(rows: list[dict], method: str) -> dict | None:
    return next((row for row in rows if row["method"] == method), None)


def test_sets(rows: list[dict]) -> list[str]:
    """The test sets a run answered, with their average last."""
    return [name for name in accuracy(rows[0]) if name != "Avg"] + ["Avg"]


def base_loss(rows: list[dict]) -> float:
    """The base model's held-out task loss: the starting loss most methods share (zero-initialised updates)."""
    befores = [val_loss(row)[0] for row in rows if val_loss(row)]
    shared = Counter(loss(x) for x in befores).most_common(1)[0][0]
    return next(x for x in befores if loss(x) == shared)


def starts_at_base(row: dict, base: float) -> bool:
    return abs(val_loss(row)[0] - base) < 1e-3


def held_out(row: dict, base: float) -> str:
    if not val_loss(row):
        return loss(base)
    before, after = val_loss(row)
    return loss(after) if starts_at_base(row, base) else f"{loss(before)} → {loss(after)}"


def method_rows(rows: list[dict], sets: list[str], base: float, with_checkpoint: bool, labels: dict) -> list[list[str]]:
    out = []
    for row in rows:
        trained = "trainable_parameters" in row
        gen = speed(row["generation_tokens_per_s"])
        if "generation_vs_base" in row:
            gen += f" ({row['generation_vs_base']:.2f}×)"
        cells = [
            labels.get(row["method"], row["method"]),
            short_float(row["lr"]) if trained else "–",
            f"{row['trainable_parameters']:,}" if trained else "0",
        ]
        if with_checkpoint:
            cells.append(f"{row['checkpoint_kib']:,.0f} KiB" if trained else "–")
        cells.append(speed(row["train_tokens_per_s"]) if trained else "–")
        if with_checkpoint:
            cells.append(gen)
        cells += [held_out(row, base), loss(row["alpaca_val_loss"])]
        cells += [f"{accuracy(row)[name]:.1f}" if name in accuracy(row) else "–" for name in sets]
        out.append(cells)
    return out


def shown(row: dict) -> tuple[list[str], dict[str, str]]:
    """A method row's losses and accuracies as the tables show them: two runs that agree here are the same result."""
    return [loss(x) for x in val_loss(row) or []], {k: f"{v:.1f}" for k, v in accuracy(row).items()}


def replace_rows(rows: list[dict], replacements: list[dict]) -> tuple[list[dict], dict]:
    """Rows with each method of `replacements` put in place of the row of the same method; the old rows by name."""
    new = {row["method"]: row for row in trained_rows(replacements)}
    old = {row["method"]: row for row in rows if row["method"] in new}
    return [new.get(row["method"], row) for row in rows], old


def ranking(rows: list[dict]) -> list[dict]:
    return sorted((row for row in rows if val_loss(row)), key=lambda row: val_loss(row)[1])
