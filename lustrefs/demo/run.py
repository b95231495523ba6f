"""``python -m lustrefs.demo``: a lustrefs file system over a local S3 endpoint, shown with ordinary commands.

Starts moto's S3 server on 127.0.0.1, fills bucket ``lustrefs-demo`` with a sample data set, creates a file
system with the ``lustrefs`` CLI, mounts it, looks around with ``ls``/``stat``/``sha256sum``/``head``, prints
commands to try from another shell, then waits for Ctrl-C (or SIGTERM) and unmounts and stops everything it
started. On any failure it still cleans up, keeps its state directory for inspection and exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from lustrefs import records
from lustrefs.demo.locals3 import (
    SAMPLE_BAD_KEY,
    SAMPLE_BIG_FILES,
    SAMPLE_DIR_MARKER,
    SAMPLE_POSIX_KEY,
    LocalS3,
    LocalS3Error,
    ensure_local_only,
    ensure_test_credentials,
    populate_sample,
)
from lustrefs.mounts import mounted_at

BUCKET = "lustrefs-demo"
IMPORT_PREFIX = "data/"
CLI = [sys.executable, "-m", "lustrefs.client.cli"]
CMD_TIMEOUT = 60.0  # one ordinary command on the mount
MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 60.0
DAEMON_EXIT_TIMEOUT = 15.0


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


class Stop(BaseException):  # a control-flow signal, like KeyboardInterrupt
    """SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say(f"\n=== {text}")


