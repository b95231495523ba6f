"""Fault checks of the S3 mirror, run by hand (not part of the test suite)::

    .venv/bin/python -m benchmarks.mirror_check [--files N] [--kills K] [--error-rate R] [--scenario 1|2|all]

moto's server runs on 127.0.0.1 with :mod:`benchmarks.fault_proxy` in front of it; lustrefs talks to the proxy
only, and the bucket is always checked directly against moto. Each file system has ImportPath = ExportPath =
``s3://<bucket>/``, so an entry's export replaces its object and removing or renaming it deletes the old key.

1. N files created and removed under a fraction R of injected ``500 InternalError`` answers leave 0 objects:
   (a) the files are exported before they are removed; (b) all are created, then removed at once, exports
   still in flight; (c) each is removed right after its close, while its export runs.
   Then ``lustrefs umount`` (which waits for the export) must exit 0 and the bucket must be empty.
2. K rounds of ``mv dI dI+1`` (a directory of 200 files), a seeded random 0-500 ms, ``kill -9`` of the daemon,
   ``fusermount3 -u`` and a remount. Afterwards nothing may stay dirty or queued, every file must read back
   with its sha256, the bucket must hold exactly ``dK/`` and its files (no multipart upload left), and
   ``lustrefs umount`` must exit 0.

Every wait is bounded; moto, the proxy, the daemons and the mounts are stopped in ``finally`` blocks. The
exit status is 1 if a check failed (what failed is printed, with a daemon.log excerpt), else 0. The work
directory (``benchmarks/out/mirror-<time>/``, with ``$LUSTREFS_HOME``) is kept when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lustrefs import records

from .dataset import create_bucket
from .endpoints import Endpoint, apply_env, moto
from .fault_proxy import FaultProxy
from .host import CaseError, OpTimeout, alive, call_with_timeout, stop_pid
from .mounts import read_stats
from .report import log
from .runner import OUT, _mounts_under

LUSTREFS = str(Path(sys.executable).parent / "lustrefs")
CLI_TIMEOUT = 150.0  # create-file-system, mount (the command itself waits at most 60 + 20 s)
STATS_TIMEOUT = 30.0  # one stats request
KILL_WAIT = 10.0  # for a killed daemon to be gone
FUSERMOUNT_TIMEOUT = 30.0
BULK_TIMEOUT = 900.0  # creating, removing or reading all the files of a scenario
MAX_DELAY = 0.5  # the longest random wait between a rename and the kill


# ------------------------------------------------------------------------------------------------ reporting


@dataclass
class Outcome:
    """One scenario's numbers (in order) and checks; ``evidence`` is printed only when a check failed."""

    title: str
    numbers: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        return ok

    @property
    def failed(self) -> list[tuple[str, bool, str]]:
        return [c for c in self.checks if not c[1]]

    def print(self) -> None:
        print(f"\n== {self.title} ==")
        width = max((len(k) for k in self.numbers), default=0) + 2
        for key, value in self.numbers.items():
            shown = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value
            print(f"  {key:<{width}}{shown}")
        for name, ok, detail in self.checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""))
        if self.failed and self.evidence:
            print("  evidence:")
            for block in self.evidence:
                print("    " + block.replace("\n", "\n    "))
        sys.stdout.flush()


def _seconds(start: float) -> float:
    return round(time.monotonic() - start, 2)


# ------------------------------------------------------------------------------------------------- the lab


