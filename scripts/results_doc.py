"""Render docs/results.md, every measured table and its prose, from the results files committed in the repository.

python scripts/results_doc.py

The sections live in `results_sections/`, a module for each kind of results file; this script sets their order.
"""

from results_sections.formatting import para
from results_sections.gpu import on_a_gpu
from results_sections.methods import methods
from results_sections.precision import precision, scienceqa_scoring
from results_sections.quantize import quantize
from results_sections.scienceqa import scienceqa, scienceqa_sweep
from results_sections.serving import demo_latency, serving, serving_faults
from results_sections.sources import REPO
from results_sections.speed import distributed, finetune, generation, speed_intro, train_step
from results_sections.training import alpaca, colours, shelf
from results_sections.v2 import v2_comparison

OUT = REPO / "docs" / "results.md"


def intro() -> list[str]:
    return [
        "# Results",
        "",
        *para(
            "Every table on this page is rendered by `python scripts/results_doc.py` from the results files committed",
            "in the repository, named in each section: to change a number, re-run the command a section gives (it",
            "rewrites its results file) and then the script, never edit this page. Each section gives that command",
            "and where it ran: the device, precision and torch version a benchmark file records, or, for the",
            "training and evaluation scripts, whose files do not record them, the machine they ran on. Ratios are",
            "always to a baseline measured in the same run, and each section says which.",
        ),
        *para(
            "No pretrained CLIP weights exist offline, so wherever an image encoder appears here it is a randomly",
            "initialised, frozen CLIP: the numbers that depend on it are the coloured-shapes experiment (the only",
            "multimodal measurement), which therefore checks the wiring of the visual path, not picture",
            "understanding. Every other number on this page is text-only and does not depend on CLIP.",
        ),
    ]


def render() -> str:
    sections = [
        intro(),
        shelf(),
        alpaca(),
        colours(),
        scienceqa(),
        scienceqa_sweep(),
        methods(),
        v2_comparison(),
        quantize(),
        speed_intro(),
        train_step(),
        generation(),
        precision(),
        scienceqa_scoring(),
        serving(),
        serving_faults(),
        finetune(),
        distributed(),
        demo_latency(),
        on_a_gpu(),
    ]
    lines = [line.rstrip() for section in sections for line in section]
    text = "\n".join(lines).strip("\n") + "\n"
    # a section that leaves out an optional paragraph leaves its blank line beside the next one's
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def main() -> None:
    OUT.write_text(render())
    print(OUT)


if __name__ == "__main__":
    main()
