"""Property-based bad input for every entry point: generated bad values of each kind, one contract.

The contract, for the command line: exit status 1, one line `llama-adapter <command>: error: ...` naming the flag,
file, line, row or field at fault, no traceback, and every file of the workspace (a base, adapters, a finished
training run, earlier predictions: tests/test_bad_input.py builds it) byte for byte what it was. For the Python API:
a `ValueError` (`DataError` is one) naming the same. Hypothesis generates the values; `derandomize` makes every run
try the same ones, so a failure here is reproducible, never a flake. docs/bad-input.md lists the kinds.
"""

import contextlib
import io
import json
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_bad_input import ROW, Workspace, build_workspace, jsonl, snapshot

from llama_adapter import cli
from llama_adapter.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from llama_adapter.data import reading, sources
from llama_adapter.model import LlamaAdapterModel
from llama_adapter.serving import demo
from llama_adapter.serving.logprobs import options_logprobs
from llama_adapter.train import loop

# Each property runs this many generated cases (fewer where one costs a model load); the note of issue 19 and
# docs/bad-input.md quote these numbers.
EXAMPLES = {"flags": 300, "outputs": 60, "rows": 200, "adapter_config": 80, "weights": 60, "text": 60, "files": 40}


def examples(kind: str):
    return settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(autouse=True)
def no_demo(monkeypatch):
    monkeypatch.setattr(demo, "launch", lambda *a, **k: pytest.fail("the demo started despite the bad input"))


def run(argv: list[str]) -> tuple[int, str]:
    """Run the command in this process: its exit status and what it wrote to stderr (an escaping exception, a
    traceback, fails the test that called this)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as exit:
            code = exit.code
            if isinstance(code, str):
                print(code, file=err)
                code = 1
            return code or 0, err.getvalue()
    return 0, err.getvalue()


def assert_refused(ws: Workspace, argv: list[str], names: str) -> str:
    """The contract: status 1, one error line that matches `names`, no traceback, nothing of the workspace changed."""
    before = snapshot(ws)
    code, stderr = run(argv)
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert code == 1, f"{argv}: exit status {code}\n{stderr[-2000:]}"
    assert len(errors) == 1 and re.match(r"llama-adapter( [\w-]+)*: error: ", errors[0]), stderr[-2000:]
    assert re.search(names, errors[0]), f"{errors[0]!r} does not name {names!r}"
    assert "Traceback" not in stderr
    assert snapshot(ws) == before, "a file that was there before changed"
    return errors[0]


def scratch(ws: Workspace) -> Path:
    """An empty folder for one generated case, outside what the snapshot guards."""
    here = ws.root / "cases" / "hardening"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    return here


# ----------------------------------------------------------------------------------------------------------
# Every numeric flag of every command: values out of its range, not finite, or not numbers at all


def numeric_flags() -> list[tuple[tuple[str, ...], str, type, dict]]:
    """(command words, flag, int or float, limits) for every numeric flag of every (sub)command."""
    found = []

    def walk(parser, words):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):  # subcommands
                for name, sub in action.choices.items():
                    walk(sub, (*words, name))
            elif getattr(action.type, "__name__", None) in ("int", "float") and action.option_strings:
                found.append((words, action.option_strings[0], action.type, getattr(action.type, "limits", None)))

    walk(cli.build_parser(), ())
    return found


NUMERIC_FLAGS = numeric_flags()


def test_every_numeric_flag_declares_its_range():
    assert len(NUMERIC_FLAGS) > 40
    unbounded = [f"{' '.join(words)} {flag}" for words, flag, _, limits in NUMERIC_FLAGS if not limits]
    assert not unbounded, f"numeric flags without limits: {unbounded}"


def minimal_argv(ws: Workspace, words: tuple[str, ...], here: Path) -> list[str]:
    """A command's required flags, valid: what a generated bad flag is added to."""
    required = {
        "train": ["--base", ws.base, "--data", ws.rows, "--out", str(here / "run")],
        "eval": ["--base", ws.base, "--data", ws.sqa, "--out", str(here / "p.jsonl")],
        "chat": ["--base", ws.base, "hi"],
        "demo": ["--base", ws.base],
        "serve": ["--base", ws.base],
        "convert": ["--base", ws.base, "--checkpoint", str(here / "x.pth"), "--out", str(here / "o")],
        "merge": ["--base", ws.base, "--adapter", ws.adapter, "--out", str(here / "o")],
    }
    return [*words, *required[words[0]]]


