"""Files written so that nothing half-written is ever read back, and JSON read so that a bad file is named."""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
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


def check_path(path, name: str) -> None:
    """Refuse a path argument `name` that names nothing: not a string or path, or '' (the working folder, unasked:
    `config.check_fields` refuses it for a flag)."""
    if not isinstance(path, (str, os.PathLike)) or path == "":
        raise ValueError(f"{name} must be a non-empty string or path, got {type(path).__name__} {path!r:.60}")


def check_can_write(path: str | os.PathLike, flag: str, folder: bool) -> None:
    """Refuse an output `path` (a folder, or a file if not `folder`) that cannot be written, before any work is
    done; nothing is created."""
    check_path(path, flag)
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, expected = ("a file", "a folder") if folder else ("a folder", "a file")
        raise ValueError(f"{flag} {path}: {kind}, expected {expected}")
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so nothing can be made under it")
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({err.strerror})") from None


def check_outside(path: str | os.PathLike, flag: str, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output `path` that is, or is inside, one of the `inputs` folders (by what they are: "the base
    model's folder"), symbolic links resolved: what a command writes there would replace what it reads."""
    out = Path(path).resolve()
    for what, folder in inputs.items():
        folder = Path(folder).resolve()
        if out == folder or folder in out.parents:
            inside = "" if out == folder else "inside "
            raise ValueError(f"{flag} {path}: is {inside}{what} {folder}; choose a folder outside it")


@contextlib.contextmanager
def held(lock: Path, what: str) -> Iterator[None]:
    """Hold the lock file `lock` for this process alone while the block runs; `what` (the output it guards) is
    refused to a second process, which is told the PID of the first.

    The lock is an flock on the file, which the system drops when its process dies: a crashed run never leaves
    its output locked. The file, holding the PID, is removed on the way out.
    """
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 32).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise ValueError(f"{what}: in use by another process (PID {holder}, its lock: {lock})") from None
        if _same_file(lock, handle):
            break
        os.close(handle)  # the holder before us removed this file as we opened it: take the new one
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(handle)


def _same_file(path: Path, handle: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


def sha256(path: str | os.PathLike) -> str:
    """The content hash of a file, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def digest(*values: Any) -> str:
    """A content hash of JSON values, the same in every process and run."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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


def parse_json(raw: bytes, path: str | os.PathLike, error: type[Exception] = ValueError, text_only: bool = True) -> Any:
    """The JSON value of a file's bytes; `error` names the file, and the line and column at fault.

    With `text_only`, a string holding a lone surrogate (JSON can escape one, "\\ud800"; no tokenizer can encode
    it) is refused too, naming where in the value it is; without, the caller checks its strings itself.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (line {line}, byte {err.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None
    if text_only and SURROGATE_ESCAPE.search(raw):  # only then can a decoded string hold one
        where = _lone_surrogate(value, "")
        if where is not None:
            raise error(f"{path}: at {where[0] or 'the top'}: not valid Unicode text (a lone surrogate {where[1]})")
    return value


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, where: str) -> tuple[str, str] | None:
    """(where in `value`, the character) of the first lone surrogate in its strings, keys included, or None."""
    if isinstance(value, str):
        found = LONE_SURROGATE.search(value)
        return (where, ascii(found.group())) if found else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{where}[{json.dumps(key)}]"
        found = _lone_surrogate(key, inner) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, inner)
        if found:
            return found
    return None


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
