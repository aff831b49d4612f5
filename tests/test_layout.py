"""The package is laid out as docs/architecture.md says: every module listed there and nothing listed that is not a
module, no import cycle (the page says there is none), no module over 400 lines, no function over 80."""

import re
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import layout

PAGE = REPO_ROOT / "docs" / "architecture.md"


def listed_modules(page: str) -> set[str]:
    """The files and folders of the package tree in the page's first code block, as paths under llama_adapter/ (a
    name's depth is its indentation, two spaces a level; a folder ends in /)."""
    tree = page.split("```")[1]
    folders: list[str] = []
    listed = set()
    for line in tree.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match or not match.group(2).endswith((".py", "/")):
            continue  # a description continued on the next line
        depth, name = len(match.group(1)) // 2, match.group(2)
        folders = folders[:depth]
        if depth and folders[:1] == ["llama_adapter/"]:
            listed.add("".join(folders[1:]) + name)
        if name.endswith("/"):
            folders.append(name)
    return listed


def test_the_page_lists_every_module_and_no_other():
    paths = [path.relative_to(layout.PACKAGE) for path in layout.modules().values()]
    # a package is listed as its folder (and its __init__.py, where it holds more than imports, may be listed too)
    actual = {f"{path.parent}/" if path.name == "__init__.py" else str(path) for path in paths} - {"./"}
    listed = {name for name in listed_modules(PAGE.read_text()) if not name.endswith("__init__.py")}
    # scienceqa/'s modules are named in its entry, not each on a line of its own
    folded = {name for name in actual if name.startswith("evaluation/scienceqa/") and name.endswith(".py")}
    entry = re.search(r"\n +scienceqa/(.*?)\n {0,4}\S+/ ", PAGE.read_text().split("```")[1], re.S).group(1)
    assert [name for name in sorted(folded) if name.split("/")[-1] not in entry] == []
    assert listed == actual - folded


def test_no_module_imports_one_that_imports_it_back():
    assert "No module imports one that imports it back" in PAGE.read_text()
    assert layout.cycles(layout.graph()) == []


def test_the_cycle_check_finds_a_cycle_through_a_type_checking_import(tmp_path):
    """The check counts imports inside functions and under TYPE_CHECKING, which Python's own import never runs."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert layout.cycles(edges) == [["a", "b", "c"]]
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .other import X\n")
    known = {"pkg.m": path, "pkg.other": tmp_path / "other.py"}
    assert layout.imports("pkg.m", path, known) == {"pkg.other"}


@pytest.mark.parametrize("limit", ["module", "function"])
def test_no_module_or_function_is_too_long(limit):
    assert [line for line in layout.too_long() if line.startswith(limit)] == []