@st.composite
def out_of_range(draw, kind: type, limits: dict) -> str:
    """A value the flag must refuse, as typed on the command line."""
    choices = [st.sampled_from(["", "x", "one", "1,5", "0x10", "1e", "nan?", "∞"])]
    if kind is int:
        choices.append(st.sampled_from(["1.5", "1e3", "2.0"]))
    else:
        choices.append(st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "1e999"]))
    number = st.integers if kind is int else lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw)
    for name, bound in limits.items():
        if name == "at_least":
            choices.append(number(max_value=bound - 1) if kind is int else number(max_value=bound, exclude_max=True))
        elif name == "above":
            choices.append(number(max_value=bound))
        elif name == "at_most":
            choices.append(number(min_value=bound + 1) if kind is int else number(min_value=bound, exclude_min=True))
        elif name == "below":
            choices.append(number(min_value=bound))
    return str(draw(st.one_of(choices)))


@examples("flags")
@given(st.data())
def test_a_numeric_flag_out_of_its_range_is_refused_naming_it(ws, data):
    """every command | each numeric flag: values below or above its range, NaN and infinities, text that is no number"""
    words, flag, kind, limits = data.draw(st.sampled_from(NUMERIC_FLAGS), label="flag")
    value = data.draw(out_of_range(kind, limits), label="value")
    argv = [*minimal_argv(ws, words, scratch(ws)), f"{flag}={value}"]
    assert_refused(ws, argv, re.escape(f"argument {flag}"))


# ----------------------------------------------------------------------------------------------------------
# Outputs that cannot be written: refused before any work, naming --out


@examples("outputs")
@given(
    command=st.sampled_from(["train", "eval", "convert", "merge"]),
    where=st.sampled_from(["existing file", "under a file", "unwritable", "wrong kind"]),
    name=st.text(string.ascii_letters + string.digits + "-_. ", min_size=1, max_size=12).filter(
        lambda n: n.strip(". ")
    ),
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(ws, command, where, name):
    """train, eval, convert, merge | --out: an existing file, a path under a file, a place nobody may write (/sys), a folder where a file goes"""
    here = scratch(ws)
    (here / "taken").write_text("a file of the user's")
    out = {
        "existing file": here / "taken",
        "under a file": here / "taken" / name,
        "unwritable": Path("/sys") / name,  # sysfs: even root cannot make files there
        "wrong kind": here,  # a folder where eval writes a file; for the others, a folder is right: see below
    }[where]
    if where == "wrong kind" and command != "eval":
        out = here / "taken"
    if where == "existing file" and command == "eval":
        return  # an existing predictions file is resumed: that is its purpose
    argv = {
        "train": ["train", "--base", ws.base, "--data", ws.rows, "--out", str(out)],
        "eval": ["eval", "scienceqa", "--data", ws.sqa, "--base", ws.base, "--out", str(out)],
        "convert": ["convert", "--checkpoint", ws.rows, "--out", str(out), "--base", ws.base],
        "merge": ["merge", "--adapter", ws.adapter, "--out", str(out), "--base", ws.base],
    }[command]
    assert_refused(ws, argv, "--out ")
    assert (here / "taken").read_text() == "a file of the user's"


# ----------------------------------------------------------------------------------------------------------
# Training rows: one bad row among good ones is named by file, line (JSONL) or row (JSON list), and field

BAD_STRINGS = st.one_of(
    st.sampled_from(["", " ", "\n\t"]),  # empty
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), st.sampled_from(["\ud800", "\udfff", "\udc80"]),
              st.text(max_size=5)),  # a lone surrogate: JSON can escape it, no tokenizer can encode it
)  # fmt: skip
NOT_STRINGS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip


