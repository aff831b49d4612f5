"""Conversation rows: OpenAI-style `messages` ({role, content}, TRL's conversational format) and ShareGPT's
`conversations` ({from, value}), checked and brought to one form: a list of {"role", "content"} with roles system,
user and assistant, a system message only first, user and assistant in turn, the last an answer."""

import json

from .sources import DataError
from .templates import check_text

FIELDS = ("messages", "conversations")  # the two shapes' columns; --columns may name another for either
ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system message
    "user": "user",
    "human": "user",  # ShareGPT's
    "assistant": "assistant",
    "gpt": "assistant",  # ShareGPT's
    "model": "assistant",
}
IMAGE_MARK = "<image>"  # LLaVA's place-holder for the image in a user turn; the adapter sees the image itself


def conversation_field(record: dict, columns: dict[str, str]) -> str | None:
    """The record's conversation column, if it has one that is not null."""
    names = [columns["messages"]] if "messages" in columns else list(FIELDS)
    return next((name for name in names if record.get(name) is not None), None)


def checked_messages(value, where: str) -> str:
    """A conversation, checked, as the JSON text of its messages in our form."""
    if isinstance(value, str):  # a CSV cell, or a column that stores each conversation as JSON
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise DataError(f"{where}: not a JSON list of messages") from None
    if hasattr(value, "tolist"):  # a column of structs read as an array
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(value).__name__}")
    messages = [_message(item, f"{where}[{i}]") for i, item in enumerate(value)]
    _check_turns(messages, where)
    return json.dumps(messages, ensure_ascii=False)


def _message(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a message object, got {type(item).__name__}")
    role = item.get("role", item.get("from"))
    if role not in ROLES:
        known = ", ".join(ROLES)
        raise DataError(f"{where}: role {role!r} is none of {known} (in 'role', or ShareGPT's 'from')")
    text = _text(item.get("content", item.get("value")), where)
    check_text(text, where)
    return {"role": ROLES[role], "content": text.replace(IMAGE_MARK + "\n", "").replace(IMAGE_MARK, "")}


def _text(content, where: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts (its image parts name the row's
    image, which the adapter sees whole)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part for part in content if isinstance(part, dict) and part.get("type") != "image"]
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in parts):
            return "\n".join(part["text"] for part in parts)
    raise DataError(f"{where}: 'content' must be text, or a list of {{'type': 'text', 'text': ...}} parts")


def _check_turns(messages: list[dict], where: str) -> None:
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        at = f"{where}[{i + len(messages) - len(turns)}]"
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise DataError(
                f"{at}: {message['role']} message out of turn, where the {expected}'s comes (a system message "
                "first if any, then user and assistant messages in turn)"
            )
        if not message["content"].strip():
            raise DataError(f"{at}: the {message['role']} message is empty")
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer, which the adapter learns")
