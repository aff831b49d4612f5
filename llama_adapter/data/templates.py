"""The prompt templates: Stanford Alpaca's, and the base tokenizer's own chat template; a conversation as the text
pieces a model is trained on; the check every text passes before it is tokenised.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}: at most one system
message, first; then user and assistant messages in turn. Alpaca rows are one exchange.
"""

import json

from .. import files
from .sources import DataError

TEMPLATES = ("alpaca", "chat")

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


def user_text(instruction: str, input: str = "") -> str:
    """An Alpaca row's instruction and input as one user message (the chat template has no input field)."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def choose(asked: str, conversational: bool, tokenizer) -> str:
    """--template: `asked`, or for "auto" the base's chat template where the data holds conversations and the base's
    tokenizer has one, Alpaca's otherwise (which every adapter trained before templates were chosen used)."""
    if asked == "chat" and not tokenizer.chat_template:
        raise ValueError("--template chat: this base's tokenizer has no chat template; use --template alpaca")
    if asked != "auto":
        return asked
    return "chat" if conversational and tokenizer.chat_template else "alpaca"


def instruction_prompt(template: str, tokenizer, instruction: str, input: str = "") -> str:
    """The prompt of one Alpaca-style instruction (and input) in `template`, as its rows are trained."""
    if template == "alpaca":
        return format_prompt(instruction, input)
    return prompt(template, tokenizer, [{"role": "user", "content": user_text(instruction, input)}])


def prompt(template: str, tokenizer, messages: list[dict]) -> str:
    """The text before the answer to `messages`, whose last message is the user's, as `template` renders it."""
    if template == "chat":
        return _rendered(tokenizer, messages, generation=True)
    system = messages[0]["content"].strip() + "\n\n" if messages[0]["role"] == "system" else HEADER_NO_INPUT
    turns = [m["content"] for m in messages if m["role"] != "system"]
    earlier = list(zip(turns[:-1:2], turns[1::2]))
    return format_conversation(earlier, turns[-1], header=system)


def row_pieces(template: str, tokenizer, row: dict) -> list[tuple[str, bool]]:
    """A training row as text pieces in order, each (text, whether it is an answer the loss trains on).

    Every answer's piece is what `template` adds for that answer after the prompt before it, so the prompt the
    model is trained on is exactly the one `prompt` gives at answering time. An Alpaca row under the Alpaca template
    keeps its input field (Alpaca's own prompt with an input).
    """
    if row.get("messages") is None and template == "alpaca":
        return [(format_prompt(row["instruction"], row["input"]), False), (row["output"], True)]
    messages = row_messages(row)
    pieces, done = [], ""
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    for i in answers:
        before = prompt(template, tokenizer, messages[:i])
        if template == "chat":
            after = _rendered(tokenizer, messages[: i + 1], generation=False)
        else:  # the last answer as written (as single rows train it), earlier ones as `prompt` shows them
            after = before + (messages[i]["content"] if i == answers[-1] else messages[i]["content"].strip())
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(
                "the base's chat template does not render a conversation's turns as prefixes of each other, so its "
                "answers cannot be told apart from its prompts; train with --template alpaca"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return pieces


def row_messages(row: dict) -> list[dict]:
    """A row's conversation: its messages, or an Alpaca row as one exchange."""
    if row.get("messages") is not None:
        return json.loads(row["messages"])
    user = {"role": "user", "content": user_text(row["instruction"], row["input"])}
    return [user, {"role": "assistant", "content": row["output"]}]


def _rendered(tokenizer, messages: list[dict], generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    # A template that writes the BOS token itself would get a second one from a tokenizer that adds it. (Asked only
    # of such templates: this runs for every turn of every row.)
    writes_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    adds_bos = writes_bos and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text.removeprefix(tokenizer.bos_token) if adds_bos else text


def check_text(text: str, where: str) -> None:
    """Refuse a string Python holds but no tokenizer can encode: one with a lone UTF-16 surrogate (from a JSON
    escape such as "\\ud800", or a command-line argument that was not UTF-8)."""
    found = files.LONE_SURROGATE.search(text)
    if found:
        raise DataError(
            f"{where}: not valid Unicode text (a lone surrogate {found.group()!a} at character {found.start()})"
        )