@st.composite
def bad_row(draw) -> tuple[object, str]:
    """A row record (or a raw line) that must be refused, and what the error must say about it."""
    kind = draw(st.sampled_from(["bad value", "missing", "not an object", "not JSON"]))
    if kind == "not an object":
        value = draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=5)))
        return (json.dumps(value) if isinstance(value, str) else value), "expected an object"  # a str is a raw line
    if kind == "not JSON":
        return draw(st.sampled_from(['{"instruction": ', "{'a': 1}", "[1,", "nul", '{"a" 1}'])), "invalid JSON"
    field = draw(
        st.sampled_from(["instruction", "output"] if kind == "missing" else ["instruction", "input", "output"])
    )
    if kind == "missing":
        return {k: v for k, v in ROW.items() if k != field}, f"missing field '{field}'"
    value = draw(NOT_STRINGS | BAD_STRINGS)
    if field == "input" and (value is None or (isinstance(value, str) and not value.strip())):
        value = "x\ud800"  # null and empty are a valid input: none
    return ROW | {field: value}, f"field '{field}'"


@examples("rows")
@given(good_before=st.integers(0, 3), good_after=st.integers(0, 3), bad=bad_row(), as_list=st.booleans())
def test_a_bad_training_row_is_named_by_file_line_and_field(ws, good_before, good_after, bad, as_list):
    """train, `reading.load_rows` | one bad row among good ones, JSON list or JSONL: null, non-string, empty or unencodable fields, missing fields, rows that are no object, lines that are no JSON"""
    record, says = bad
    if as_list and isinstance(record, str) and says == "invalid JSON":
        as_list = False  # a JSON list that does not parse is named by line and column instead: the next test
    rows = [ROW] * good_before + [record] + [ROW] * good_after
    here = scratch(ws)
    path = here / ("rows.json" if as_list else "rows.jsonl")
    if as_list:
        path.write_text(json.dumps(rows, ensure_ascii=True))
        where = f"row {good_before}"
    else:
        path.write_text(jsonl(*rows))
        where = f"line {good_before + 1}"
    with pytest.raises(sources.DataError) as raised:
        reading.load_rows(path)
    assert str(raised.value).startswith(f"{path}: {where}: ") and says in str(raised.value), str(raised.value)
    argv = ["train", "--base", ws.base, "--data", str(path), "--out", ws.run, "--no-resume"]
    assert_refused(ws, argv, re.escape(f"{path}: {where}: ") + ".*" + re.escape(says))


@examples("rows")
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"instruction": st.text(min_size=1).filter(str.strip), "output": st.text(min_size=1).filter(str.strip)}
        ),
        min_size=1,
        max_size=4,
    ),
    bom=st.booleans(),
    crlf=st.booleans(),
    as_list=st.booleans(),
    input_null=st.booleans(),
    indent=st.booleans(),
)
def test_rows_in_any_ordinary_encoding_read_the_same(ws, rows, bom, crlf, as_list, input_null, indent):
    """A byte-order mark, CRLF line ends, a pretty-printed list and `input: null` are how real files come."""
    here = scratch(ws)
    records = [row | ({"input": None} if input_null else {}) for row in rows]
    text = json.dumps(records, indent=2 if indent else None) if as_list else jsonl(*records)
    raw = text.replace("\n", "\r\n" if crlf else "\n").encode()
    path = here / "rows.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw)
    assert reading.load_rows(path).to_list() == [row | {"input": "", "image": None} for row in rows]


@examples("files")
@given(
    wrapper=st.dictionaries(
        st.text(string.ascii_letters, min_size=1, max_size=8).filter(lambda k: k != "instruction"),
        st.just([ROW]),
        min_size=1,
        max_size=3,
    ),
    indent=st.booleans(),
)
def test_a_json_object_wrapping_the_rows_is_named_as_such(ws, wrapper, indent):
    """train, `reading.load_rows` | a JSON object wrapping the rows under any keys, compact or indented"""
    path = scratch(ws) / "rows.json"
    path.write_text(json.dumps(wrapper, indent=2 if indent else None))
    with pytest.raises(
        sources.DataError, match=re.escape(f"{path}: one JSON object (keys ") + ".*expected a JSON list"
    ):
        reading.load_rows(path)


