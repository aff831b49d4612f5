"""Files written so that nothing half-written is ever read back, and JSON read so that a bad file is named."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Make `path` with `write(temporary path)`, flush it to disk, then rename it over `path`: whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def fsync(path: str | os.PathLike) -> None:
    """Flush a file or a folder's entries to disk, so that a rename after it never publishes unwritten data."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON value in `path`; a missing, unreadable, non-UTF-8 or malformed file raises `error` naming it."""
    return parse_json(read_bytes(path, error), path, error)


def read_bytes(path: str | os.PathLike, error: type[Exception] = ValueError) -> bytes:
    """The content of `path`; a missing or unreadable file raises `error` naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror})") from None


def parse_json(raw: bytes, path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON value of a file's bytes; `error` names the file, and the line and column at fault."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (line {line}, byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
