"""The adapter family on SmolLM2-135M (`bench/methods.py`): five results files, read together, because later runs
re-measure rows of earlier ones and the prose compares them."""

from .formatting import bullets, loss, para, percent, short_float, speed, table, word
from .h100 import h100_losses, h100_run
from .method_rows import (
    accuracy,
    base_loss,
    method_rows,
    name_of,
    possessive,
    questions_per_set,
    ranking,
    replace_rows,
    row_named,
    shown,
    starts_at_base,
    test_sets,
    trained_rows,
    val_loss,
)
from .sources import load, provenance

PATHS = {
    "first": "bench/results/methods.json",
    "more": "bench/results/methods_more.json",
    "ada": "bench/results/methods_adalora.json",
    "cs": "bench/results/methods_commonsense.json",
    "cs_ada": "bench/results/methods_commonsense_adalora.json",
}
ORDINALS = {1: "lowest", 2: "second-lowest", 3: "third-lowest", 4: "fourth-lowest", 5: "fifth-lowest"}
COMMONSENSE_COLUMNS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "social_i_qa": "SIQA",
    "winogrande": "WinoGrande",
    "ARC-Easy": "ARC-e",
    "ARC-Challenge": "ARC-c",
    "openbookqa": "OBQA",
}


def methods() -> list[str]:
    runs = {name: load(path) for name, path in PATHS.items()}
    return [
        "## The adapter family on SmolLM2-135M (`bench/methods.py`)",
        "",
        *para(
            "`bench/methods.py` trains each method on the same rows with the same budget, each on a fresh copy of",
            "the base, and scores them all the same way: trainable parameters, checkpoint size, training tokens/s,",
            "greedy generation tokens/s at batch 1 with its ratio to the base model alone measured in the same run",
            "(LoRA folded into the base, as `chat`, `eval` and `demo` serve it), the held-out loss on the task's",
            "rows (before → after where a method does not start from the base model's loss), the loss on real",
            "Alpaca rows (what training on the task alone costs in general ability), and accuracy on the first",
            "questions of each test set, answered greedily. Each method has its default shape and the learning rate",
            "in the table.",
        ),
        *first_run(runs),
        *other_methods(runs),
        *commonsense(runs),
        *h100_run(),
    ]


def math_head(runs: dict) -> list[str]:
    """The math tables' columns: both show the first run's test sets."""
    head = ["method", "lr", "trainable params", "checkpoint", "train tok/s", "gen tok/s (vs base)"]
    return head + ["math held-out loss", "Alpaca val loss", *test_sets(runs["first"]["rows"])]


def first_prefix(runs: dict) -> dict | None:
    """The first run's prefix row when it was what `--method ptuning-v2` is now: the later run's ptuning-v2 row
    reproduces it exactly, and the first run had no ptuning-v2 of its own."""
    rows = runs["first"]["rows"]
    prefix, ptuning = row_named(rows, "prefix"), row_named(runs["more"]["rows"], "ptuning-v2")
    if row_named(rows, "ptuning-v2") or not prefix or not ptuning:
        return None
    return prefix if shown(ptuning) == shown(prefix) else None


def first_run(runs: dict) -> list[str]:
    first = runs["first"]
    rows, trained, budget = first["rows"], trained_rows(first["rows"]), first["budget"]
    labels = {"prefix": "prefix (now `ptuning-v2`) ‡"} if first_prefix(runs) else {}
    return [
        f"### {word(len(trained)).capitalize()} methods in one run, one CPU core",
        "",
        *provenance(PATHS["first"], first),
        *para(
            f"Each method trained {budget['steps']} steps of {budget['batch_size']} rows of `math_data.json` (max",
            f"length {budget['max_len']}; the same budget and rows for each), then answered the first",
            f"{questions_per_set(first)} questions of each math test set greedily.",
        ),
        *table(math_head(runs), method_rows(rows, test_sets(rows), base_loss(trained), True, labels)),
        *bullets(*first_run_findings(runs)),
    ]