# ----------------------------------------------------------------------------------------------------------
# A saved adapter: adapter_config.json and adapter.safetensors, damaged in generated ways

SURROGATE_TEXT = st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), st.characters(min_codepoint=0xD800,
                           max_codepoint=0xDFFF), st.text(max_size=8))  # fmt: skip

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.sampled_from([-1, 0, 10**6, 10**9, 10**12, 2**63, 10**30, 1.5, float("nan")]),
    st.integers(), st.text(max_size=6), st.lists(st.integers(), max_size=2), st.just({"x": 1}),
)  # fmt: skip


def adapter_copy(ws: Workspace, here: Path, source: str | None = None) -> Path:
    folder = here / "adapter"
    shutil.copytree(source or ws.adapter, folder)
    return folder


@examples("adapter_config")
@given(section=st.sampled_from(["adapter", "visual", "base", None]), key=st.text(max_size=12), value=JSON_VALUES,
       pick_existing=st.booleans(), command=st.sampled_from(["chat", "demo"]))  # fmt: skip
def test_a_damaged_adapter_config_is_refused_naming_it_before_memory_is_allocated(
    ws, section, key, value, pick_existing, command
):
    """chat, demo, `LlamaAdapterModel.load` | adapter_config.json: any field of any section set to a bad value (null, wrong type, negative, absurd sizes up to 10^30), unexpected keys"""
    here = scratch(ws)
    folder = adapter_copy(ws, here)
    config = json.loads((folder / CONFIG_NAME).read_text())
    target = config if section is None else config[section]
    if pick_existing:
        key = sorted(target)[len(key) % len(target)]
    assume(target.get(key, ...) != value)
    target[key] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    harmless = (
        (section, key) == (None, "trainable_parameters")  # saved for people to read; never read back
        or ((section, key) == ("visual", "clip_seed") and type(value) is int and 0 <= value < 2**32)  # text-only
        or ((section, key) == ("base", "name") and isinstance(value, str))  # another name: only a warning
    )
    argv = {
        "chat": ["chat", "--adapter", str(folder), "--base", ws.base, "--max-new-tokens", "1", "hi"],
        "demo": ["demo", "--adapter", str(folder), "--base", ws.base],
    }[command]
    with mock.patch.object(demo, "launch") as launched:
        if harmless:
            assert run(argv)[0] == 0
        else:  # the config is named; or the weights, where a setting the base clamps (adapter_layers) no longer fits
            assert_refused(
                ws, argv, re.escape(str(folder)) + f"/({re.escape(CONFIG_NAME)}|{re.escape(WEIGHTS_NAME)}): "
            )
    assert launched.called == (harmless and command == "demo")


