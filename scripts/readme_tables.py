"""Write README.md's two tables: the methods (from the method registry) and the headline measurements (from
bench/results/train_step.json and generation.json), each between its `<!-- table: NAME -->` markers.

python scripts/readme_tables.py      (tests/test_docs.py fails when a table is stale)
"""

import json
import re
from pathlib import Path

from llama_adapter import methods

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"
CAPABILITIES = {
    "takes_images": "images",
    "can_merge": "merge",
    "folds": "merge",
    "trains_jointly": "joint image-text training",
    "has_ranks": "any rank ≤ r",
    "shares_base": "shares a base",
}


def methods_table() -> str:
    lines = ["| `--method` | what trains | default `--lr` | can |", "|---|---|---|---|"]
    for name, method in methods.REGISTRY.items():
        what = " ".join(method.__doc__.strip().split("\n\n")[0].split())
        lr = f"{method.default_lr:.0e}".replace("e-0", "e-") if method.default_lr else "9e-3 × batch / 256"
        can = ", ".join(label for flag, label in CAPABILITIES.items() if getattr(method, flag))
        lines.append(f"| `{name}` | {what} | {lr} | {can or '–'} |")
    return "\n".join(lines)


def headline_table() -> str:
    step, generation = (json.loads((RESULTS / f"{name}.json").read_text()) for name in ("train_step", "generation"))
    timed, batches = step["methods"], generation["batches"]
    ours, peft = "this library", "Hugging Face PEFT (AdaptionPrompt)"
    batch, length = step["batch"]
    rows = [
        ("training step, s (× the frozen model's own)", *(_step(timed, m) for m in ("ours", "peft"))),
        (
            "activations kept for backward, MiB",
            *(f"{timed[m]['saved_activations_mib']:,.0f}" for m in ("ours", "peft")),
        ),
        *(
            (
                f"generation, batch {b}, tokens/s (× the base model's)",
                *(_generate(batches[b], m) for m in ("ours", "peft")),
            )
            for b in batches
        ),
    ]
    lines = [f"| SmolLM2-135M, L=30 K=10, {step['device']} | {ours} | {peft} |", "|---|---|---|"]
    lines += [f"| {label} | {a} | {b} |" for label, a, b in rows]
    lines.append("")
    lines.append(
        f"Training: a batch of {batch} × {length} tokens, forward, backward and AdamW (`{step['command']}`); "
        f"generation: {generation['new_tokens']} new tokens after {generation['prompt_len']} "
        f"(`{generation['command']}`). Both in `bench/results/`; more in [docs/results.md](docs/results.md)."
    )
    return "\n".join(lines)


def _step(timed: dict, method: str) -> str:
    return f"{timed[method]['median_s']:.1f} ({timed[method]['median_s'] / timed['floor']['median_s']:.2f}×)"


def _generate(batch: dict, method: str) -> str:
    return f"{batch[method]['tokens_per_s']:.1f} ({batch['base']['median_s'] / batch[method]['median_s']:.2f}×)"


TABLES = {"methods": methods_table, "headline": headline_table}


def render(readme: str) -> str:
    """README's text with every marked table rendered afresh."""
    for name, table in TABLES.items():
        pattern = re.compile(rf"(<!-- table: {name} -->\n).*?(<!-- end table -->)", re.DOTALL)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no '<!-- table: {name} -->' ... '<!-- end table -->' block")
        rendered = table()
        readme = pattern.sub(lambda match, rendered=rendered: match.group(1) + rendered + "\n" + match.group(2), readme)
    return readme


def main() -> None:
    README.write_text(render(README.read_text()))
    print(f"wrote the tables of {README}")


if __name__ == "__main__":
    main()