def loss_ranking(trained: list[dict]) -> str:
    """The methods in order of held-out loss, checked against the H100 run's order where both measured them."""
    base, ranked = base_loss(trained), ranking(trained)
    learned = all(val_loss(row)[1] < val_loss(row)[0] for row in trained)
    h100 = h100_losses()
    common = [row["method"] for row in ranked if row["method"] in h100]
    same_order = common == sorted(common, key=lambda m: h100[m]) and len(common) > 1
    far = [row for row in trained if not starts_at_base(row, base) and val_loss(row)[0] > 2 * base]
    return (
        "The held-out loss on math rationales is the column to read: "
        + ("every method learned, and they rank " if learned else "they rank ")
        + " < ".join(name_of(row["method"]) for row in ranked)
        + (", the same order as the bigger H100 run below for the methods it reached." if same_order else ".")
        + "".join(
            f" The {row['method']} row starts far from the base ({loss(val_loss(row)[0])}:"
            " its random keys and values take attention from the start)"
            + (" and ends last." if row is ranked[-1] else ".")
            for row in far
        )
    )


def first_run_findings(runs: dict) -> list[str]:
    first = runs["first"]
    base_row, trained, q = first["rows"][0], trained_rows(first["rows"]), questions_per_set(first)
    lora = row_named(trained, "lora")
    # the base model alone is the first row of every run: its spread over the runs is the noise of this column
    all_speeds = [results["rows"][0]["generation_tokens_per_s"] for results in runs.values()]
    raised = [row["alpaca_val_loss"] for row in trained]
    return [
        loss_ranking(trained),
        f"Accuracy is over {q} questions per set, so one question is {100 / q:g} points"
        + (
            f": every trained method beats the base model's {accuracy(base_row)['Avg']:.1f} on average, and the"
            " differences between methods are within noise."
            if all(accuracy(row)["Avg"] > accuracy(base_row)["Avg"] for row in trained)
            else "; the differences between methods are within noise."
        ),
        (
            f"Every method raised the loss on general Alpaca rows ({loss(base_row['alpaca_val_loss'])} →"
            f" {loss(min(raised))}-{loss(max(raised))}), the price of training on math alone."
            if all(x > base_row["alpaca_val_loss"] for x in raised)
            else ""
        ),
        "Generation tokens/s at batch 1 on one CPU core is noisy between runs"
        + (
            f": the merged LoRA, which costs exactly what the base costs, measured {lora['generation_vs_base']:.2f}×,"
            if lora
            else ":"
        )
        + f" and the base model alone measured {speed(min(all_speeds))}-{speed(max(all_speeds))} tokens/s across the"
        f" {word(len(all_speeds))} runs of this section. No method is much slower per token here; per-token"
        " costs on a GPU are still to be measured.",
        (
            "‡ The prefix row is the configuration of that run: deep prompts trained directly, which is what"
            " `--method ptuning-v2` is now (the next table's `ptuning-v2` row reproduces it); `--method prefix`"
            " has since gained Li & Liang's MLP (next table)."
            if first_prefix(runs)
            else ""
        ),
    ]


def other_methods(runs: dict) -> list[str]:
    """The methods added after the first run, with the AdaLoRA rerun in place of the old AdaLoRA row."""
    more, base_row = runs["more"], runs["first"]["rows"][0]
    rows, old = replace_rows(more["rows"], runs["ada"]["rows"])
    same_base = loss(rows[0]["alpaca_val_loss"]) == loss(base_row["alpaca_val_loss"]) and (
        shown(rows[0])[1] == shown(base_row)[1]
    )
    labels = {name: f"{name} †" for name in old}
    out = [
        "### The other methods, and commonsense, at the same budget",
        "",
        *provenance(PATHS["more"], more),
        *para(
            "The same budget, flags and core as above, for the methods added since and for `prefix` with its MLP.",
            (
                "Its base row matches the first run's except for generation speed, the noisy column."
                if same_base
                else "Its base row differs from the first run's."
            ),
        ),
        *table(math_head(runs), method_rows(rows, test_sets(rows), base_loss(trained_rows(rows)), True, labels)),
        *bullets(*other_findings(runs, rows, old)),
    ]
    if "adalora" in old:
        out += [
            *para("The two AdaLoRA runs (†):"),
            *provenance(PATHS["ada"], runs["ada"]),
            *provenance(PATHS["cs_ada"], runs["cs_ada"]),
        ]
    return out


