"""The S3 endpoint of a run, always on 127.0.0.1: moto's server, s3rver (npm), or a given loopback URL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lustrefs.demo import locals3
from lustrefs.demo.locals3 import HOST, LocalS3, free_port
from lustrefs.s3client import make_client

from .host import CaseError, is_loopback_url, stop_pid, tool_version

KINDS = ("moto", "s3rver")
S3RVER_PACKAGE = "s3rver@3"
S3RVER_DIR = Path(__file__).resolve().parent / ".s3rver"  # git-ignored npm prefix
STARTUP_TIMEOUT = 60.0


@dataclass
class Endpoint:
    """A running S3 endpoint and how to reach it."""

    kind: str  # "moto", "s3rver" or "external"
    url: str
    access_key: str
    secret_key: str
    version: str
    region: str = "us-east-1"
    pid: int | None = None
    data_dir: Path | None = None  # s3rver's on-disk store (objects can be written there directly)

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and lustrefs) at this endpoint and nowhere else."""
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), HOST, "localhost"]))
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
        if self.kind != "external":
            env |= {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        return env

    def client(self, pool: int = 16, read_timeout: float = 120) -> Any:
        """A boto3 S3 client for this endpoint (the process environment must hold :meth:`env`)."""
        return make_client(self.url, self.region, max_pool_connections=pool, read_timeout=read_timeout)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


def apply_env(endpoint: Endpoint) -> None:
    """Make this process (and the commands it starts) use ``endpoint``'s credentials only."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        os.environ.pop(var, None)
    if endpoint.kind != "external":
        os.environ.pop("AWS_ENDPOINT_URL", None)
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.update(endpoint.env())


# ------------------------------------------------------------------------------------------------- moto


@contextlib.contextmanager
def moto(log_path: Path) -> Iterator[Endpoint]:
    """moto's server (lustrefs.demo.locals3.LocalS3) on a free port; stopped on exit."""
    server = LocalS3(log_path=log_path, startup_timeout=STARTUP_TIMEOUT)
    server.start()
    try:
        version = f"moto {metadata.version('moto')}"
        yield Endpoint("moto", server.endpoint_url, "testing", "testing", version, pid=server.pid)
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------- s3rver


def s3rver_script(allow_install: bool) -> Path:
    """The s3rver entry script, installed with npm into ``benchmarks/.s3rver/`` if missing. Raises CaseError."""
    script = S3RVER_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if script.exists():
        return script
    if not (shutil.which("node") and shutil.which("npm")):
        raise CaseError("s3rver needs Node.js and npm, which are not installed")
    if not allow_install:
        raise CaseError(f"s3rver is not installed in {S3RVER_DIR} (installing was not allowed)")
    S3RVER_DIR.mkdir(parents=True, exist_ok=True)
    manifest = S3RVER_DIR / "package.json"
    if not manifest.exists():  # keeps npm from looking for a project further up the tree
        manifest.write_text(json.dumps({"name": "lustrefs-bench-s3rver", "private": True}) + "\n")
    argv = ["npm", "install", "--no-audit", "--no-fund", "--silent", S3RVER_PACKAGE]
    res = subprocess.run(argv, cwd=S3RVER_DIR, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0 or not script.exists():
        raise CaseError(f"npm install {S3RVER_PACKAGE} failed: {res.stderr.strip()[-500:]}")
    return script


@contextlib.contextmanager
def s3rver(data_dir: Path, log_path: Path, allow_install: bool) -> Iterator[Endpoint]:
    """s3rver on a free port with its store in ``data_dir``; stopped by PID on exit."""
    script = s3rver_script(allow_install)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # --openssl-legacy-provider: without it every truncated ListObjectsV2 fails (legacy cipher in its tokens).
    argv = ["node", "--openssl-legacy-provider", str(script), "-d", str(data_dir), "-a", HOST, "-p", str(port),
            "--silent", "--no-vhost-buckets"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not locals3.http_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CaseError(f"s3rver did not start on port {port}; see {log_path}")
            time.sleep(0.1)
        version = "s3rver " + tool_version(["node", str(script), "--version"])
        yield Endpoint("s3rver", f"http://{HOST}:{port}", "S3RVER", "S3RVER", version, pid=proc.pid, data_dir=data_dir)
    finally:
        if proc.poll() is None:
            proc.terminate()
        stop_pid(proc.pid, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


# ---------------------------------------------------------------------------------------------- external


@contextlib.contextmanager
def external(url: str) -> Iterator[Endpoint]:
    """An endpoint someone else runs; it must be on loopback. Credentials from the environment or moto's."""
    if not is_loopback_url(url):
        raise CaseError(f"refusing to benchmark {url}: only loopback endpoints (127.0.0.0/8, ::1) are allowed")
    key = os.environ.get("AWS_ACCESS_KEY_ID") or "testing"
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or "testing"
    yield Endpoint("external", url.rstrip("/"), key, secret, "unknown implementation")


@contextlib.contextmanager
def open_endpoint(kind: str | None, url: str | None, work: Path, allow_install: bool) -> Iterator[Endpoint]:
    """The endpoint chosen on the command line: ``kind`` (moto/s3rver) or an explicit loopback ``url``."""
    if kind == "s3rver":
        cm = s3rver(work / "s3rver-data", work / "s3rver.log", allow_install)
    elif kind == "moto" or url is None:
        cm = moto(work / "moto.log")
    else:
        cm = external(url)
    with cm as endpoint:
        apply_env(endpoint)
        yield endpoint
