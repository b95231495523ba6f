"""An embedded local S3 endpoint (moto's server in a subprocess) and the demo's sample data set.

Used by ``python -m lustrefs.demo``, by the test suite and by the benchmarks. Everything binds and connects to
127.0.0.1 only. moto keeps its data in memory: :meth:`LocalS3.stop` and :meth:`LocalS3.restart` lose every
bucket and object.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import http.client
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lustrefs.s3client import make_client

HOST = "127.0.0.1"
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Environment variables any one of which means "credentials are configured" for boto3's chain.
_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
# Keys of a shared config/credentials profile that give boto3 credentials.
_CREDENTIAL_KEYS = (
    "aws_access_key_id",
    "credential_process",
    "role_arn",
    "sso_session",
    "sso_start_url",
    "web_identity_token_file",
)


class LocalS3Error(RuntimeError):
    """The local endpoint could not be started or did not answer in time."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _default_profile_has_credentials(env: Mapping[str, str]) -> bool:
    home = env.get("HOME") or os.path.expanduser("~")
    files = (
        (env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"), "default"),
        (env.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"), "default"),
    )
    for path, section in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue
        if parser.has_section(section) and any(parser.has_option(section, k) for k in _CREDENTIAL_KEYS):
            return True
    return False


def ensure_test_credentials(env: MutableMapping[str, str]) -> bool:
    """Put moto's dummy credentials (``testing``/``testing``, region us-east-1) into ``env`` if it has none.

    Credentials count as configured when any AWS credential or profile variable is set, or when the default
    profile of the shared credentials/config file holds credentials; then ``env`` is left untouched, so real
    credentials are never overwritten. Returns True when the test credentials were set.
    """
    if any(env.get(v) for v in _CREDENTIAL_VARS) or _default_profile_has_credentials(env):
        return False
    env["AWS_ACCESS_KEY_ID"] = TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"]
    env["AWS_SECRET_ACCESS_KEY"] = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    if not (env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")):
        env["AWS_DEFAULT_REGION"] = TEST_CREDENTIALS["AWS_DEFAULT_REGION"]
    return True


def ensure_local_only(env: MutableMapping[str, str]) -> None:
    """Keep clients using ``env`` off the network: no HTTP proxy for 127.0.0.1, no EC2 metadata lookups."""
    for var in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in (env.get(var) or "").split(",") if h.strip()]
        for h in (HOST, "localhost"):
            if h not in hosts:
                hosts.append(h)
        env[var] = ",".join(hosts)
    env.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate ``proc`` by its PID, wait, and kill it if it has not exited after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_answers(port: int, timeout: float = 1.0) -> bool:
    """Whether an HTTP server on 127.0.0.1:``port`` answers a request (any status)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _environ_for_local_client() -> Iterator[None]:
    """Apply ensure_test_credentials and ensure_local_only to ``os.environ``, and undo them on exit."""
    with _ENV_LOCK:
        saved = dict(os.environ)
        ensure_test_credentials(os.environ)
        ensure_local_only(os.environ)
        try:
            yield
        finally:
            for name in set(os.environ) - set(saved):
                del os.environ[name]
            for name, value in saved.items():
                if os.environ.get(name) != value:
                    os.environ[name] = value


class LocalS3:
    """moto's S3 server in a subprocess on ``127.0.0.1:port``.

    ``port=None`` picks a free port at the first :meth:`start` and keeps it for :meth:`restart`. The server's
    output goes to ``log_path`` (appended to); by default a temporary file that :meth:`stop` removes. moto
    keeps everything in memory: stopping or restarting the server loses all buckets and objects.
    Use as a context manager (``with LocalS3() as s3: ...``) or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self._port = port
        self._fixed_port = port is not None
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # --- properties -----------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1; known once the server has been started (or when given)."""
        if self._port is None:
            raise LocalS3Error("LocalS3 has not been started: no port yet")
        return self._port

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The PID of the running server process, or None when it is not running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # --- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> LocalS3:
        """Start the server and wait (at most ``startup_timeout`` seconds) until it answers HTTP."""
        if self.running:
            raise LocalS3Error(f"LocalS3 already running (pid {self.pid})")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="lustrefs-moto-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        # A picked port can be taken between the pick and the server's bind: pick again a few times.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if self._port is None or (attempt and not self._fixed_port):
                self._port = free_port()
            try:
                self._spawn()
                return self
            except LocalS3Error:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        env = dict(os.environ)
        ensure_test_credentials(env)
        ensure_local_only(env)
        env["PYTHONUNBUFFERED"] = "1"
        assert self.log_path is not None
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the server's lifetime
        cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]
        # Own session: a Ctrl-C in the terminal reaches the owner, who stops the server in order.
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, self.stop_timeout)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if http_answers(self.port) and proc.poll() is None:
                return
            if proc.poll() is not None:
                msg = f"moto server exited with status {proc.returncode} before answering on port {self.port}"
                self._cleanup_process()
                raise LocalS3Error(f"{msg}\n{self._log_tail()}")
            if time.monotonic() >= deadline:
                self._cleanup_process()
                raise LocalS3Error(
                    f"moto server did not answer on {self.endpoint_url} within {self.startup_timeout:g} s\n"
                    f"{self._log_tail()}"
                )
            # Wait for the process to exit or for the next poll, whichever is first.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)

    def _cleanup_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _terminate(self._proc, self.stop_timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, n: int = 20) -> str:
        try:
            lines = Path(self.log_path or "").read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return f"last lines of {self.log_path}:\n" + "\n".join(lines[-n:])

    def stop(self) -> None:
        """Terminate the server by its PID (SIGTERM, then SIGKILL after ``stop_timeout``) and reap it.

        Removes the default temporary log file. Idempotent. All data is lost.
        """
        self._cleanup_process()
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def restart(self) -> None:
        """Stop the server and start a new one on the same port (same ``endpoint_url``); all data is lost."""
        port = self.port
        self._cleanup_process()
        fixed, self._fixed_port = self._fixed_port, True
        self._port = port
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    def reset(self) -> None:
        """Delete every bucket and object (moto's ``/moto-api/reset``), keeping the server running."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request("POST", "/moto-api/reset")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise LocalS3Error(f"moto reset failed: HTTP {resp.status}")
        finally:
            conn.close()

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client for this endpoint (``lustrefs.s3client.make_client``; kwargs passed on).

        When no credentials are configured the client gets the test credentials, and 127.0.0.1 bypasses any
        configured HTTP proxy. boto3 reads both while it creates the client, so they are put into
        ``os.environ`` only for that moment (restored afterwards; not safe against threads reading the
        environment at the same time).
        """
        with _environ_for_local_client():
            return make_client(self.endpoint_url, **kwargs)

    def __enter__(self) -> LocalS3:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._port is not None else "no port"
        return f"LocalS3({where}, pid={self.pid})"


