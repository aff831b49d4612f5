"""The documentation leads somewhere: every relative link in README.md and docs/*.md names a file or folder of the
repository, and every #anchor a heading of the page it points into (as GitHub makes its id) or an explicit
<a id/name>; and docs/methods.md names every module of llama_adapter/methods/ (tests/test_layout.py holds
docs/architecture.md to the whole package)."""

import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})")
ATX_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r" {0,3}(=+|-+)[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\n\n).)+?\1", re.S)  # a code span ends by its paragraph
# An inline link or image's destination, whatever its text: ](target) or ](target "title") or ](<target>)
INLINE_LINK = re.compile(r"\]\(\s*(?:<([^>]*)>|([^\s()]+))(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)", re.M)
HTML_TARGET = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""")
LINE_ANCHOR = re.compile(r"L\d+(?:-L\d+)?")  # GitHub's anchors into a source file's lines
EXTERNAL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:|//")  # http:, https:, mailto:, a protocol-relative URL


def prose(page: str) -> list[str]:
    """The page's lines, those of fenced code blocks blanked (so that no comment in one reads as a heading)."""
    lines, fence = [], None
    for line in page.splitlines():
        marker = FENCE.match(line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and marker and marker.group(1).startswith(fence) and not line.strip(" \t" + fence[0]):
            fence = None  # a closing fence: the opening's character, at least as many, nothing else
        elif fence is None:
            lines.append(line)
            continue
        lines.append("")
    return lines


def slug(heading: str) -> str:
    """The id GitHub gives a heading: its text as shown, lower case, without punctuation (but - and _), each space
    a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    """Every #anchor into the page: its headings' ids (the nth repeat of one gets -n) and its explicit <a> ids."""
    lines = prose(page)
    headings = []
    for i, line in enumerate(lines):
        atx = ATX_HEADING.match(line)
        if atx:
            headings.append(atx.group(1) or "")
        elif i and lines[i - 1].strip() and SETEXT_UNDERLINE.match(line) and not ATX_HEADING.match(lines[i - 1]):
            headings.append(lines[i - 1].strip())
    found, seen = set(), Counter()
    for heading in headings:
        base = slug(heading)
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found | set(HTML_ANCHOR.findall("\n".join(lines)))


def link_targets(page: str) -> list[str]:
    """The destinations of the page's links and images, outside code (fenced or inline)."""
    text = INLINE_CODE.sub("", "\n".join(prose(page)))
    inline = [angled or bare for angled, bare in INLINE_LINK.findall(text)]
    return inline + REFERENCE.findall(text) + HTML_TARGET.findall(text)


def broken_links(page: Path, root: Path = REPO_ROOT) -> list[str]:
    """The page's relative links that lead nowhere, each with why."""
    broken = []
    for target in link_targets(page.read_text()):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        goal = (page.parent / path).resolve() if path else page
        if not goal.is_relative_to(root.resolve()) or not goal.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and goal.suffix == ".md" and anchor not in anchors(goal.read_text()):
            broken.append(f"{target}: no heading or <a id> '{anchor}' in {goal.name}")
        elif anchor and goal.suffix != ".md" and not (goal.is_file() and LINE_ANCHOR.fullmatch(anchor)):
            broken.append(f"{target}: '{anchor}' is no anchor into {goal.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_each_kind_of_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "src.py").write_text("x = 1\n")
    (tmp_path / "docs" / "other.md").write_text(
        "# Other\n\n## Serving the OpenAI API: `llama-adapter serve` under load\n\n## Twice\n\n## Twice\n\n"
        "Setext heading\n--------------\n\n"
        '<a id="kept"></a>\n\n```bash\n# Not a heading\n```\n'
    )
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Several GPUs: `--nproc`, torchrun, DDP and FSDP\n\n"
        "Good: [a](other.md), [b](other.md#serving-the-openai-api-llama-adapter-serve-under-load), [c](#page),\n"
        "[d](#several-gpus---nproc-torchrun-ddp-and-fsdp), [e](other.md#twice-1), [f](other.md#kept), "
        "![g](../src.py), [h](../src.py#L1-L2), [i](https://example.com/nowhere.md#x), [j](other.md#setext-heading),\n"
        '[k](<other.md#twice> "title"), `[code](missing.md)`, [folder](../docs).\n\n'
        "```markdown\n[in a fence](missing.md)\n```\n\n"
        "Bad: [1](missing.md), [2](other.md#serving-the-openai-api), [3](#nowhere), [4](other.md#twice-2),\n"
        '[5](other.md#not-a-heading), [6](../src.py#top), [7](../../outside.md), <img src="gone.png">\n\n'
        "[8]: missing-reference.md\n"
    )
    assert [line.split(":")[0] for line in broken_links(page, tmp_path)] == [
        "missing.md",
        "other.md#serving-the-openai-api",
        "#nowhere",
        "other.md#twice-2",
        "other.md#not-a-heading",
        "../src.py#top",
        "../../outside.md",
        "missing-reference.md",
        "gone.png",
    ]


def test_the_methods_page_names_every_module_of_methods():
    page = (REPO_ROOT / "docs" / "methods.md").read_text()
    package = REPO_ROOT / "llama_adapter" / "methods"
    modules = sorted(path.relative_to(package.parent).as_posix() for path in package.rglob("*.py"))
    assert "methods/method.py" in modules  # the glob sees the package
    assert [module for module in modules if module not in page] == []
