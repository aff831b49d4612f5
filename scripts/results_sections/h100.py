"""The partial H100 run of `bench/methods.py`, which ended before writing its JSON: its printed table is the record."""

import re

from .formatting import para
from .method_rows import name_of
from .sources import REPO

PATH = "bench/results/methods_h100_partial.md"


def h100_losses() -> dict[str, float]:
    """The held-out losses the partial H100 run logged, from the line of its markdown file that lists them."""
    text = " ".join((REPO / PATH).read_text().split())
    found = re.search(r"loss after the \d+ steps: (.*?)\.(?: |$)", text)
    if not found:
        return {}
    return {name: float(value) for name, value in (item.split() for item in found.group(1).split(", "))}


def h100_run() -> list[str]:
    text = (REPO / PATH).read_text()
    verbatim = ["#### " + line[2:] if line.startswith("# ") else line for line in text.rstrip("\n").splitlines()]
    return [
        "### Bigger budget, one H100 (partial)",
        "",
        *para(
            "Measured once, on a lent H100, and partial: the run ended before its last method and wrote no JSON.",
            f"What it printed is kept in `{PATH}`, reproduced here verbatim (its title as a heading of this page);",
            "it says which two of its columns are not to be trusted.",
        ),
        *verbatim,
        "",
        *h100_summary(text, h100_losses()),
    ]


def h100_summary(text: str, losses: dict[str, float]) -> list[str]:
    questions = re.search(r"first (\d+) questions", text)
    params = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 1 and cells[1].replace(",", "").isdigit():
            params[cells[0]] = int(cells[1].replace(",", ""))
    if not losses or not questions:
        return []
    best, worst = min(losses, key=losses.get), max(losses, key=losses.get)
    fewer = ""
    if params.get(best, 0) > params.get(worst, 0) > 0:
        fewer = f", with {params[best] / params[worst]:.0f}× fewer parameters than {name_of(best)},"
    return para(
        f"One question is {100 / int(questions.group(1)):g} points here; one seed, a 135M model. With this budget",
        f"{name_of(best)} learned the rationales best and {name_of(worst)}{fewer} the least.",
    )
