"""A private PostgreSQL server: its own data directory and a unix socket only, stopped by its PID.

Used by ``make demo-cluster`` (lustrefs.demo.cluster), by the test suite (the ``postgres_server`` and
``pg_database`` fixtures of tests/conftest.py) and by the cluster benchmark (benchmarks/cluster.py). Not part of
the runtime: neither the CLI nor the daemon imports it.

``PostgresServer`` runs Debian's server binaries (``/usr/lib/postgresql/<version>/bin``, installed by
``make system-deps``; ``LUSTREFS_PG_BINDIR`` names another directory). ``start()`` runs ``initdb`` into a fresh
temporary directory (trust authentication, locale C, UTF8) and spawns ``postgres`` itself as a child of this
process, so its PID is the postmaster's and it is reaped here. The server listens on no TCP address
(``listen_addresses=''``), only on a socket in a private (0700) temporary directory. initdb and postgres refuse to
run as root: as root they run as the ``postgres`` system user, who then owns the temporary directories.

Every wait is bounded (``timeout``, 30 s by default) and fails with the end of the server's log.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

BINDIR_ENV = "LUSTREFS_PG_BINDIR"
BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"  # who runs initdb and postgres when this process runs as root
SUPERUSER = "postgres"  # the superuser initdb creates (-U), whoever runs it
PORT = 5432  # only names the socket (.s.PGSQL.5432): each server has a socket directory of its own
SOCKET_NAME = f".s.PGSQL.{PORT}"
MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes
INITDB_TIMEOUT = 120.0

# Settings for a throwaway server (the demo, the tests, the benchmark). fsync and full-page writes only guard
# against an operating-system crash, which a server thrown away at the end never lives through; synchronous_commit
# stays on, so a commit survives kill() (the simulated crash of the server). ``settings=`` overrides them.
DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "16MB",
    "max_wal_size": "256MB",
    "log_line_prefix": "%m [%p] %q%u@%d ",
}


class PostgresNotInstalled(RuntimeError):
    """The server binaries (initdb, postgres) or the system user to run them are missing."""


class PostgresError(RuntimeError):
    """The server did not initialise, start or stop in time (the message ends with its log)."""


def find_bindir() -> Path:
    """The directory of ``initdb`` and ``postgres``: ``$LUSTREFS_PG_BINDIR`` or Debian's newest version."""
    if os.environ.get(BINDIR_ENV):
        candidates = [Path(os.environ[BINDIR_ENV])]
    else:
        found = [Path(p).parent for p in glob.glob(f"{BINDIR_GLOB}/initdb")]
        candidates = sorted(found, key=lambda d: [int(n) for n in re.findall(r"\d+", d.parent.name)], reverse=True)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "postgres")):
            return bindir
    where = os.environ.get(BINDIR_ENV) or f"{BINDIR_GLOB}/initdb"
    raise PostgresNotInstalled(
        f"PostgreSQL server binaries not found ({where}): run `make system-deps` as root "
        "(it installs Debian's postgresql package), or point LUSTREFS_PG_BINDIR at a directory holding "
        "initdb and postgres"
    )


