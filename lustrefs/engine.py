"""The metadata engine a host is configured for: embedded SQLite (the default) or a cluster's PostgreSQL.

A host's setting comes from, in order: the environment (``LUSTREFS_METADATA_ENGINE`` = ``sqlite`` or
``postgresql``, with ``LUSTREFS_DATABASE`` = a libpq connection string or URI), else the file
``$LUSTREFS_HOME/metadata-engine.json`` (``{"engine": "postgresql", "conninfo": "..."}``, written by
``lustrefs configure-metadata-engine``), else SQLite. An empty connection string means libpq's own defaults and
environment (``PGHOST``, ``PGPORT``, ``PGDATABASE``, ``PGUSER``, ``PGPASSFILE``, ``PGSSLMODE``, ...). Every host
of a cluster names the same database.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
ENGINES = (SQLITE, POSTGRESQL)
CONFIG_FILE = "metadata-engine.json"


class EngineConfigError(ValueError):
    """The metadata engine setting is malformed."""


@dataclass(frozen=True)
class Engine:
    kind: str = SQLITE
    conninfo: str = ""  # PostgreSQL: a libpq connection string or URI ('' = libpq's defaults and environment)

    @property
    def shared(self) -> bool:
        """Whether several hosts share the file systems (the cluster engine)."""
        return self.kind == POSTGRESQL

    def to_json(self) -> dict[str, str]:
        return {"engine": self.kind, "conninfo": self.conninfo}


def _checked(kind: object, conninfo: object, where: str) -> Engine:
    if kind not in ENGINES:
        raise EngineConfigError(f"{where}: metadata engine {kind!r} is not one of {', '.join(ENGINES)}")
    if not isinstance(conninfo, str):
        raise EngineConfigError(f"{where}: the connection string must be a string")
    return Engine(str(kind), conninfo)


def configured(home: Path) -> Engine:
    """The engine this host is configured for (``home``: the lustrefs state directory)."""
    kind = os.environ.get("LUSTREFS_METADATA_ENGINE")
    if kind:
        return _checked(kind, os.environ.get("LUSTREFS_DATABASE", ""), "LUSTREFS_METADATA_ENGINE")
    path = home / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return Engine()
    except (OSError, ValueError) as exc:
        raise EngineConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineConfigError(f"{path}: not a JSON object")
    return _checked(data.get("engine"), data.get("conninfo", ""), str(path))
