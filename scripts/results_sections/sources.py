"""The results files the sections read, and the lines that tell a reader where a file's numbers came from."""

import hashlib
import json
from pathlib import Path

from .formatting import command_block, para
from .notes import RUN_NOTES

REPO = Path(__file__).resolve().parents[2]


def load(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def note(path: str) -> list[str]:
    """The paragraph of the note on the committed run of `path`, or nothing where that run has none."""
    digest = hashlib.sha256((REPO / path).read_bytes()).hexdigest()[:12]
    text = RUN_NOTES.get(path, {}).get(digest, "")
    return para(text) if text else []


def where(results: dict) -> str:
    return f"{results['device']}, {results['precision']}, torch {results['torch']}"


def provenance(path: str, results: dict) -> list[str]:
    """The command that wrote a benchmark file, where it ran, and the note on that run if there is one."""
    return [
        *para(f"Command (results in `{path}`; ran on {where(results)}):"),
        *command_block(results["command"]),
        *note(path),
    ]


def is_cpu(results: dict) -> bool:
    return results["device"].startswith("CPU")
