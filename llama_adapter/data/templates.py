"""The Stanford Alpaca prompt templates, and the check every text passes before it is tokenised."""

from .. import files
from .sources import DataError

# The Stanford Alpaca templates, with a newline after "### Response:" so the answer starts on its own line.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
HEADER_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_NO_INPUT = HEADER_NO_INPUT + TURN


def format_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_conversation(earlier: list[tuple[str, str]], instruction: str, header: str = HEADER_NO_INPUT) -> str:
    """A multi-turn prompt: the header once, each earlier (instruction, answer) exchange, the new instruction.

    With the Alpaca header and no earlier exchanges it is exactly `format_prompt(instruction)`, the prompt the adapter
    was trained on; a system message may take the header's place.
    """
    exchanges = "".join(TURN.format(instruction=asked) + answer.strip() + "\n\n" for asked, answer in earlier)
    return header + exchanges + TURN.format(instruction=instruction)


def check_text(text: str, where: str) -> None:
    """Refuse a string Python holds but no tokenizer can encode: one with a lone UTF-16 surrogate (from a JSON
    escape such as "\\ud800", or a command-line argument that was not UTF-8)."""
    found = files.LONE_SURROGATE.search(text)
    if found:
        raise DataError(
            f"{where}: not valid Unicode text (a lone surrogate {found.group()!a} at character {found.start()})"
        )
