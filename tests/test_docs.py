"""The generated documentation is up to date: docs/cli.md from the config dataclasses, docs/results.md from the results
files, README's tables from the method registry and the benchmark results; and README stays a front door."""

import json
import shlex
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import cli_doc
import readme_tables
import results_doc


@pytest.mark.parametrize(
    ("page", "render", "command"),
    [
        ("docs/cli.md", cli_doc.render, "python scripts/cli_doc.py"),
        ("docs/results.md", results_doc.render, "python scripts/results_doc.py"),
        (
            "README.md",
            lambda: readme_tables.render((REPO_ROOT / "README.md").read_text()),
            "python scripts/readme_tables.py",
        ),
    ],
)
def test_generated_pages_are_up_to_date(page, render, command):
    assert (REPO_ROOT / page).read_text() == render(), f"{page} is stale: run {command}"


def test_the_readme_is_a_front_door():
    readme = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 150
    assert readme[2:5] == [
        "```bash",
        "bash scripts/setup.sh && .venv/bin/llama-adapter demo    # set up, chat with the trained adapters in your browser: http://127.0.0.1:7860",
        "bash scripts/setup.sh && .venv/bin/python -m pytest      # set up, run the test suite",
    ]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in ci  # CI runs the README's test command
    for link in ("cli", "training", "methods", "evaluation", "demo", "results", "architecture", "testing"):
        assert (REPO_ROOT / "docs" / f"{link}.md").is_file() and f"(docs/{link}.md)" in "\n".join(readme)


@pytest.mark.parametrize(
    "path", sorted(REPO_ROOT.glob("*/results/*.json")), ids=lambda path: str(path.relative_to(REPO_ROOT))
)
def test_results_files_are_strict_json(path):
    """Python writes NaN and Infinity, which JSON lacks: other readers (jq, a browser) refuse such a file."""

    def refuse(constant: str):
        raise ValueError(f"{path.relative_to(REPO_ROOT)} holds {constant}: write null for a value not measured")

    json.loads(path.read_text(), parse_constant=refuse)


def readme_commands() -> list[str]:
    """The `llama-adapter ...` lines of README's code blocks, without their trailing comments."""
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith("llama-adapter ")]


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    """A flag renamed or dropped since the quick start was written would greet a new user with an error."""
    from llama_adapter.cli import build_parser

    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == command.split()[1]
