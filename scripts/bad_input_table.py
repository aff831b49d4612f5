"""Write docs/bad-input.md: every bad-input case of tests/test_bad_input.py, its command and the message it gets,
the bad requests of tests/test_serve_faults.py and the answer the server gives each, then the kinds of bad input
tests/test_hardening.py generates, with how many cases each property test runs.

python scripts/bad_input_table.py     (about 20 s; the messages are the ones the tests check, run here again)
"""

import json
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import test_hardening
from test_bad_input import CASES, build_workspace, run_case, snapshot
from test_serve_faults import API_CASES, chat, completion

from llama_adapter.config import ModelConfig
from llama_adapter.serving import demo
from llama_adapter.serving.api import ServerThread, build_app
from llama_adapter.serving.models import load_models


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
        lines += api_requests(ws)
    lines += generated_kinds()
    out = REPO / "docs" / "bad-input.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(CASES)} cases -> {out}")


def api_requests(ws) -> list[str]:
    """The table of the server's bad requests: each sent to a server over the workspace's base, as the test does."""
    lines = [
        "",
        "## Bad requests to `llama-adapter serve`",
        "",
        "Each request below, from `tests/test_serve_faults.py`, is refused alone with OpenAI's error JSON",
        '(`{"error": {"message", "type", "param", "code"}}`); the requests beside it are answered as if it',
        "had never come. `…` stands for a good request's fields (model, messages or prompt, max_tokens).",
        "",
        "| bad request | endpoint | body | status | param | message |",
        "|---|---|---|---|---|---|",
    ]
    server = ServerThread(build_app(load_models(ModelConfig(base=ws.base, precision="fp32"), (), "base"), None, 8, 64))
    try:
        for case in API_CASES:
            request = urllib.request.Request(server.url + case.path, case.body, {"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=60)
                sys.exit(f"request {case.name!r} was answered, not refused")
            except urllib.error.HTTPError as err:
                status, error = err.code, json.load(err)["error"]
            if (status, error["param"]) != (case.status, case.param) or case.says not in error["message"]:
                sys.exit(f"request {case.name!r} did not fail as the tests expect: {status}, {error}")
            body = _shown_body(case.body)
            param = f"`{error['param']}`" if error["param"] else ""
            lines.append(
                f"| {case.name} | `{case.path}` | `{_cell(body)}` | {status} | {param} | {_cell(error['message'])} |"
            )
    finally:
        server.stop()
    return lines


def _shown_body(body: bytes) -> str:
    """A request's body as the table shows it: the fields every case shares as `…`, a long body cut short."""
    text = body.decode()
    for good in (chat(), completion()):
        shared = good.decode()[:-1]
        text = text.replace(shared + ", ", "{…, ").replace(shared + "}", "{…}")
    return text if len(text) <= 80 else f"{text[:30]}... ({len(text):,} characters)"


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