def shown(cmd: Sequence[str | os.PathLike[str]]) -> str:
    """A command line for display and copy-paste (the interpreter shortened when it is under the cwd)."""
    parts = [os.fspath(c) for c in cmd]
    if parts and parts[0] == sys.executable:
        rel = os.path.relpath(sys.executable)
        parts[0] = rel if not rel.startswith("..") else sys.executable
    return shlex.join(parts)


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, from /proc/self/mountinfo (never touches the file system itself)."""
    try:
        return bool(mounted_at(os.fspath(path)))
    except OSError:
        return os.path.ismount(path)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in lines[-n:])


class Demo:
    """One run of the demo: what it started, so that :meth:`cleanup` can undo exactly that.

    A script more than a component: its steps read top to bottom, and each needs what the previous one started.
    """

    def __init__(self, mountpoint: Path, keep_state: bool, wait: bool, work: Path | None = None) -> None:
        self.mountpoint = mountpoint
        self.keep_state = keep_state
        self.wait = wait
        if work is None:
            work = Path(tempfile.mkdtemp(prefix="lustrefs-demo-"))
        else:  # a directory of its own inside another run's (lustrefs.demo.cluster: one Demo per host)
            work.mkdir(mode=0o700, parents=True)
        self.work = work
        self.home = self.work / "home"
        self.mount_log = self.work / "mount.log"
        self.s3: LocalS3 | None = None
        self.fs_id: str | None = None
        self.mount_attempted = False
        self.created_mountpoint = False
        self.test_credentials = False
        self.phase = "starting"
        self.env: dict[str, str] = dict(os.environ)  # completed by start_endpoint
        self.step_numbers = itertools.count(1)  # shared by the Demos of one run (lustrefs.demo.cluster)

    def step(self, text: str) -> None:
        """The heading of the next numbered step."""
        heading(f"{next(self.step_numbers)}. {text}")

    # --- running commands -----------------------------------------------------------------------------------
    def run(
        self,
        cmd: Sequence[str | os.PathLike[str]],
        timeout: float = CMD_TIMEOUT,
        check: bool = True,
        echo: bool = True,
        log: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in its own session with the demo's environment; print it and its output.

        With ``log`` the output goes to that file instead of a pipe (a daemon that inherits a pipe would keep
        it open). Raises DemoError on a timeout, and on a non-zero exit when ``check``.
        """
        if echo:
            say(f"$ {shown(cmd)}")
        argv = [os.fspath(c) for c in cmd]
        try:
            if log is None:
                result = subprocess.run(
                    argv, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    timeout=timeout, start_new_session=True,
                )  # fmt: skip
            else:
                with open(log, "a") as out:
                    result = subprocess.run(
                        argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout, start_new_session=True,
                    )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise DemoError(f"`{shown(cmd)}` did not finish within {timeout:g} s") from None
        except OSError as e:
            raise DemoError(f"cannot run `{shown(cmd)}`: {e}") from None
        if echo and log is None:
            for stream in (result.stdout, result.stderr):
                if stream:
                    say(stream.rstrip("\n"))
        if check and result.returncode != 0:
            detail = f"\n{_tail(log)}" if log is not None else ""
            raise DemoError(f"`{shown(cmd)}` exited with status {result.returncode}{detail}")
        return result

    def cli(self, *args: str | os.PathLike[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run([*CLI, *args], **kwargs)

    def path_of(self, key: str) -> Path:
        """Where the object ``key`` appears: the import prefix filters keys, it does not re-root them."""
        return self.mountpoint / key

    # --- the steps ------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        self.phase = "checking prerequisites"
        if not sys.platform.startswith("linux"):
            raise DemoError("the demo needs Linux (FUSE 3)")
        if shutil.which("fusermount3") is None:
            raise DemoError("fusermount3 not found: install FUSE 3 (`make system-deps`, or apt-get install fuse3)")
        if not os.path.exists("/dev/fuse"):
            raise DemoError("/dev/fuse does not exist: this machine or container has no FUSE support")
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise DemoError("/dev/fuse is not readable and writable by this user")
        if is_mounted(self.mountpoint):
            raise DemoError(
                f"{self.mountpoint} is already a mount point; unmount it first (fusermount3 -u {self.mountpoint})"
            )
        if self.mountpoint.exists() and not self.mountpoint.is_dir():
            raise DemoError(f"{self.mountpoint} exists and is not a directory")

    def start_endpoint(self) -> None:
        self.phase = "starting the local S3 endpoint"
        self.step("Local S3 endpoint (moto) on 127.0.0.1")
        self.s3 = LocalS3(log_path=self.work / "moto.log")
        try:
            self.s3.start()
        except LocalS3Error as e:
            raise DemoError(str(e)) from None
        say(f"endpoint {self.s3.endpoint_url}  (pid {self.s3.pid}, log {self.s3.log_path})")
        self.home.mkdir(mode=0o700)
        self.env = dict(os.environ)
        self.env["LUSTREFS_HOME"] = str(self.home)
        self.env["AWS_ENDPOINT_URL"] = self.s3.endpoint_url
        self.env["AWS_ENDPOINT_URL_S3"] = self.s3.endpoint_url  # it takes precedence over AWS_ENDPOINT_URL
        self.test_credentials = ensure_test_credentials(self.env)
        ensure_local_only(self.env)

    def fill_bucket(self) -> dict[str, str]:
        self.phase = "filling the bucket"
        assert self.s3 is not None
        self.step(f"Bucket s3://{BUCKET} with the sample data set")
        client = self.s3.client()
        client.create_bucket(Bucket=BUCKET)
        hashes = populate_sample(client, BUCKET)
        listing = client.list_objects_v2(Bucket=BUCKET)["Contents"]
        for obj in listing:
            note = {
                SAMPLE_DIR_MARKER: "  <- directory marker",
                SAMPLE_BAD_KEY: "  <- not a POSIX path: skipped on import",
                SAMPLE_POSIX_KEY: "  <- carries x-amz-meta-file-* POSIX metadata",
            }.get(obj["Key"], "")
            say(f"  {obj['Size']:>9}  s3://{BUCKET}/{obj['Key']}{note}")
        say(f"{len(listing)} objects; data/results/ has no marker objects (an implied directory)")
        return hashes

    def create_file_system(self) -> None:
        self.phase = "creating the file system"
        assert self.s3 is not None
        self.step("Create a file system linked to the bucket")
        result = self.cli(
            "--endpoint-url", self.s3.endpoint_url, "create-file-system",
            "--file-system-type", "LUSTRE", "--storage-capacity", "1200",
            "--lustre-configuration",
            f"ImportPath=s3://{BUCKET}/{IMPORT_PREFIX.rstrip('/')},AutoImportPolicy=NEW_CHANGED,"
            "ImportedFileChunkSize=1",
        )  # fmt: skip
        try:
            fs = json.loads(result.stdout)["FileSystem"]
            self.fs_id = fs["FileSystemId"]
        except (ValueError, KeyError, TypeError):
            printed = result.stdout.strip()[:300] or "nothing"
            raise DemoError(
                f"create-file-system exited 0 but printed {printed!r}, not a FileSystem with a FileSystemId"
            ) from None
        say(f"FileSystemId: {self.fs_id}")
        lifecycle = fs.get("Lifecycle")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while lifecycle != "AVAILABLE":
            if lifecycle in ("FAILED", "MISCONFIGURED", "DELETING") or time.monotonic() > deadline:
                raise DemoError(f"file system {self.fs_id} is {lifecycle}: {fs.get('FailureDetails', '')}")
            time.sleep(0.5)  # polling the file system's state
            described = self.cli("describe-file-systems", "--file-system-ids", self.fs_id, echo=False)
            fs = json.loads(described.stdout)["FileSystems"][0]
            lifecycle = fs.get("Lifecycle")

    def mount(self) -> None:
        self.phase = "mounting"
        assert self.fs_id is not None
        self.step(f"Mount {self.fs_id} on {self.mountpoint}")
        if not self.mountpoint.exists():
            self.mountpoint.mkdir(parents=True)
            self.created_mountpoint = True
        self.mount_attempted = True
        opts = "cache_size=1,poll_interval=5,export_delay=1"
        self.cli("mount", self.fs_id, self.mountpoint, "-o", opts, log=self.mount_log, timeout=MOUNT_TIMEOUT)
        if not is_mounted(self.mountpoint):
            raise DemoError(
                f"`lustrefs mount` succeeded but {self.mountpoint} is not a mount point\n{_tail(self.mount_log)}"
            )
        say(f"mounted (command output in {self.mount_log})")

    def look_around(self, hashes: dict[str, str]) -> None:
        self.phase = "using the mount"
        assert self.s3 is not None and self.fs_id is not None
        self.step("Ordinary commands on the mount")
        self.run(["ls", "-l", self.mountpoint])
        self.run(["ls", "-l", self.mountpoint / "data" / "genomes"])
        self.run(["ls", "-la", self.path_of(SAMPLE_DIR_MARKER)])

        posix = self.path_of(SAMPLE_POSIX_KEY)
        self.run(["stat", posix])
        st = posix.stat()
        got = (oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        want = (oct(0o100640), 1000, 1000, 1_600_000_000_000_000_000)
        say(f"mode/uid/gid/mtime_ns {got} " + ("match the object's metadata" if got == want else f"!= {want}"))

        big_key = max(SAMPLE_BIG_FILES, key=lambda k: SAMPLE_BIG_FILES[k])
        started = time.monotonic()
        out = self.run(["sha256sum", self.path_of(big_key)]).stdout
        elapsed = time.monotonic() - started
        body = self.s3.client().get_object(Bucket=BUCKET, Key=big_key)["Body"].read()
        in_bucket = hashlib.sha256(body).hexdigest()
        if out.split()[:1] != [in_bucket] or in_bucket != hashes[big_key]:
            raise DemoError(f"{self.path_of(big_key)}: sha256 {out.split()[:1]} != the bucket's {in_bucket}")
        mib = SAMPLE_BIG_FILES[big_key] / 2**20
        say(f"sha256 matches s3://{BUCKET}/{big_key} ({mib:g} MiB read in {elapsed:.2f} s)")

        self.run(["head", "-c", "200", self.path_of("data/README.txt")])
        say()
        self.show_skip_events()
        self.cli("describe-file-systems")

    def show_skip_events(self) -> None:
        """Print the event-log lines about the non-POSIX key (best effort: the log may not have them yet)."""
        assert self.fs_id is not None
        bad_dir = self.mountpoint / "data" / "bad"  # listing it meets the bad key
        with contextlib.suppress(OSError):
            if bad_dir.is_dir():
                self.run(["ls", "-la", bad_dir], check=False)
        events = self.home / self.fs_id / "events.jsonl"
        lines: list[str] = []
        with contextlib.suppress(OSError):
            lines = [ln for ln in events.read_text().splitlines() if "PosixCompliant" in ln or "/../" in ln]
        say(f"$ grep PosixCompliant {events}")
        say("\n".join(lines) if lines else "(no such event recorded yet)")

    def shell_setup(self) -> list[str]:
        """The commands that give another shell this demo's S3 endpoint, credentials and directory."""
        assert self.s3 is not None
        lines = [f"export AWS_ENDPOINT_URL={self.s3.endpoint_url}"]
        if os.environ.get("AWS_ENDPOINT_URL_S3"):
            lines.append("unset AWS_ENDPOINT_URL_S3")
        if self.test_credentials:
            lines.append("export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1")
        return [*lines, f"cd {shlex.quote(os.getcwd())}"]

    def print_next_steps(self) -> None:
        assert self.s3 is not None and self.fs_id is not None
        mnt = shlex.quote(str(self.mountpoint))
        cli = shown(CLI)
        self.step("Try it yourself, from another shell")
        lines = [f"export LUSTREFS_HOME={shlex.quote(str(self.home))}", *self.shell_setup()]
        lines += [
            f"ls -lR {mnt}/data/results",
            f"cat {mnt}/data/README.txt",
            f"stat {mnt}/{SAMPLE_POSIX_KEY}",
            f"{cli} describe-file-systems --file-system-ids {self.fs_id}",
            f"tail -f {shlex.quote(str(self.home / self.fs_id / 'events.jsonl'))}",
            "# write a file: it is exported to the ExportPath with its POSIX metadata a second after close",
            f"echo hello > {mnt}/data/hello.txt && {cli} hsm_state {mnt}/data/hello.txt",
            "# a new object in the bucket appears within 5 s (AutoImportPolicy=NEW_CHANGED, poll_interval=5)",
            f"{shown([sys.executable])} -c \"import boto3; boto3.client('s3').put_object("
            f"Bucket='{BUCKET}', Key='data/new.txt', Body=b'new')\" && sleep 6 && ls -l {mnt}/data",
            f"{cli} stats {mnt}",
            f'curl -s "$AWS_ENDPOINT_URL/{BUCKET}?list-type=2"',
        ]
        say("\n".join(f"  {line}" for line in lines))

    def wait_for_signal(self) -> None:
        """Block until SIGINT/SIGTERM (raised as Stop), the endpoint dies, or the mount is removed."""
        assert self.s3 is not None
        self.phase = "waiting"
        say(f"\nPress Ctrl-C (or send SIGTERM to pid {os.getpid()}) to unmount and stop.")
        while self.still_up():
            time.sleep(1)  # polling still_up(); a signal interrupts it

    def still_up(self) -> bool:
        """False once the mount was removed from outside; raises DemoError if the endpoint died."""
        assert self.s3 is not None
        if not self.s3.running:
            raise DemoError(f"the local S3 endpoint exited unexpectedly\n{_tail(self.work / 'moto.log')}")
        if not is_mounted(self.mountpoint):
            say(f"{self.mountpoint} was unmounted from outside; shutting down.")
            return False
        return True

    # --- clean-up -------------------------------------------------------------------------------------------
    def cleanup(self) -> bool:
        """Undo what was started: unmount, end the daemon, stop the endpoint. True if all went well."""
        heading("Cleaning up")
        ok = self.release_mount()
        self.stop_endpoint()
        return ok

    def release_mount(self) -> bool:
        """Unmount, wait for the daemon to exit, remove the mount point if this run made it. True if all went well."""
        ok = True
        if self.mount_attempted:
            ok = self.unmount() and ok
            ok = self.wait_for_daemon() and ok
            # A mount interrupted half-way may have a daemon that mounted after the first check.
            ok = self.unmount() and ok
            if self.created_mountpoint and not is_mounted(self.mountpoint):
                with contextlib.suppress(OSError):
                    self.mountpoint.rmdir()
        return ok

    def stop_endpoint(self) -> None:
        if self.s3 is not None:
            pid = self.s3.pid
            self.s3.stop()
            say(f"stopped the local S3 endpoint (pid {pid})")

    def unmount(self) -> bool:
        if not is_mounted(self.mountpoint):
            return True
        attempts = [
            [*CLI, "umount", self.mountpoint],
            ["fusermount3", "-u", self.mountpoint],
            ["fusermount3", "-u", "-z", self.mountpoint],
        ]
        for cmd in attempts:
            try:
                self.run(cmd, timeout=UMOUNT_TIMEOUT, check=False)
            except DemoError as e:
                say(f"warning: {e}")
            if not is_mounted(self.mountpoint):
                say(f"unmounted {self.mountpoint}")
                return True
        say(f"error: {self.mountpoint} is still mounted")
        return False

    def daemon_pids(self) -> set[int]:
        """PIDs of this run's mount daemon: from ``<home>/<fs-id>/mount.json``, and any process whose command
        line runs ``lustrefs.daemon.process`` for this run's (unique) file system id on this mount point, in case
        mount.json is not written yet. (Several hosts of lustrefs.demo.cluster mount the same file system.)"""
        assert self.fs_id is not None
        pids: set[int] = set()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pids.add(int(json.loads((self.home / self.fs_id / "mount.json").read_text())["pid"]))
        places = {os.fsencode(self.mountpoint), os.fsencode(os.path.realpath(self.mountpoint))}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"lustrefs.daemon.process" in argv and self.fs_id.encode() in argv and places & set(argv):
                    pids.add(int(proc.name))
        pids.discard(os.getpid())
        return {p for p in pids if records.process_alive(p)}

    def wait_for_daemon(self) -> bool:
        """Wait for the mount daemon to exit after the unmount; terminate it if it does not."""
        if self.fs_id is None:
            return True
        pids = self.daemon_pids()
        deadline = time.monotonic() + DAEMON_EXIT_TIMEOUT
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the daemon's exit: it is not our child, so it cannot be waited for
            pids = {p for p in pids if records.process_alive(p)}
        if not pids:
            return True
        say(f"warning: the mount daemon ({', '.join(map(str, sorted(pids)))}) is still running; terminating it")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5.0
            while pids and time.monotonic() < deadline:
                time.sleep(0.1)
                pids = {p for p in pids if records.process_alive(p)}
            if not pids:
                break
        return False

    def remove_state(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    # --- the whole run --------------------------------------------------------------------------------------
    def steps(self) -> None:
        """The demo's steps, in order (:meth:`main` runs them and always cleans up)."""
        self.preflight()
        self.start_endpoint()
        hashes = self.fill_bucket()
        self.create_file_system()
        self.mount()
        self.look_around(hashes)
        self.print_next_steps()
        if self.wait:
            self.wait_for_signal()

    def main(self) -> int:
        """Run every step; always clean up. Returns the process exit status."""
        status = 0
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            raise Stop(signum)

        for s in handlers:
            signal.signal(s, on_signal)
        try:
            self.steps()
        except Stop as e:
            if self.phase == "waiting":
                say(f"\n{e} received.")
            else:
                say(f"\n{e} received while {self.phase}: stopping.")
                status = 128 + e.signum
        except DemoError as e:
            say(f"\nERROR while {self.phase}: {e}")
            status = 1
        except Exception as e:  # a bug or an unexpected library error: still clean up
            say(f"\nERROR while {self.phase}: {type(e).__name__}: {e}")
            status = 1
        finally:

            def during_cleanup(signum: int, frame: FrameType | None) -> None:
                say("(cleaning up, please wait)")

            for s in handlers:
                signal.signal(s, during_cleanup)
            try:
                if not self.cleanup() and status == 0:
                    status = 1
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
        if (status == 0 and not self.keep_state) or not any(self.work.iterdir()):
            self.remove_state()
        else:
            say(f"state and logs kept in {self.work}")
        say("done." if status == 0 else f"exiting with status {status}")
        return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lustrefs.demo",
        description="Mount a lustrefs file system over a local S3 endpoint and show it working.",
    )
    parser.add_argument("--mountpoint", type=Path, default=Path("demo-mnt"),
                        help="where to mount (created if missing; default ./demo-mnt)")  # fmt: skip
    parser.add_argument("--keep-state", action="store_true",
                        help="keep the state directory (LUSTREFS_HOME) and logs after exit")  # fmt: skip
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="unmount and stop right after the walk-through instead of waiting for Ctrl-C")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return Demo(args.mountpoint.absolute(), args.keep_state, args.wait).main()


if __name__ == "__main__":
    sys.exit(main())