def other_findings(runs: dict, rows: list[dict], old: dict) -> list[str]:
    """What the later methods add to the first run's, over all the methods either run trained."""
    trained, first_trained = trained_rows(rows), trained_rows(runs["first"]["rows"])
    everyone = trained + [row for row in first_trained if row["method"] not in {r["method"] for r in trained}]
    by_name = {row["method"]: row for row in everyone}
    lora = row_named(first_trained, "lora")
    unmerged = [by_name[m]["generation_vs_base"] for m in ("adalora", "dylora") if m in by_name]
    slow = sorted(round(100 * (1 - x)) for x in unmerged)
    return [
        (
            "`ptuning-v2` reproduces the first run's prefix row exactly (same loss, same answers): it is that"
            " configuration."
            if first_prefix(runs)
            else ""
        ),
        prefix_finding(everyone) if "prefix" in by_name and "ptuning-v2" in by_name else "",
        adalora_finding(runs, old["adalora"], by_name["adalora"], lora) if "adalora" in old else "",
        (
            "DyLoRA, trained at a random rank each step, ends close to LoRA at full rank"
            f" ({loss(val_loss(by_name['dylora'])[1])} against {loss(val_loss(lora)[1])})."
            if "dylora" in by_name and lora
            else ""
        ),
        (
            f"AdaLoRA and DyLoRA are not folded into the base, so they answer {slow[0]}-{slow[-1]}% slower per token"
            " here, where the merged LoRA costs nothing."
            if unmerged and all(x < 1 for x in unmerged)
            else ""
        ),
    ]


def prefix_finding(everyone: list[dict]) -> str:
    """What Li & Liang's MLP changes in `prefix`, against `ptuning-v2`, the same prompts trained directly."""
    prefix, ptuning = row_named(everyone, "prefix"), row_named(everyone, "ptuning-v2")
    ranked = ranking(everyone)
    place = [row["method"] for row in ranked].index("prefix") + 1
    ahead = ", ".join(f"{possessive(row['method'])} {loss(val_loss(row)[1])}" for row in ranked[: place - 1])
    return (
        f"Li & Liang's MLP makes `prefix` start near the base ({loss(val_loss(prefix)[0])} instead of"
        f" {loss(val_loss(ptuning)[0])}) and reach the {ORDINALS.get(place, f'number {place}')} held-out loss of"
        f" all {word(len(everyone))} methods ({loss(val_loss(prefix)[1])}"
        + (f", after {ahead}" if ahead else "")
        + f"), for {prefix['trainable_parameters'] / ptuning['trainable_parameters']:.0f}× the parameters of"
        f" `ptuning-v2`; the MLP is saved with the adapter, so its checkpoint is"
        f" {prefix['checkpoint_kib']:,.0f} KiB where the prefix it produces has as many values as"
        f" `ptuning-v2`'s {ptuning['trainable_parameters']:,} parameters."
    )