@st.composite
def damaged_weights(draw, tensors: dict[str, torch.Tensor]) -> tuple[dict | bytes, str]:
    """A damaged copy of an adapter's tensors (or bytes that are no safetensors file), and what the error names."""
    name = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["not finite", "shape", "missing", "extra", "dtype", "bytes"]))
    damaged = {k: v.clone() for k, v in tensors.items()}
    if kind == "not finite":
        flat = damaged[name].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
        return damaged, f"tensor {name} holds 1 values that are not finite"
    if kind == "shape":
        damaged[name] = torch.zeros(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
        return damaged, f"tensor {name} has shape"
    if kind == "missing":
        del damaged[name]
        return damaged, "missing tensors"
    if kind == "extra":
        damaged[draw(st.text(string.ascii_letters, min_size=1, max_size=8)) + ".weight"] = torch.zeros(2)
        return damaged, "unexpected tensors"
    if kind == "dtype":
        damaged[name] = damaged[name].to(torch.int32)
        return damaged, f"tensor {name} holds I32 values"
    return draw(st.binary(max_size=64)), "not a readable safetensors file"


@examples("weights")
@given(st.data())
def test_damaged_adapter_weights_are_refused_naming_the_file_and_tensor(ws, data):
    """chat, `LlamaAdapterModel.load` | adapter.safetensors: a NaN or infinity anywhere, a wrong shape, a missing or extra tensor, integers, random bytes"""
    here = scratch(ws)
    folder = adapter_copy(ws, here)
    damaged, says = data.draw(damaged_weights(load_file(folder / WEIGHTS_NAME)))
    if isinstance(damaged, bytes):
        (folder / WEIGHTS_NAME).write_bytes(damaged)
    else:
        save_file(damaged, folder / WEIGHTS_NAME)
    argv = ["chat", "--adapter", str(folder), "--base", ws.base, "--max-new-tokens", "1", "hi"]
    assert_refused(ws, argv, re.escape(f"{folder / WEIGHTS_NAME}: ") + ".*" + re.escape(says))


# ----------------------------------------------------------------------------------------------------------
# Text and arguments: lone surrogates and bytes that are not UTF-8, in any argument


@examples("text")
@given(text=SURROGATE_TEXT, flag=st.sampled_from([None, "--input", "--adapter", "--base", "--image"]))
def test_an_argument_that_is_not_text_is_refused_naming_it(ws, text, flag):
    """chat (every command) | arguments holding bytes that are not UTF-8 (lone surrogates): the instruction, --input, --adapter, --base, --image"""
    argv = ["chat", "--base", ws.base, "hi"] if flag else ["chat", "--base", ws.base, text]
    if flag:
        argv[1:1] = [flag, text]  # refused before any flag is read, so the later --base does not matter
    assert_refused(ws, argv, re.escape(flag) if flag else "argument 4")


@examples("text")
@given(text=SURROGATE_TEXT, through=st.sampled_from(["instruction", "input"]))
def test_the_api_refuses_text_no_tokenizer_can_encode(ws, text, through):
    """`LlamaAdapterModel.generate` | instructions and inputs with lone surrogates"""
    model = test_model(ws)
    with pytest.raises(ValueError, match="not valid Unicode text"):
        model.generate(text) if through == "instruction" else model.generate("hi", input=text)


_MODELS: dict[str, LlamaAdapterModel] = {}


def test_model(ws: Workspace) -> LlamaAdapterModel:
    if ws.root.name not in _MODELS:
        _MODELS[ws.root.name] = LlamaAdapterModel.load(ws.adapter, device="cpu")
    return _MODELS[ws.root.name]


test_model.__test__ = False  # a helper, not a test


# ----------------------------------------------------------------------------------------------------------
# Files given by flag: images, checkpoints to convert, ScienceQA problems and predictions


@examples("files")
@given(content=st.binary(max_size=200) | st.builds(lambda n: b"\x89PNG\r\n\x1a\n" + bytes(n), st.integers(0, 100)))
def test_an_image_that_is_not_one_is_refused_naming_it(ws, content):
    """chat | --image: random bytes, a PNG signature followed by nothing usable"""
    image = scratch(ws) / "picture.png"
    image.write_bytes(content)
    assert_refused(ws, ["chat", "--adapter", ws.visual_adapter, "--image", str(image), "hi"], re.escape(str(image)))


@examples("files")
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(st.text(max_size=20), st.integers() | st.text(max_size=5), max_size=3),
        st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda shape: {"adapter_query.weight": torch.zeros(shape)}),
        st.just({"adapter_query.weight": torch.zeros(6, 64), "layers.0.attention.gate": torch.zeros(3)}),
    )
)  # fmt: skip
def test_a_checkpoint_to_convert_that_is_not_one_is_refused_naming_it(ws, content):
    """convert | --checkpoint: random bytes, pickles of dicts of other things, prompts of the wrong shape, gates without layers"""
    here = scratch(ws)
    path = here / "release.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    argv = ["convert", "--checkpoint", str(path), "--out", str(here / "o"), "--base", ws.base]
    assert_refused(ws, argv, re.escape(str(path)))
    assert not (here / "o").exists()


