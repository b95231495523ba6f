"""The private PostgreSQL server the cluster tests run against (lustrefs/demo/localpg.py; fixtures in conftest)."""

from __future__ import annotations

import os
import pwd
import select
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import wait_for

from lustrefs.demo.localpg import SOCKET_NAME, PostgresError, PostgresServer, child_pids, process_alive

WAIT_S = 10.0


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


@pytest.fixture
def private_server() -> Iterator[PostgresServer]:
    """A server of this test's own, for the tests that stop, crash or restart it."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("run", [1, 2])
def test_table_round_trip_in_a_fresh_database(pg_database: str, run: int) -> None:
    # The second run would fail on CREATE TABLE if the database were shared between tests.
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        conn.execute("CREATE TABLE kv (k text PRIMARY KEY, v bytea NOT NULL)")
        conn.cursor().executemany("INSERT INTO kv VALUES (%s, %s)", [("a", b"\x00\x01"), ("é/ü", b"x" * 1000)])
    with psycopg.connect(pg_database) as conn:
        rows = conn.execute("SELECT k, v FROM kv ORDER BY k").fetchall()
    assert rows == [("a", b"\x00\x01"), ("é/ü", b"x" * 1000)]


def test_server_listens_on_its_private_socket_only(postgres_server: PostgresServer, pg_database: str) -> None:
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW lc_collate").fetchone() == ("C",)
        assert conn.execute("SHOW max_connections").fetchone() == ("200",)
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)
        assert conn.info.host == str(postgres_server.socket_dir)
        assert conn.info.dbname.startswith("test_")
    sock_dir = postgres_server.socket_dir
    assert sock_dir is not None and (sock_dir / SOCKET_NAME).exists()
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    # The server runs as the postgres system user when the tests run as root, else as the tests' user.
    expected_uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert postgres_server.pid is not None and _uid_of(postgres_server.pid) == expected_uid
    assert postgres_server.data_dir.stat().st_uid == expected_uid


def test_database_names_are_quoted(postgres_server: PostgresServer) -> None:
    name = "odd name 'with' quotes\\"
    conninfo = postgres_server.create_database(name)
    try:
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        postgres_server.drop_database(name)
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(conninfo, connect_timeout=int(WAIT_S)).close()


def test_listen_notify_between_connections(pg_database: str) -> None:
    with (
        psycopg.connect(pg_database, autocommit=True) as listener,
        psycopg.connect(pg_database, autocommit=True) as sender,
    ):
        received: list[psycopg.Notify] = []
        listener.add_notify_handler(received.append)
        listener.execute("LISTEN lustrefs_events")
        sender.execute("SELECT pg_notify('lustrefs_events', 'inode 42 changed')")
        # Wait (bounded) for the listener's socket to turn readable; a query then hands the notification over.
        deadline = time.monotonic() + WAIT_S
        while not received and time.monotonic() < deadline:
            select.select([listener.fileno()], [], [], deadline - time.monotonic())
            listener.execute("SELECT 1")
        assert [(n.channel, n.payload, n.pid) for n in received] == [
            ("lustrefs_events", "inode 42 changed", sender.info.backend_pid)
        ]


def test_advisory_lock_is_exclusive_and_released_with_the_session(pg_database: str) -> None:
    key = 0x1057_2E5
    with psycopg.connect(pg_database, autocommit=True) as other:
        holder = psycopg.connect(pg_database, autocommit=True)
        try:
            assert holder.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
            assert other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (False,)
            assert other.execute("SELECT pg_try_advisory_lock(%s)", (key + 1,)).fetchone() == (True,)
        finally:
            holder.close()
        # The holder's backend ends after the client has gone: the lock is free once it has.
        wait_for(
            lambda: other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,),
            WAIT_S,
            "the advisory lock to be released by the closed session",
        )


def test_restart_keeps_the_data(private_server: PostgresServer) -> None:
    conninfo = private_server.create_database("app")
    with psycopg.connect(conninfo) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2), (3)")
    idle = psycopg.connect(conninfo, autocommit=True)  # an open session must not hold the shutdown up
    try:
        old_pid, socket_dir, data_dir = private_server.pid, private_server.socket_dir, private_server.data_dir
        assert old_pid is not None
        private_server.restart()
        assert _pid_gone(old_pid)
        assert private_server.running and private_server.pid not in (None, old_pid)
        assert (private_server.socket_dir, private_server.data_dir) == (socket_dir, data_dir)
        assert private_server.conninfo("app") == conninfo
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    finally:
        idle.close()
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (6,)


def test_kill_is_a_crash_and_start_recovers(private_server: PostgresServer) -> None:
    conninfo = private_server.create_database("app")
    with psycopg.connect(conninfo) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (7)")
    session = psycopg.connect(conninfo, autocommit=True)
    try:
        backend = session.info.backend_pid
        pid = private_server.pid
        assert pid is not None and backend in child_pids(pid)
        private_server.kill()
        assert _pid_gone(pid)
        assert not process_alive(backend)
        assert private_server.pid is None and not private_server.running
        assert private_server.data_dir.is_dir()  # kept for crash recovery
    finally:
        session.close()
    private_server.start()
    assert "automatic recovery in progress" in private_server.log_tail(100)
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]


def test_stop_leaves_no_process_and_no_files(private_server: PostgresServer) -> None:
    session = psycopg.connect(private_server.conninfo(), autocommit=True)
    try:
        pid, backend = private_server.pid, session.info.backend_pid
        base_dir, socket_dir = private_server.base_dir, private_server.socket_dir
        assert pid is not None and base_dir is not None and socket_dir is not None
        auxiliaries = child_pids(pid)
        assert backend in auxiliaries
        private_server.stop()
        assert _pid_gone(pid)
        assert not any(process_alive(p) for p in auxiliaries)
        assert not base_dir.exists() and not socket_dir.exists()
        assert private_server.pid is None and not private_server.running
        private_server.stop()  # idempotent
    finally:
        session.close()
    private_server.start()  # a fresh cluster
    with psycopg.connect(private_server.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_server_that_cannot_start_fails_with_its_log() -> None:
    server = PostgresServer(settings={"shared_buffers": "lots"})
    try:
        started = time.monotonic()
        with pytest.raises(PostgresError, match=r"(?s)exited at start.*shared_buffers"):
            server.start()
        assert time.monotonic() - started < server.timeout
        assert not server.running and server.pid is None
    finally:
        server.stop()
