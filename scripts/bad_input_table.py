"""Write docs/bad-input.md: every bad-input case of tests/test_bad_input.py, its command and the message it gets,
then the kinds of bad input tests/test_hardening.py generates, with how many cases each property test runs.

python scripts/bad_input_table.py     (about 20 s; the messages are the ones the tests check, run here again)
"""

import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import test_hardening
from test_bad_input import CASES, build_workspace, run_case, snapshot

from llama_adapter import demo


def main() -> None:
    demo.launch = lambda *args, **kwargs: sys.exit("the demo started despite bad input")
    lines = [
        "# Bad input: what each entry point says",
        "",
        "Made by `python scripts/bad_input_table.py` from the cases of `tests/test_bad_input.py`, which checks each of",
        "them: the exit code is 1, the message names the file and the line, row or field, and every file that was",
        "already there (a base, adapters, a finished training run with its checkpoint, earlier predictions) is",
        "unchanged byte for byte. Paths are shortened to the part that matters.",
        "",
        "| entry point | bad input | command | message after `llama-adapter <command>: error:` |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        ws = build_workspace(Path(tmp))
        before = snapshot(ws)
        for case in CASES:
            argv, code, message = run_case(case, ws)
            if code == 0 or not re.search(case.message, message) or snapshot(ws) != before:
                sys.exit(f"case {case.name!r} did not fail as the tests expect: exit {code}, {message!r}")
            shown = [_shown_argument(_short(arg, tmp)) for arg in argv]
            error = _short(message.split(": error: ", 1)[1], tmp)
            lines.append(f"| {case.entry} | {case.name} | `llama-adapter {' '.join(shown)}` | {_cell(error)} |")
    lines += generated_kinds()
    out = REPO / "docs" / "bad-input.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(CASES)} cases -> {out}")


def generated_kinds() -> list[str]:
    """The table of tests/test_hardening.py's property tests: entry points, what is generated, cases per run."""
    lines = [
        "",
        "## Generated bad input",
        "",
        "`tests/test_hardening.py` generates bad values of each kind below with Hypothesis (the same values on every",
        "run: `derandomize`) and holds every one to the contract above: status 1, one line naming the flag, file,",
        "line, row or field, no traceback, no file of the workspace changed; in the Python API, a `ValueError`.",
        "",
        "| entry point | generated | cases per run |",
        "|---|---|---|",
    ]
    tests = [getattr(test_hardening, name) for name in dir(test_hardening) if name.startswith("test_")]
    generated = [test for test in tests if hasattr(test, "hypothesis") and " | " in (test.__doc__ or "")]
    for test in sorted(generated, key=lambda test: test.hypothesis.inner_test.__code__.co_firstlineno):
        entry, kind = (" ".join(part.split()) for part in test.__doc__.split(" | ", 1))
        cases = test._hypothesis_internal_use_settings.max_examples
        lines.append(f"| {entry} | {_cell(kind)} | {cases} |")
    return lines


def _short(text: str, root: str) -> str:
    """Temporary paths without their temporary part: .../cases/<case>/rows.jsonl -> rows.jsonl."""
    text = re.sub(re.escape(root) + r"/cases/[^/]+/", "", text)
    return text.replace(root + "/", "")


def _shown_argument(arg: str) -> str:
    """An argument as the table shows it: bytes that are not UTF-8 escaped, a long one cut short."""
    arg = arg.encode("utf-8", "backslashreplace").decode()
    return arg if len(arg) <= 40 else f"{arg[:20]}... ({len(arg):,} characters)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    main()
