"""The per-file-system JSON-lines event log (FSx's data repository event codes)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class EventLog:
    """Appends one JSON object per line: time, level, code, key or path, message."""

    def __init__(self, path: Path, file_system_id: str) -> None:
        self.path = path
        self.file_system_id = file_system_id
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
        os.write(self._fd, (json.dumps(record, sort_keys=False) + "\n").encode())
        log.log(logging.ERROR if level == "ERROR" else logging.WARNING, "%s: %s", code, message)

    def close(self) -> None:
        os.close(self._fd)