def process_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process (a zombie waiting for its parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X", "x")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the postmaster's backends and auxiliary processes)."""
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def _poll(condition: Callable[[], Any], timeout: float) -> bool:
    """Poll ``condition`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def _searchable_by_all(path: str) -> bool:
    """Whether every directory on the way to ``path`` lets other users through (the postgres user, as root)."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in (p, *p.parents))


def _quote(value: str) -> str:
    """A libpq conninfo value: bare if it can be, else single-quoted with backslash escapes."""
    if value and re.fullmatch(r"[A-Za-z0-9_./:@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PostgresServer:
    """One private PostgreSQL server: ``start()``, ``stop()``, ``kill()`` (a crash), ``restart()``."""

    def __init__(
        self, *, timeout: float = 30.0, settings: Mapping[str, str] | None = None, bindir: str | Path | None = None
    ) -> None:
        self.timeout = timeout
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        self.user = SUPERUSER
        self.port = PORT
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresNotInstalled(
                    f"running as root but there is no {SYSTEM_USER!r} system user to run PostgreSQL as: "
                    "run `make system-deps` (Debian's postgresql package creates it)"
                ) from None
        self.base_dir: Path | None = None  # data/ (the cluster) and server.log
        self.socket_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs (until ``stop()``/``kill()``), else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def log_path(self) -> Path:
        return self._base() / "server.log"

    def _base(self) -> Path:
        if self.base_dir is None:
            raise PostgresError("the server has no data directory: call start() first")
        return self.base_dir

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for database ``dbname`` on this server's socket, as the superuser."""
        if self.socket_dir is None:
            raise PostgresError("the server has no socket directory: call start() first")
        return f"host={_quote(str(self.socket_dir))} port={self.port} dbname={_quote(dbname)} user={_quote(self.user)}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, PostgresError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(the server log is empty)"

    # -- databases -------------------------------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create database ``name`` (from template0); returns its conninfo."""
        from lustrefs.store import pg  # psycopg is loaded only by those who use a database

        pg.create_database(self.conninfo(), name)
        return self.conninfo(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending the sessions still connected to it."""
        from lustrefs.store import pg

        pg.drop_database(self.conninfo(), name)

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise a fresh cluster (unless this server has one: after ``kill()``, the same data) and start it."""
        if self.running:
            raise PostgresError(f"the server is already running (PID {self.pid})")
        self._reap()
        if self.base_dir is None:
            self._initdb()
        self._launch()

    def stop(self) -> None:
        """Shut the server down (fast: sessions are ended) and remove its directories. Idempotent."""
        try:
            self._shutdown()
        finally:
            self._cleanup()

    def restart(self) -> None:
        """Shut down and start again on the same data directory and socket (the conninfo stays valid)."""
        self._base()
        self._shutdown()
        self._launch()

    def kill(self) -> None:
        """Simulate a crash: SIGKILL the postmaster and its processes at once. The data directory stays;
        ``start()`` then runs crash recovery on it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)  # frozen, it forks no new process while its children are killed
        self._kill_all(proc)
        self._reap()

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------------------------

    def _mkdtemp(self, prefix: str, short: bool = False) -> Path:
        root = tempfile.gettempdir()
        if self._owner is not None and not _searchable_by_all(root):
            root = "/tmp"
        if short and len(os.path.join(root, prefix + "x" * 8, SOCKET_NAME + ".lock")) > MAX_SOCKET_PATH:
            root = "/tmp"
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))  # mode 0700
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        return path

    def _popen_args(self) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        args: dict[str, Any] = {"env": env, "cwd": self._base(), "stdin": subprocess.DEVNULL, "start_new_session": True}
        if self._owner is not None:
            o = self._owner
            env.update(HOME=o.pw_dir, USER=o.pw_name, LOGNAME=o.pw_name)
            args.update(user=o.pw_uid, group=o.pw_gid, extra_groups=os.getgrouplist(o.pw_name, o.pw_gid))
        return args

    def _initdb(self) -> None:
        self.base_dir = self._mkdtemp("lustrefs-pg-")
        self.socket_dir = self._mkdtemp("pgsock-", short=True)
        argv = [
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **self._popen_args())
        try:
            out, _ = proc.communicate(timeout=INITDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # initdb and the bootstrap postgres it runs
            out, _ = proc.communicate(timeout=self.timeout)
            self._cleanup()
            output = out.decode(errors="replace")
            raise PostgresError(f"initdb did not finish within {INITDB_TIMEOUT}s:\n{output}") from None
        if proc.returncode != 0:
            self._cleanup()
            raise PostgresError(f"initdb failed (exit {proc.returncode}):\n{out.decode(errors='replace')}")

    def _launch(self) -> None:
        assert self.socket_dir is not None
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        settings = {
            **self.settings,
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "port": str(self.port),
        }
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the server runs; closed by _reap
        self._proc = proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, **self._popen_args())
        _LIVE.add(self)
        if not _poll(lambda: proc.poll() is not None or self._ready(proc.pid), self.timeout):
            self._kill_all(proc)
            self._reap()
            raise PostgresError(f"PostgreSQL did not start within {self.timeout}s; log:\n{self.log_tail()}")
        if proc.poll() is not None:
            code = proc.returncode
            self._reap()
            raise PostgresError(f"PostgreSQL exited at start (exit {code}); log:\n{self.log_tail()}")

    def _ready(self, pid: int) -> bool:
        """What pg_ctl -w checks: postmaster.pid is this postmaster's and says "ready"; and the socket is there."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() == "ready"
            and (self.socket_dir / SOCKET_NAME).exists()  # type: ignore[operator]
        )

    def _shutdown(self) -> None:
        """Stop the postmaster: SIGINT (fast shutdown: sessions are ended, a checkpoint is written), then SIGQUIT
        (immediate), then SIGKILL to it and its processes; each wait bounded. (SIGTERM is PostgreSQL's "smart"
        shutdown, which waits for every client to disconnect, so it is not used.)"""
        proc = self._proc
        if proc is None:
            return
        try:
            for sig, wait in ((signal.SIGINT, self.timeout), (signal.SIGQUIT, min(self.timeout, 10.0))):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait)
            else:
                if proc.poll() is None:
                    self._kill_all(proc)
        finally:
            self._reap()

    def _kill_all(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the postmaster and its children; wait (bounded) until none is left."""
        children = child_pids(proc.pid)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise PostgresError(f"PostgreSQL (PID {proc.pid}) survived SIGKILL for {self.timeout}s") from None
        # The children were re-parented when the postmaster died; whoever reaps them, they must be gone.
        if not _poll(lambda: not any(process_alive(pid) for pid in children), self.timeout):
            left = [pid for pid in children if process_alive(pid)]
            raise PostgresError(f"PostgreSQL processes {left} survived SIGKILL for {self.timeout}s")

    def _reap(self) -> None:
        """Forget an exited postmaster and close its log."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None:
            _LIVE.discard(self)
            if self._log is not None:
                self._log.close()
                self._log = None

    def _cleanup(self) -> None:
        self._reap()
        for path in (self.base_dir, self.socket_dir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self.base_dir = self.socket_dir = None


_LIVE: weakref.WeakSet[PostgresServer] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Servers left running (an interrupted demo, test session or benchmark) are stopped when the interpreter
    exits."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()
