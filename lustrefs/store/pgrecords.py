"""The control plane's file system records in the cluster's PostgreSQL database, and its lock across hosts.

Records are kept as their JSON text in one table, created on first use (under the advisory lock that
``lustrefs.store.pg`` also takes for its DDL, so two hosts starting at once do not race)::

    lustrefs.filesystems (id TEXT PRIMARY KEY, record TEXT NOT NULL, created_ns BIGINT NOT NULL)

Every call opens its own short connection (autocommit; libpq's environment applies, since the connection
string may be empty). Waits are bounded: connecting by ``pg.CONNECT_TIMEOUT_S``, each statement by
``pg.STATEMENT_TIMEOUT_MS``. Any database error becomes an ``FsxError`` (``InternalServerError``) that names the
database problem.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from lustrefs.errors import FsxError
from lustrefs.store import pg

SCHEMA = "lustrefs"
TABLE = f"{SCHEMA}.filesystems"
DDL_LOCK = "lustrefs schema"  # the advisory lock of every CREATE in the database (lustrefs.store.pg takes it too)
CONTROL_LOCK = "lustrefs control"  # the advisory lock that serialises control-plane changes across hosts
_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {TABLE} (
    id         TEXT PRIMARY KEY,   -- the file system id (fs-...)
    record     TEXT NOT NULL,      -- the record: FSx description plus private "_" fields, as JSON
    created_ns BIGINT NOT NULL     -- when the record was first stored (ns since the epoch)
);
"""


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    """Database errors raised in the block become FsxError ``InternalServerError`` naming the problem."""
    try:
        yield
    except psycopg.errors.QueryCanceled as exc:
        limit = pg.STATEMENT_TIMEOUT_MS / 1000
        message = f"The metadata database (PostgreSQL) did not answer within {limit:g} s: {_one_line(exc)}"
        raise FsxError("InternalServerError", message, operation) from None
    except psycopg.Error as exc:
        message = f"The metadata database (PostgreSQL) cannot be used: {_one_line(exc)}"
        raise FsxError("InternalServerError", message, operation) from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _database(conninfo: str, operation: str, tables: bool = True) -> Iterator[psycopg.Connection[Any]]:
    """A connection (the records table created first if ``tables``); database errors become FsxError."""
    with (
        _translated(operation),
        psycopg.connect(
            conninfo,
            autocommit=True,
            connect_timeout=pg.CONNECT_TIMEOUT_S,
            application_name="lustrefs",
            options=f"-c statement_timeout={pg.STATEMENT_TIMEOUT_MS}",
        ) as conn,
    ):
        if tables:
            _create_tables(conn)
        yield conn


def _create_tables(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT to_regclass(%s)", (TABLE,)).fetchone()
    if row is not None and row[0] is not None:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DDL_LOCK,))
        conn.execute(_DDL)


def check(conninfo: str, operation: str) -> None:
    """Connect once (configure-metadata-engine's validation); FsxError if the database cannot be used."""
    with _database(conninfo, operation, tables=False) as conn:
        conn.execute("SELECT 1")


def save(conninfo: str, fs_id: str, text: str, operation: str) -> None:
    """Store (insert or replace) the JSON ``text`` of file system ``fs_id``'s record."""
    with _database(conninfo, operation) as conn:
        conn.execute(
            f"INSERT INTO {TABLE} (id, record, created_ns) VALUES (%s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
            (fs_id, text, time.time_ns()),
        )


def load(conninfo: str, fs_id: str, operation: str) -> str | None:
    """The JSON text of ``fs_id``'s record, or None if there is none."""
    with _database(conninfo, operation) as conn:
        row = conn.execute(f"SELECT record FROM {TABLE} WHERE id = %s", (fs_id,)).fetchone()
    return None if row is None else row[0]


def load_all(conninfo: str, operation: str) -> list[tuple[str, str]]:
    """``(id, JSON text)`` of every record, oldest first."""
    with _database(conninfo, operation) as conn:
        return conn.execute(f"SELECT id, record FROM {TABLE} ORDER BY created_ns, id").fetchall()


def delete(conninfo: str, fs_id: str, operation: str) -> None:
    with _database(conninfo, operation) as conn:
        conn.execute(f"DELETE FROM {TABLE} WHERE id = %s", (fs_id,))


def drop_file_system(conninfo: str, fs_id: str, operation: str) -> None:
    """Remove file system ``fs_id``'s namespace (its schema, through ``pg.drop``)."""
    with _translated(operation):
        pg.drop(conninfo, fs_id)


@contextlib.contextmanager
def control_lock(conninfo: str, operation: str) -> Iterator[None]:
    """Hold the cluster's control-plane lock (a session advisory lock) for the block.

    Waiting for it is bounded by the statement timeout; the lock ends with the session even if this process
    dies, so a crashed host never leaves it held.
    """
    with _database(conninfo, operation, tables=False) as conn:
        try:
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (CONTROL_LOCK,))
        except psycopg.errors.QueryCanceled:
            message = (
                f"Another control-plane change held the cluster's lock for more than "
                f"{pg.STATEMENT_TIMEOUT_MS / 1000:g} s; try again."
            )
            raise FsxError("InternalServerError", message, operation) from None
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):  # a lost session has released it already
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (CONTROL_LOCK,))