class Lab:
    """moto on 127.0.0.1, ``$LUSTREFS_HOME`` in the work directory, and the lustrefs CLI around them."""

    def __init__(self, endpoint: Endpoint, work: Path, seed: int, export_timeout: float) -> None:
        self.endpoint = endpoint
        self.work = work
        self.home = work / "home"
        self.seed = seed
        self.export_timeout = export_timeout
        self.s3 = endpoint.client(pool=16)  # direct to moto, never through the proxy

    # --- commands -------------------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``lustrefs ARGS``; a timeout raises OpTimeout (the command is killed by subprocess)."""
        try:
            return subprocess.run([LUSTREFS, *args], capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise OpTimeout(f"lustrefs {' '.join(args[:2])} did not finish within {timeout:g} s") from None

    def create_fs(self, endpoint_url: str, bucket: str) -> str:
        conf = f"ImportPath=s3://{bucket}/,ExportPath=s3://{bucket}/"
        res = self.cli("--endpoint-url", endpoint_url, "create-file-system", "--file-system-type", "LUSTRE",
                       "--storage-capacity", "1200", "--lustre-configuration", conf)  # fmt: skip
        if res.returncode != 0:
            raise CaseError(f"create-file-system failed ({res.returncode}): {res.stderr.strip()[-800:]}")
        return str(json.loads(res.stdout)["FileSystem"]["FileSystemId"])

    def mount_options(self) -> str:
        return f"export_delay=0,export_timeout={self.export_timeout:g}"

    def mount(self, fs_id: str, mnt: Path) -> int:
        """``lustrefs mount``; returns the daemon's PID."""
        mnt.mkdir(parents=True, exist_ok=True)
        res = self.cli("mount", fs_id, str(mnt), "-o", self.mount_options())
        if res.returncode != 0:
            raise CaseError(f"lustrefs mount {fs_id} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
        pid = self.daemon_pid(fs_id)
        if pid is None:
            raise CaseError(f"lustrefs mount {fs_id} exited 0 but no live daemon is in mount.json")
        return pid

    def daemon_pid(self, fs_id: str) -> int | None:
        """The live daemon serving ``fs_id`` (its ``mount.json``, checked against its command line)."""
        state = records.mount_state(fs_id)
        return int(state["pid"]) if state else None

    def umount(self, mnt: Path) -> tuple[int | None, str, float]:
        """``lustrefs umount``: (exit status or None on timeout, stderr, seconds)."""
        start = time.monotonic()
        try:
            res = self.cli("umount", str(mnt), timeout=self.export_timeout + 60)
        except OpTimeout as exc:
            return None, str(exc), _seconds(start)
        return res.returncode, res.stderr.strip(), _seconds(start)

    @staticmethod
    def is_mounted(mnt: Path) -> bool:
        return str(mnt) in _mounts_under(mnt.parent)

    def fusermount(self, mnt: Path) -> str:
        """``fusermount3 -u`` (``-z`` if that fails); returns which one worked, or why neither did."""
        for flags in (["-u"], ["-u", "-z"]):
            with contextlib.suppress(subprocess.TimeoutExpired):
                argv = ["fusermount3", *flags, str(mnt)]
                if subprocess.run(argv, capture_output=True, timeout=FUSERMOUNT_TIMEOUT, check=False).returncode == 0:
                    return " ".join(flags)
        return "failed"

    def teardown(self, fs_id: str | None, mnt: Path) -> None:
        """Best effort, for ``finally``: unmount if still mounted, then stop the daemon by its PID."""
        pid = self.daemon_pid(fs_id) if fs_id else None
        if self.is_mounted(mnt):
            self.fusermount(mnt)
        if pid is not None:
            stop_pid(pid, timeout=self.export_timeout + 15)

    # --- observing ------------------------------------------------------------------------------------------
    @staticmethod
    def stats(mnt: Path) -> dict[str, Any]:
        return call_with_timeout(lambda: read_stats(mnt), STATS_TIMEOUT, "stats request")

    def wait_settled(self, mnt: Path, timeout: float) -> tuple[bool, float, dict[str, Any]]:
        """Poll the stats until nothing is dirty or queued; (settled, seconds, last snapshot)."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            snap = self.stats(mnt)
            if snap["dirty"]["entries"] == 0 and snap["export_queue"] == 0:
                return True, _seconds(start), snap
            if time.monotonic() > deadline:
                return False, _seconds(start), snap
            time.sleep(0.2)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return out

    def wait_keys(self, bucket: str, expected: set[str], timeout: float) -> tuple[bool, float, list[str]]:
        """Poll the bucket (directly) until its keys are ``expected``; (matched, seconds, last listing)."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            keys = self.keys(bucket)
            if set(keys) == expected and len(keys) == len(expected):
                return True, _seconds(start), keys
            if time.monotonic() > deadline:
                return False, _seconds(start), keys
            time.sleep(0.25)

    def sha256(self, bucket: str, key: str) -> str:
        return hashlib.sha256(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()

    def multipart_uploads(self, bucket: str) -> list[str]:
        resp = self.s3.list_multipart_uploads(Bucket=bucket)
        return [f"{u['Key']} ({u['UploadId']})" for u in resp.get("Uploads", [])]

    def state_counts(self, fs_id: str) -> dict[str, Any]:
        """Rows of the (unmounted) file system's state.db that still want an export, read-only."""
        db = self.home / fs_id / "state.db"
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error as exc:
            return {"error": str(exc)}
        try:
            dirty = conn.execute("SELECT ino, parent, name, dirty FROM inodes WHERE dirty != 0").fetchall()
            return {
                "dirty_rows": len(dirty),
                "dirty_sample": [list(r) for r in dirty[:10]],
                "pending_deletes": conn.execute("SELECT count(*) FROM pending_deletes").fetchone()[0],
                "pending_delete_sample": [r[0] for r in conn.execute("SELECT key FROM pending_deletes LIMIT 10")],
                "export_intents": conn.execute("SELECT count(*) FROM export_intents").fetchone()[0],
            }
        except sqlite3.Error as exc:
            return {"error": str(exc)}
        finally:
            conn.close()

    def log_excerpt(self, fs_id: str, lines: int = 25) -> str:
        """The last warnings and errors of the daemon log, and its last lines."""
        path = self.home / fs_id / "daemon.log"
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            return f"{path}: missing"
        worrying = [ln for ln in text if any(w in ln for w in ("ERROR", "WARNING", "Traceback", "CRITICAL"))]
        return (
            f"{path} ({len(text)} lines, {len(worrying)} warnings/errors); last warnings/errors:\n"
            + "\n".join(worrying[-lines:])
            + "\nlast lines:\n"
            + "\n".join(text[-10:])
        )


@contextlib.contextmanager
def reported(lab: Lab, out: Outcome, proxy: FaultProxy, mnt: Path) -> Iterator[Callable[[str], str]]:
    """The body of a scenario: an exception is a failed check, and the mount and file system are torn down
    (with an excerpt of daemon.log when a check failed). Yields ``made(fs_id)``, which registers the file system."""
    made: list[str] = []

    def register(fs_id: str) -> str:
        made.append(fs_id)
        return fs_id

    try:
        yield register
    except Exception as exc:  # reported as a failed check; the finally block tears down
        out.check("scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
        out.numbers |= proxy.counts()
    finally:
        fs_id = made[0] if made else None
        lab.teardown(fs_id, mnt)
        if fs_id and out.failed:
            out.evidence.append(lab.log_excerpt(fs_id))


@contextlib.contextmanager
def proxied(lab: Lab, error_rate: float, seed: int) -> Iterator[FaultProxy]:
    proxy = FaultProxy(lab.endpoint.url, error_rate=error_rate, seed=seed).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def bounded(fn: Callable[[], Any], what: str, timeout: float = BULK_TIMEOUT) -> float:
    """Run ``fn`` with a time limit (a hung mount raises OpTimeout); its seconds."""
    start = time.monotonic()
    call_with_timeout(fn, timeout, what)
    return _seconds(start)


# ------------------------------------------------------------------------------------- scenario 1: churn


CHURN_MODES = {
    "a": ("exported", "exported, then removed"),
    "b": ("at-once", "all created, then removed at once (exports in flight)"),
    "c": ("per-file", "each removed right after its close (its export in flight)"),
}


def create_remove(lab: Lab, files: int, error_rate: float, variant: str) -> Outcome:
    """N small files created in one directory and removed, then unmounted; ``variant`` is a CHURN_MODES key."""
    tag, how = CHURN_MODES[variant]
    out = Outcome(f"scenario 1{variant}: {files} files, {how}; {error_rate:.0%} injected errors")
    bucket = f"mirror-churn-{tag}"
    create_bucket(lab.endpoint, bucket)
    mnt = lab.work / f"mnt-churn-{tag}"
    with proxied(lab, error_rate, lab.seed) as proxy, reported(lab, out, proxy, mnt) as made:
        fs_id = made(lab.create_fs(proxy.url, bucket))
        start = time.monotonic()
        lab.mount(fs_id, mnt)
        out.numbers |= {"file system": fs_id, "mount seconds": _seconds(start)}
        folder = mnt / "churn"
        names = [folder / f"f{i:05d}" for i in range(files)]

        def create() -> None:
            folder.mkdir()
            for i, path in enumerate(names):
                path.write_bytes(f"file {i}\n".encode())
                if variant == "c":
                    path.unlink()

        def remove() -> None:
            for path in names if variant != "c" else []:
                path.unlink()
            folder.rmdir()

        out.numbers["create seconds"] = bounded(create, f"creating {files} files")
        if variant == "a":
            settled, secs, snap = lab.wait_settled(mnt, lab.export_timeout + 60)
            out.numbers["export settle seconds"] = secs
            exported = len(lab.keys(bucket))
            out.numbers["objects after export"] = exported
            out.check("all exported before removal", settled and exported == files + 1,
                      f"{exported} objects (expected {files + 1}), stats dirty={snap['dirty']['entries']} "
                      f"queue={snap['export_queue']}")  # fmt: skip
        snap = lab.stats(mnt)
        out.numbers |= {"dirty when removal began": snap["dirty"]["entries"],
                        "queued when removal began": snap["export_queue"]}  # fmt: skip
        out.numbers["remove seconds"] = bounded(remove, f"removing {files} files")
        snap = lab.stats(mnt)
        live = lab.state_counts(fs_id)  # read-only, while the daemon runs: what stats do not show
        out.numbers |= {
            "daemon requests": snap["requests"],
            "stats dirty at umount": snap["dirty"]["entries"],
            "stats queued at umount": snap["export_queue"],
            "state.db pending deletes at umount": live.get("pending_deletes", live.get("error")),
            "objects at umount": len(lab.keys(bucket)),
        }
        rc, err, secs = lab.umount(mnt)
        out.numbers |= {"umount exit": rc, "umount seconds": secs}
        if err:
            out.evidence.append("lustrefs umount stderr:\n" + err[-2000:])
        left = lab.keys(bucket)
        uploads = lab.multipart_uploads(bucket)
        out.numbers |= {"objects left": len(left), "multipart uploads left": len(uploads)}
        out.numbers |= proxy.counts()
        state = lab.state_counts(fs_id)
        out.numbers["state.db after umount"] = {k: v for k, v in state.items() if not k.endswith("sample")}
        out.check("objects left == 0", not left, f"{len(left)} left, e.g. {left[:10]}")
        out.check("no multipart upload left", not uploads, ", ".join(uploads[:10]))
        out.check("lustrefs umount exited 0", rc == 0, f"exit {rc}")
        out.check("state.db: nothing dirty, no pending delete", state.get("dirty_rows") == 0
                  and state.get("pending_deletes") == 0, json.dumps(state))  # fmt: skip
    return out


# --------------------------------------------------------------------------------- scenario 2: rename+kill


def kill_rename(lab: Lab, kills: int, files: int, settle_timeout: float) -> Outcome:
    """``mv dI dI+1``, a random wait, kill -9, unmount, remount; K times. Then everything must be in place."""
    out = Outcome(f"scenario 2: {kills} x kill -9 during a {files}-file directory rename")
    rng = random.Random(lab.seed)
    bucket = "mirror-rename"
    create_bucket(lab.endpoint, bucket)
    mnt = lab.work / "mnt-rename"
    with proxied(lab, 0.0, lab.seed) as proxy, reported(lab, out, proxy, mnt) as made:
        fs_id = made(lab.create_fs(proxy.url, bucket))
        lab.mount(fs_id, mnt)
        out.numbers["file system"] = fs_id
        contents = {f"f{i:03d}": rng.randbytes(rng.randint(1, 100) * 1024) for i in range(files)}
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}

        def populate() -> None:
            (mnt / "d0").mkdir()
            for name, data in contents.items():
                (mnt / "d0" / name).write_bytes(data)

        out.numbers["populate seconds"] = bounded(populate, f"writing {files} files")
        out.numbers["data bytes"] = sum(len(d) for d in contents.values())
        settled, secs, _ = lab.wait_settled(mnt, settle_timeout)
        expected0 = {"d0/"} | {f"d0/{n}" for n in contents}
        matched, _, keys = lab.wait_keys(bucket, expected0, settle_timeout)
        out.numbers["initial export seconds"] = secs
        if not out.check("d0 exported before the first rename", settled and matched,
                         f"{len(keys)} objects, expected {len(expected0)}"):  # fmt: skip
            raise CaseError("the initial export did not finish")

        rounds = []
        for i in range(kills):
            src, dst = mnt / f"d{i}", mnt / f"d{i + 1}"
            mv = subprocess.run(["mv", str(src), str(dst)], capture_output=True, text=True, timeout=60,
                                check=False)  # fmt: skip
            if mv.returncode != 0:
                raise CaseError(f"round {i + 1}: mv d{i} d{i + 1} failed: {mv.stderr.strip()}")
            delay = rng.uniform(0, MAX_DELAY)
            time.sleep(delay)  # the random point of the crash, not a synchronisation
            pid = lab.daemon_pid(fs_id)
            if pid is None:
                raise CaseError(f"round {i + 1}: no live daemon to kill")
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + KILL_WAIT
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if alive(pid):
                raise CaseError(f"round {i + 1}: daemon {pid} still alive {KILL_WAIT:g} s after SIGKILL")
            at_kill = lab.keys(bucket)
            old = [k for k in at_kill if k.startswith(f"d{i}/")]
            new = [k for k in at_kill if k.startswith(f"d{i + 1}/")]
            how = lab.fusermount(mnt)
            if how == "failed" or lab.is_mounted(mnt):
                raise CaseError(f"round {i + 1}: could not unmount {mnt} after the kill")
            start = time.monotonic()
            lab.mount(fs_id, mnt)
            rounds.append({"round": i + 1, "delay_ms": round(delay * 1000), "objects_at_kill": len(at_kill),
                           "old_objects_at_kill": len(old), "new_objects_at_kill": len(new), "fusermount": how,
                           "remount_s": _seconds(start)})  # fmt: skip
        out.numbers["rounds"] = len(rounds)
        mid = sum(1 for r in rounds if r["old_objects_at_kill"] or r["new_objects_at_kill"] != files + 1)
        out.numbers["kills with the rename's export unfinished"] = mid
        out.numbers["delays ms"] = [r["delay_ms"] for r in rounds]
        out.numbers["objects (all, under dI/, under dI+1/) at each kill"] = [
            [r["objects_at_kill"], r["old_objects_at_kill"], r["new_objects_at_kill"]] for r in rounds
        ]
        out.numbers["remount seconds"] = [r["remount_s"] for r in rounds]
        out.numbers["lazy unmounts"] = sum(1 for r in rounds if r["fusermount"] != "-u")

        final = f"d{kills}"
        settled, secs, snap = lab.wait_settled(mnt, settle_timeout)
        live = lab.state_counts(fs_id)  # what the stats do not show: deletions still to make
        expected = {f"{final}/"} | {f"{final}/{n}" for n in contents}
        matched, bucket_secs, keys = lab.wait_keys(bucket, expected, max(settle_timeout - secs, 1.0))
        out.numbers |= {
            "state.db pending deletes at settle": live.get("pending_deletes", live.get("error")),
            "stats settle seconds": secs,
            "bucket match seconds after settle": bucket_secs,
            "stuck dirty entries": snap["dirty"]["entries"],
            "stuck queued exports": snap["export_queue"],
        }
        out.check("nothing dirty or queued", settled,
                  f"dirty={snap['dirty']['entries']} queue={snap['export_queue']} after {secs} s")  # fmt: skip

        unreadable: list[str] = []

        def read_all() -> None:
            for name, digest in digests.items():
                try:
                    data = (mnt / final / name).read_bytes()
                except OSError as exc:
                    unreadable.append(f"{final}/{name}: {exc}")
                    continue
                if hashlib.sha256(data).hexdigest() != digest:
                    unreadable.append(f"{final}/{name}: sha256 differs ({len(data)} bytes)")

        out.numbers["read seconds"] = bounded(read_all, f"reading {files} files")
        root = sorted(call_with_timeout(lambda: os.listdir(mnt), 30, "listing the mount root"))
        listing = sorted(call_with_timeout(lambda: os.listdir(mnt / final), 30, f"listing {final}"))
        out.numbers["unreadable files"] = len(unreadable)
        out.check("every file readable with its sha256", not unreadable, "; ".join(unreadable[:10]))
        out.check(f"mount root holds only {final}", [e for e in root if e != ".lustrefs"] == [final], str(root))
        out.check(f"{final} lists exactly the {files} files", listing == sorted(contents),
                  f"{len(listing)} entries")  # fmt: skip

        outside = sorted(set(keys) - expected)
        missing = sorted(expected - set(keys))
        earlier = [k for k in outside if k.split("/", 1)[0] in {f"d{j}" for j in range(kills)}]
        present = sorted(k for k in expected & set(keys) if not k.endswith("/"))
        wrong = [k for k in present if lab.sha256(bucket, k) != digests[k.split("/", 1)[1]]]
        uploads = lab.multipart_uploads(bucket)
        out.numbers |= {
            "objects in bucket": len(keys),
            "objects outside the tree": len(outside),
            "objects under earlier dI/": len(earlier),
            "objects missing": len(missing),
            "objects with wrong content": len(wrong),
            "multipart uploads left": len(uploads),
        }
        out.check("bucket == final tree", matched and not outside and not missing,
                  f"outside: {outside[:10]}, missing: {missing[:10]}")  # fmt: skip
        out.check("objects hold the files' data", not wrong, ", ".join(wrong[:10]))
        out.check("no multipart upload left", not uploads, ", ".join(uploads[:10]))
        out.numbers |= proxy.counts()

        rc, err, secs = lab.umount(mnt)
        out.numbers |= {"umount exit": rc, "umount seconds": secs}
        if err:
            out.evidence.append("lustrefs umount stderr:\n" + err[-2000:])
        out.check("lustrefs umount exited 0", rc == 0, f"exit {rc}")
        after = lab.keys(bucket)
        out.numbers["objects after umount"] = len(after)
        out.check("bucket unchanged by the umount", set(after) == set(keys), f"{len(after)} objects")
        state = lab.state_counts(fs_id)
        out.numbers["state.db after umount"] = {k: v for k, v in state.items() if not k.endswith("sample")}
        if state.get("dirty_rows") or state.get("pending_deletes") or state.get("export_intents"):
            out.evidence.append("state.db after umount: " + json.dumps(state))
    return out


# ---------------------------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mirror_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--files", type=int, default=2000, metavar="N", help="files of scenario 1 (default 2000)")
    p.add_argument("--kills", type=int, default=20, metavar="K", help="kill -9 rounds of scenario 2 (default 20)")
    p.add_argument("--error-rate", type=float, default=0.10, metavar="R",
                   help="fraction of requests answered 500 in scenario 1 (default 0.10)")  # fmt: skip
    p.add_argument("--rename-files", type=int, default=200, metavar="N", help="files renamed in scenario 2 (200)")
    p.add_argument("--scenario", choices=("1", "2", "all"), default="all")
    p.add_argument("--seed", type=int, default=1, help="seed of the injected errors, sizes and delays (default 1)")
    p.add_argument("--export-timeout", type=float, default=120.0, metavar="S",
                   help="mount option export_timeout; lustrefs umount waits 15 s more (default 120)")  # fmt: skip
    p.add_argument("--settle-timeout", type=float, default=120.0, metavar="S",
                   help="bound of the waits for the export to settle (default 120)")  # fmt: skip
    p.add_argument("--keep-work", action="store_true", help="keep the work directory even if every check passed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 0.0 <= args.error_rate <= 1.0:
        parser().error("--error-rate must be between 0 and 1")
    if not os.path.exists("/dev/fuse"):
        print("mirror_check: /dev/fuse is missing", file=sys.stderr)
        return 1
    work = OUT / f"mirror-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True)
    os.environ["LUSTREFS_HOME"] = str(work / "home")
    outcomes: list[Outcome] = []
    started = time.monotonic()
    try:
        with moto(work / "moto.log") as endpoint:
            apply_env(endpoint)
            lab = Lab(endpoint, work, args.seed, args.export_timeout)
            log(f"moto at {endpoint.url}; work directory {work}")
            if args.scenario in ("1", "all"):
                for variant in CHURN_MODES:
                    log(f"scenario 1{variant}: {args.files} files, R={args.error_rate}")
                    outcomes.append(create_remove(lab, args.files, args.error_rate, variant))
                    outcomes[-1].print()
            if args.scenario in ("2", "all"):
                log(f"scenario 2: {args.kills} kills, {args.rename_files} files")
                outcomes.append(kill_rename(lab, args.kills, args.rename_files, args.settle_timeout))
                outcomes[-1].print()
    finally:
        failed = [f"{o.title.split(':')[0]}: {c[0]}" for o in outcomes for c in o.failed]
        left = _mounts_under(work)
        if left:
            log(f"not removing {work}: still mounted: {left}")
        elif failed or args.keep_work:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmirror_check: {len(outcomes)} scenario(s) in {time.monotonic() - started:.0f} s, "
          + (f"{len(failed)} check(s) FAILED: " + "; ".join(failed) if failed else "all checks passed"))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