# --- the demo's sample data set -----------------------------------------------------------
SAMPLE_BIG_FILES = {"data/genomes/chr1.fa": 3 * 1024 * 1024, "data/genomes/chr2.fa": 5 * 1024 * 1024}
SAMPLE_DIR_MARKER = "data/empty-dir/"
SAMPLE_BAD_KEY = "data/bad/../escape.txt"
SAMPLE_POSIX_METADATA = {
    "file-permissions": "0100640",
    "file-owner": "1000",
    "file-group": "1000",
    "file-mtime": "1600000000000000000ns",
    "file-atime": "1600000000000000000ns",
}
SAMPLE_POSIX_KEY = "data/posix/owned-by-1000.txt"
SAMPLE_TEXT_FILES = {
    "data/README.txt": (
        "lustrefs demo data set\n"
        "======================\n"
        "genomes/     two FASTA files of 3 MiB and 5 MiB (deterministic pseudo-random bases)\n"
        "results/     an implied directory: its keys exist, no directory marker object does\n"
        "empty-dir/   a directory marker object and nothing else\n"
        "posix/       objects carrying FSx POSIX metadata (x-amz-meta-file-*)\n"
        "bad/../escape.txt is not a POSIX path and is skipped on import\n"
    ),
    "data/genomes/README.md": "# genomes\n\nchr1.fa and chr2.fa: synthetic sequences, seeded PRNG.\n",
    "data/results/run1/summary.csv": "sample,reads,mapped\nA,1000,987\nB,2000,1950\n",
    "data/results/run1/log.txt": "run1 started\nrun1 finished: 0 errors\n",
    "data/results/run2/summary.csv": "sample,reads,mapped\nC,1500,1499\n",
    SAMPLE_POSIX_KEY: "owned by uid 1000, gid 1000, mode 0640, mtime 2020-09-13T12:26:40Z\n",
    "data/posix/script.sh": "#!/bin/sh\necho hello from lustrefs\n",
}
_SAMPLE_METADATA = {
    SAMPLE_POSIX_KEY: SAMPLE_POSIX_METADATA,
    "data/posix/script.sh": {**SAMPLE_POSIX_METADATA, "file-permissions": "0100755"},
}
_BASES = bytes(b"ACGT"[i % 4] for i in range(256))


def fasta_bytes(name: str, size: int, seed: int) -> bytes:
    """A deterministic FASTA file of exactly ``size`` bytes: a header and 60-base lines from a seeded PRNG."""
    header = f">{name} synthetic seed={seed}\n".encode()
    bases = random.Random(seed).randbytes(size).translate(_BASES)
    lines = b"\n".join(bases[i : i + 60] for i in range(0, len(bases), 60))
    body = header + lines
    return body[: size - 1] + b"\n"


def populate_sample(s3: Any, bucket: str, prefix: str = "") -> dict[str, str]:
    """Upload the demo's sample data set into the existing ``bucket`` under ``prefix``.

    ``prefix`` gets a trailing ``/`` if it lacks one. Creates nested directories, two big FASTA files
    (3 and 5 MiB), small text files, a directory marker (SAMPLE_DIR_MARKER), an implied directory
    (``data/results/`` has no markers), objects with FSx POSIX metadata (SAMPLE_POSIX_KEY) and one key that is
    not a POSIX path (SAMPLE_BAD_KEY). Returns ``{key: sha256 hex}`` of the objects that become regular files
    on import (the marker and the non-POSIX key are left out); keys include the prefix.
    """
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    files: dict[str, bytes] = {k: v.encode() for k, v in SAMPLE_TEXT_FILES.items()}
    for seed, (key, size) in enumerate(SAMPLE_BIG_FILES.items(), start=1):
        files[key] = fasta_bytes(Path(key).stem, size, seed)
    hashes: dict[str, str] = {}
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + key, Body=body, Metadata=_SAMPLE_METADATA.get(key, {}))
        hashes[prefix + key] = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key=prefix + SAMPLE_DIR_MARKER, Body=b"")
    s3.put_object(Bucket=bucket, Key=prefix + SAMPLE_BAD_KEY, Body=b"this key is not a POSIX path\n")
    return hashes
