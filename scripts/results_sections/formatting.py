"""How docs/results.md writes numbers, prose, tables and commands, the same way in every section."""

import re
import textwrap

WIDTH = 118  # prose is wrapped here; table rows are not
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def fixed(x: float, decimals: int) -> str:
    return f"{x:,.{decimals}f}"


def seconds(x: float) -> str:
    """3 significant digits below 1 s, 4 up to 100 s, whole seconds above."""
    if x >= 100:
        return fixed(x, 0)
    if x >= 10:
        return fixed(x, 2)
    if x >= 1:
        return fixed(x, 3)
    return f"{x:.3f}"


def spread(timing: dict) -> str:
    """A benchmark's repetitions as `median (min-max)` seconds: the spread says how far to trust a ratio."""
    return f"{seconds(timing['median_s'])} ({seconds(timing['min_s'])}-{seconds(timing['max_s'])})"


def speed(x: float) -> str:
    """Tokens per second."""
    return fixed(x, 0) if x >= 1000 else fixed(x, 1)


def loss(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.4f}"


def mib(x: float) -> str:
    return fixed(x, 0) if x >= 1000 else fixed(x, 1)


def percent(share: float, decimals: int = 1) -> str:
    return f"{100 * share:.{decimals}f}%"


def short_float(x: float, digits: int = 2) -> str:
    """Scientific notation without padding: 0.009 -> 9e-3, 0.000140625 -> 1.41e-4, 1.31e-06 -> 1.3e-6."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def word(n: int) -> str:
    return WORDS.get(n, str(n))


def epochs_text(n: int) -> str:
    return f"{word(n)} epoch" + ("s" if n != 1 else "")


def cell(text: str) -> str:
    """Free text (model answers) as one table cell: one line, markdown characters escaped, long text cut."""
    text = " ".join(text.split())
    if len(text) > 240:
        text = text[:240].rsplit(" ", 1)[0] + " …"
    for char in ("\\", "`", "*", "_", "|"):
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;")


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def para(*parts: str) -> list[str]:
    """A paragraph, wrapped; a line never starts with something markdown would read as a block."""
    lines = textwrap.wrap(" ".join(parts), WIDTH, break_long_words=False, break_on_hyphens=False)
    for line in lines[1:]:
        if re.match(r"([-+*>#|]|\d+[.)])( |$)", line):
            raise ValueError(f"a wrapped line would start a markdown block: {line!r}")
    return [*lines, ""]


def bullets(*items: str) -> list[str]:
    """A list of the items that are not empty, so that a section can leave out a finding its file does not show."""
    out = []
    for item in items:
        if item:
            out += textwrap.wrap(
                item, WIDTH, initial_indent="- ", subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
            )
    return [*out, ""]


def command_block(command: str) -> list[str]:
    """A shell command in a code block, long ones continued over lines before their flags."""
    lines, current = [], ""
    for part in re.split(r" (?=--)", command):
        if current and len(current) + 1 + len(part) > 100:
            lines.append(current + " \\")
            current = "    " + part
        else:
            current = f"{current} {part}" if current else part
    return ["```bash", *lines, current, "```", ""]
