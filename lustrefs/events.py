"""The per-file-system JSON-lines event log (FSx's data repository event codes), and the formatter that keeps
the daemon log's lines what they seem: S3 keys and paths cannot forge a line or drive the terminal reading it."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# C0 controls but tab, DEL, C1 controls, the Unicode line and paragraph separators and the bidirectional overrides.
CONTROLS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape_char(m: re.Match[str]) -> str:
    c = m[0]
    return NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\r``, ``\\n``, ``\\x1b``…); other text unchanged."""
    return CONTROLS.sub(_escape_char, text)


class SafeFormatter(logging.Formatter):
    """A Formatter whose every line is one record's: control characters in the message are escaped, and in a
    traceback only the newlines Python puts between its lines are kept (the exception's message is escaped)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        for exc in _chain(ei[1]):
            for raw in (_text(exc), *(n for n in getattr(exc, "__notes__", None) or () if isinstance(n, str))):
                if raw and CONTROLS.search(raw):  # Python's own lines have none: the escapes land in the message
                    text = text.replace(raw, escape_controls(raw))
        return CONTROLS_BUT_NEWLINE.sub(_escape_char, text)  # e.g. in a file name

    def formatStack(self, stack_info: str) -> str:
        return CONTROLS_BUT_NEWLINE.sub(_escape_char, stack_info)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _text(exc: BaseException) -> str:
    """``str(exc)``, which the traceback module shows after the exception's name."""
    try:
        return str(exc)
    except Exception:
        return ""


class EventLog:
    """Appends one JSON object per line: time, level, code, key or path, message."""

    def __init__(
        self, path: Path, file_system_id: str, association_of: Callable[[str], str | None] | None = None
    ) -> None:
        """``association_of``: the data repository association holding a path or key (its events name it)."""
        self.path = path
        self.file_system_id = file_system_id
        self.association_of = association_of
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def emit(self, level: str, code: str, message: str, **fields: object) -> None:
        """Record an event; also logged to the daemon log at the matching level."""
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fileSystemId": self.file_system_id,
            "level": level,
            "code": code,
            "message": message,
            **fields,
        }
        where = fields.get("path") or fields.get("key")
        if self.association_of is not None and isinstance(where, str) and (found := self.association_of(where)):
            record["associationId"] = found
        os.write(self._fd, (json.dumps(record, sort_keys=False) + "\n").encode())
        log.log(logging.ERROR if level == "ERROR" else logging.WARNING, "%s: %s", code, message)

    def close(self) -> None:
        os.close(self._fd)