def valid_in_problem(field: str, value) -> bool:
    """Whether `value` is a good value of `field` in the workspace's problems (two choices, no image files)."""
    text = isinstance(value, str) and value.strip() and not re.search("[\ud800-\udfff]", value)
    return {
        "question": text,
        "choices": isinstance(value, list) and value and all(isinstance(c, str) for c in value),
        "answer": type(value) is int and 0 <= value < 2,
        "hint": value is None or isinstance(value, str) and not re.search("[\ud800-\udfff]", value),
        "image": value is None,
        "subject": value in ("natural science", "social science", "language science"),
        "grade": isinstance(value, str) and re.fullmatch(r"grade([1-9]|1[0-2])", value),
        "split": text,
    }[field]


@examples("files")
@given(field=st.sampled_from(["question", "choices", "answer", "hint", "image", "subject", "grade", "split"]),
       value=JSON_VALUES | SURROGATE_TEXT, pid=st.sampled_from(["1", "2"]))  # fmt: skip
def test_a_damaged_scienceqa_problem_is_named_by_problem_and_field(ws, field, value, pid):
    """eval scienceqa | problems.json: any field of a problem set to a bad JSON value (null, wrong type, out of range, huge)"""
    here = scratch(ws)
    folder = here / "sqa"
    shutil.copytree(ws.sqa, folder)
    problems = json.loads((folder / "problems.json").read_text())
    assume(not valid_in_problem(field, value))
    problems[pid][field] = value
    (folder / "problems.json").write_text(json.dumps(problems))
    argv = ["eval", "scienceqa", "--data", str(folder), "--base", ws.base, "--out", str(here / "p.jsonl")]
    assert_refused(
        ws, argv, rf'problems.json: (problem {pid}: .*{field}|at \["{pid}"\]\["{field}"\]: not valid Unicode)'
    )


@examples("files")
@given(line=st.one_of(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b), JSON_VALUES.map(
    lambda v: json.dumps(v).encode()), st.just(b'{"pid": "1"}')))  # fmt: skip
def test_a_damaged_predictions_file_is_named_by_line(ws, line):
    """eval | a predictions file to resume with a bad line appended: random bytes, JSON that is no record, a torn record"""
    here = scratch(ws)
    predictions = here / "p.jsonl"
    predictions.write_bytes(Path(ws.predictions).read_bytes() + line + b"\n")
    written = predictions.read_bytes()
    argv = ["eval", "scienceqa", "--data", ws.sqa, "--base", ws.base, "--out", str(predictions)]
    assert_refused(ws, argv, re.escape(f"{predictions}: line 2: "))
    assert predictions.read_bytes() == written  # not one answer appended after the bad line


# ----------------------------------------------------------------------------------------------------------
# One at a time, and Ctrl-C: a run folder has one owner; an interrupted command exits quietly with status 130