def adalora_finding(runs: dict, before_math: dict, new_math: dict, lora: dict | None) -> str:
    """Why AdaLoRA's first rows did not learn, and what its own rate does (the rows marked †)."""
    before_cs, new_cs = row_named(runs["cs"]["rows"], "adalora"), row_named(runs["cs_ada"]["rows"], "adalora")
    stuck = val_loss(before_math)[1] > 0.97 * val_loss(before_math)[0]
    share = new_math["trainable_parameters"] / lora["trainable_parameters"] if lora else None
    return (
        f"† AdaLoRA {'did not learn' if stuck else 'learned little'} in {runs['more']['budget']['steps']} steps at"
        f" {short_float(before_math['lr'])}, LoRA's rate ({loss(val_loss(before_math)[0])} →"
        f" {loss(val_loss(before_math)[1])}; commonsense {loss(val_loss(before_cs)[0])} →"
        f" {loss(val_loss(before_cs)[1])}; the rows of `methods_more.json` and `methods_commonsense.json`):"
        " its update B diag(E) A starts from E = 0 with small random A and B, a product of three small factors"
        " where LoRA's has two, and its orthogonality penalty takes much of the clipped gradient."
        f" At {short_float(new_math['lr'])}, now `bench/methods.py`'s rate for it, it learns"
        f" ({loss(val_loss(new_math)[1])} here, {loss(val_loss(new_cs)[1])} on commonsense)"
        + (
            f", at {runs['ada']['budget']['steps']} steps still behind LoRA ({loss(val_loss(lora)[1])}) with"
            f" {percent(share, 0)} of its parameters"
            if lora and val_loss(lora)[1] < val_loss(new_math)[1]
            else ""
        )
        + ". Its rows in this table and the commonsense one are runs of their own, the same budget and flags"
        " plus `--methods adalora` (commands below)."
    )


def commonsense(runs: dict) -> list[str]:
    cs = runs["cs"]
    rows, old = replace_rows(cs["rows"], runs["cs_ada"]["rows"])
    trained = trained_rows(rows)
    sets = [name for name in accuracy(rows[0]) if name != "Avg"]
    base, b, q = base_loss(trained), cs["budget"], questions_per_set(cs)
    head = ["method", "lr", "trainable params", "train tok/s", "held-out loss", "Alpaca val loss"]
    head += [COMMONSENSE_COLUMNS.get(name, name) for name in sets] + ["Avg"]
    avgs = [accuracy(row)["Avg"] for row in trained]
    worst = sorted(trained, key=lambda row: row["alpaca_val_loss"])[-3:]
    return [
        "#### Commonsense",
        "",
        *provenance(PATHS["cs"], cs),
        *para(
            f"{b['steps']} steps of {b['batch_size']} rows (max length {b['max_len']}) from the train sets of",
            f"ARC-Easy, ARC-Challenge, BoolQ and OpenBookQA ({cs['training_rows']:,} rows; the other sets of",
            f"commonsense_170k are not in the data folder), then the first {q} questions of each of the",
            f"{word(len(sets))} test sets, at most {cs['max_new_tokens']} new tokens.",
        ),
        *table(head, method_rows(rows, sets + ["Avg"], base, False, {name: f"{name} †" for name in old})),
        *para(
            'The base model almost never answers in the expected form ("answer3", "true"), so its',
            f"{accuracy(rows[0])['Avg']:.1f} is mostly unparsed answers; every method that learned the form jumps",
            f"to {min(avgs):.1f}-{max(avgs):.1f}. {word(q).capitalize()} questions per set, so one question is",
            f"{100 / q:g} points; PIQA, SIQA and WinoGrande have no training rows here, so their scores are transfer",
            "from the sets that do. Paying most on general Alpaca rows:",
            ", ".join(name_of(row["method"]) for row in reversed(worst)),
            f"({loss(worst[0]['alpaca_val_loss'])}-{loss(worst[-1]['alpaca_val_loss'])}, from the base's",
            f"{loss(rows[0]['alpaca_val_loss'])}). The held-out loss is over rows held out from the training sets;",
            f"methods starting at the base's {loss(base)} show only their end value.",
            "† as in the math table: the AdaLoRA row is its own run at its current rate (above).",
        ),
    ]