@contextlib.contextmanager
def held_elsewhere(lock: Path):
    """Another process holds `lock`, as a training or an evaluation in progress does; killed on the way out."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()  # a crash: it cannot release its lock; the system does
        holder.wait()


HOLD_LOCK = """
import sys
from pathlib import Path
from llama_adapter import files
with files.held(Path(sys.argv[1]), "--out"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_training_on_the_same_out_is_refused_naming_the_first(ws, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = ["train", "--base", ws.base, "--data", ws.rows, "--out", str(run_dir), "--max-steps", "1"]
    with held_elsewhere(run_dir / ".lock") as pid:
        assert_refused(ws, argv, rf"--out .*run: in use by another process \(PID {pid}, its lock: .*run/\.lock\)")
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing of the run was written
    assert run(argv)[0] == 0  # the holder died: the folder is free at once
    assert (run_dir / "adapter.safetensors").is_file() and not (run_dir / ".lock").exists()


def test_a_second_evaluation_into_the_same_predictions_is_refused(ws, tmp_path):
    out = tmp_path / "p.jsonl"
    argv = ["eval", "scienceqa", "--data", ws.sqa, "--base", ws.base, "--out", str(out)]
    with held_elsewhere(tmp_path / ".p.jsonl.lock") as pid:
        assert_refused(ws, argv, rf"--out .*p.jsonl: in use by another process \(PID {pid}")
        assert not out.exists()
    assert run(argv)[0] == 0 and len(out.read_text().splitlines()) == 2


def test_ctrl_c_in_training_exits_quietly_and_the_next_run_resumes(ws, tmp_path, monkeypatch):

    argv = ["train", "--base", ws.base, "--data", ws.rows, "--out", str(tmp_path / "run"), "--max-steps", "4"]
    real_step, steps = loop.train_step, []

    def interrupted_at_step_3(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_at_step_3)
    code, stderr = run([*argv, "--save-every", "1"])
    assert code == cli.INTERRUPTED and stderr.strip().splitlines()[-1] == (
        "llama-adapter train: interrupted; the same command goes on from the last checkpoint"
    )
    assert "Traceback" not in stderr and not (tmp_path / "run" / ".lock").exists()
    monkeypatch.setattr(loop, "train_step", real_step)
    code, stderr = run([*argv, "--save-every", "1"])
    assert code == 0 and "Resuming from" in stderr and "step 2 of 4" in stderr


@pytest.mark.parametrize("where", ["at the prompt", "one-shot, while answering"])
def test_ctrl_c_in_chat_exits_quietly(ws, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "at the prompt":
        monkeypatch.setattr("builtins.input", interrupt)
        argv = ["chat", "--base", ws.base]
    else:
        monkeypatch.setattr(LlamaAdapterModel, "stream", interrupt)
        argv = ["chat", "--base", ws.base, "hi"]
    code, stderr = run(argv)
    assert code == cli.INTERRUPTED and stderr.strip().splitlines()[-1] == "llama-adapter chat: interrupted"
    assert "Traceback" not in stderr


def test_interactive_chat_with_standard_input_closed_says_so(ws, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a process started with stdin closed (<&-)
    assert_refused(ws, ["chat", "--base", ws.base], "standard input is closed: give the instruction as an argument")


def test_one_over_long_message_is_refused_alone_and_the_chat_goes_on(ws, monkeypatch, capsys):
    typed = iter(["word " * 600, "hi", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    cli.main(["chat", "--base", ws.base, "--max-new-tokens", "2"])
    printed = capsys.readouterr()
    assert "[refused: the message is" in printed.err and "tokens with the prompt template" in printed.err
    assert printed.out.count("\n") >= 2  # the banner, then the answer to "hi"


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_every_evaluation_refuses_a_limit_below_one(limit):
    """`--limit 0` once meant "all" in one place, and -1 "all but the last" in another."""
    from llama_adapter.evaluation.llm_adapters import load_questions
    from llama_adapter.evaluation.predict import EvalConfig

    with pytest.raises(ValueError, match="limit must be"):
        EvalConfig(data="d", out="o", limit=limit)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_questions("d", ("gsm8k",), limit)


# ----------------------------------------------------------------------------------------------------------
# The Python API: arguments of the wrong kind, empty paths, a model used twice over after unload

API_MISUSE = {
    "generate: input None": (lambda m: m.generate("hi", None), r"input must be a string, got NoneType None"),
    "generate: instruction None": (lambda m: m.generate(None), r"instruction must be a string, got NoneType None"),
    "generate: empty instruction": (lambda m: m.generate(""), r"instruction must be a non-empty string, got ''"),
    "generate: sampling a dict": (lambda m: m.generate("hi", sampling={"max_new_tokens": 2}),
                                  r"sampling must be a SamplingConfig, got dict"),
    "stream: instruction a number": (lambda m: m.stream(5), r"instruction must be a string, got int 5"),
    "save: ''": (lambda m: m.save(""), r"out_dir must be a non-empty string or path, got str ''"),
    "save: None": (lambda m: m.save(None), r"out_dir must be a non-empty string or path, got NoneType None"),
    "save: onto a file": (lambda m: m.save("taken"), r"out_dir taken: a file, expected a folder"),
    "load: ''": (lambda m: LlamaAdapterModel.load(""), r"adapter must be a non-empty string or path, got str ''"),
    "load: None": (lambda m: LlamaAdapterModel.load(None), r"adapter must be a non-empty string or path, got NoneType"),
    "load: base ''": (lambda m: LlamaAdapterModel.load("adapter", ""), r"base must be a non-empty string or path"),
    "from_base: None": (lambda m: LlamaAdapterModel.from_base(None), r"base must be a non-empty string or path"),
    "load_adapter_weights: ''": (lambda m: m.load_adapter_weights(""), r"path must be a non-empty string or path"),
    "unload twice": (lambda m: (m.unload(), m.unload()), r"no adapter named 'llama-adapter' is on this base"),
    "options_logprobs: a string": (lambda m: options_logprobs(m, ["p"], ["ab"]),
                                   r"options must be a list of which each is a list, got str 'ab'"),
    "options_logprobs: none": (lambda m: options_logprobs(m, ["p"], [[]]),
                               r"got 1 lists for 1 prompts, one of them empty"),
    "options_logprobs: one list short": (lambda m: options_logprobs(m, ["p", "q"], [["a"]]),
                                         r"got 1 lists for 2 prompts"),
    "options_logprobs: prompt None": (lambda m: options_logprobs(m, [None], [["a"]]),
                                      r"prompts must be a list of which each is a string, got NoneType None"),
    "encode_images: one path": (lambda m: m.encode_images("red.png"), r"images must be a list, got str 'red.png'"),
    "generate: image a number": (lambda m: m.generate("hi", image=5), r"image must be a non-empty string or path"),
}  # fmt: skip


@pytest.mark.parametrize("misuse", API_MISUSE, ids=list(API_MISUSE))
def test_the_api_refuses_misuse_with_a_value_error_naming_the_argument(misuse, multimodal, tmp_path, monkeypatch):
    """None, a wrong type or an empty path for an argument of `LlamaAdapterModel`'s public methods; a second unload."""
    call, message = API_MISUSE[misuse]
    model = multimodal()
    model.save(tmp_path / "adapter")
    (tmp_path / "taken").write_text("a file of the user's")
    monkeypatch.chdir(tmp_path)
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        call(model)
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # nothing written into the working folder


def test_a_base_neither_here_nor_reachable_is_named_at_once(make_model, tmp_path, monkeypatch):
    """Online but cut off (HF_HUB_OFFLINE unset, no network), transformers would retry the hub for a minute."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM

    class Unreachable:
        def head(self, *args, **kwargs):
            raise ConnectionError("no network")

    make_model().save(tmp_path / "prompts")
    config = json.loads((tmp_path / "prompts" / CONFIG_NAME).read_text())
    config["base"]["name"] = "v2m"  # as `merge --out v2m` once recorded it: a folder relative to where it ran
    (tmp_path / "prompts" / CONFIG_NAME).write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_session", Unreachable)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("asked the hub"))
    message = (
        r"prompts/llama_adapter_config.json: base 'v2m': no folder of that name in the working folder, no model of "
    )
    with pytest.raises(FileNotFoundError, match=message + "that name in the Hugging Face cache, and the hub cannot be"):
        LlamaAdapterModel.load(tmp_path / "prompts", device="cpu")


def test_every_evaluation_refuses_questions_that_name_a_pid_twice_before_answering(make_model, tmp_path):
    """Answered twice, a pid would be written twice: a predictions file that no resume could read."""
    from llama_adapter.evaluation import llm_adapters
    from llama_adapter.evaluation.predict import evaluate_questions

    question = llm_adapters.Question("gsm8k/0", "gsm8k", "What is 1 and 1?", "", "2")
    with pytest.raises(ValueError, match=r"questions: pid gsm8k/0 twice \(questions 0 and 1\)"):
        evaluate_questions(make_model(), [question, question], tmp_path / "p.jsonl", ("gsm8k",), max_new_tokens=1)
    assert not any(tmp_path.iterdir())
