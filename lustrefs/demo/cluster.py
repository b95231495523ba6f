"""``python -m lustrefs.demo.cluster`` (``make demo-cluster``): one file system mounted by two hosts.

The steps of ``python -m lustrefs.demo`` (lustrefs.demo.run, whose ``Demo`` this reuses) with the cluster engine:
moto's S3 server on 127.0.0.1 with the sample data set, and a private PostgreSQL server (lustrefs.demo.localpg:
unix socket only) as the metadata database. "Host A" creates a file system and mounts it; "host B", another
``LUSTREFS_HOME``, daemon and cache on this machine, mounts the same file system. A file written on A is listed and
read on B at once, a rename on B is seen on A, and the leader exports the file to the bucket. Then the demo waits
for Ctrl-C (or SIGTERM), unmounts both hosts with ``lustrefs umount`` and stops the servers by their PIDs. On any
failure it still cleans up, keeps its state directory for inspection and exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lustrefs.constants import STAGING_NAME
from lustrefs.demo.localpg import PostgresError, PostgresNotInstalled, PostgresServer
from lustrefs.demo.run import BUCKET, CLI, Demo, DemoError, heading, is_mounted, say, shown

DATABASE = "lustrefs"
SEEN_TIMEOUT = 5.0  # seconds a change on one host may take to reach the other's kernel caches (it takes ms)
EXPORT_TIMEOUT = 30.0  # seconds until the leader has exported a closed file (export_delay=1 in the demo)
WRITTEN = "data/from-host-a.txt"
RENAMED = "data/renamed-on-b.txt"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _within(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition()`` held (polled every 10 ms; 0.0 if at the first check), or None if it did not
    within ``timeout``."""
    started = time.monotonic()
    if condition():
        return 0.0
    while not condition():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.01)
    return time.monotonic() - started


class ClusterDemo(Demo):
    """The cluster demo. ``self`` is host A (it also starts and stops the servers); ``self.b`` is host B."""

    def __init__(self, mountpoints: Sequence[Path], keep_state: bool, wait: bool) -> None:
        super().__init__(mountpoints[0], keep_state, wait)
        (self.work / "host-a").mkdir(mode=0o700)
        self.home = self.work / "host-a" / "home"
        self.mount_log = self.work / "host-a" / "mount.log"
        self.b = Demo(mountpoints[1], keep_state, wait=False, work=self.work / "host-b")  # home, mount.log inside
        self.b.step_numbers = self.step_numbers
        self.pg: PostgresServer | None = None
        self.conninfo = ""

    # --- the steps ------------------------------------------------------------------------------------------
    def steps(self) -> None:
        self.preflight()
        self.start_endpoint()
        self.fill_bucket()
        self.start_database()
        self.create_file_system()
        self.show_host_b_knows_it()
        self.mount()
        self.phase = "mounting on host B"
        self.b.mount()
        self.write_on_a_read_on_b()
        self.rename_on_b_seen_on_a()
        self.leader_exports()
        self.print_next_steps()
        if self.wait:
            self.wait_for_signal()

    def preflight(self) -> None:
        super().preflight()
        self.b.preflight()
        if os.path.realpath(self.mountpoint) == os.path.realpath(self.b.mountpoint):
            raise DemoError(f"the two hosts need two mount points (both are {self.mountpoint})")
        try:
            self.pg = PostgresServer()
        except PostgresNotInstalled as e:
            raise DemoError(str(e)) from None

    def start_database(self) -> None:
        self.phase = "starting PostgreSQL"
        assert self.pg is not None
        self.step("A private PostgreSQL server: the cluster's metadata database")
        try:
            self.pg.start()
            self.conninfo = self.pg.create_database(DATABASE)
        except (PostgresError, OSError) as e:
            raise DemoError(str(e)) from None
        say(f"postgres (pid {self.pg.pid}) on the unix socket in {self.pg.socket_dir}, no TCP; database {DATABASE}")
        self.env["LUSTREFS_METADATA_ENGINE"] = "postgresql"
        self.env["LUSTREFS_DATABASE"] = self.conninfo
        self.b.env = {**self.env, "LUSTREFS_HOME": str(self.b.home)}
        say("Both hosts are configured for it through the environment (or `lustrefs configure-metadata-engine`):")
        say(f"  export LUSTREFS_METADATA_ENGINE=postgresql LUSTREFS_DATABASE={shlex.quote(self.conninfo)}")
        say(f"  host A: export LUSTREFS_HOME={shlex.quote(str(self.home))}")
        say(f"  host B: export LUSTREFS_HOME={shlex.quote(str(self.b.home))}")
        say("# on host A")
        self.cli("describe-metadata-engine")

    def show_host_b_knows_it(self) -> None:
        """Host B describes the file system host A created (its record is in the database)."""
        self.phase = "describing the file system on host B"
        assert self.fs_id is not None
        self.b.fs_id = self.fs_id
        say("# on host B, which has never seen it: the record is in the database")
        out = self.b.cli("describe-file-systems", "--file-system-ids", self.fs_id, echo=False).stdout
        say(f"$ {shown([*CLI, 'describe-file-systems', '--file-system-ids', self.fs_id])} | grep Lifecycle")
        say("\n".join(line for line in out.splitlines() if '"Lifecycle"' in line))

    def write_on_a_read_on_b(self) -> None:
        self.phase = "writing on host A, reading on host B"
        a, b = self.mountpoint, self.b.mountpoint
        self.step("Host A writes a file; host B lists and reads it at once")
        say("# host B lists the directory and looks the name up first: its kernel may cache the listing and the miss")
        self.run(["ls", b / "data"])
        self.run(["ls", b / WRITTEN], check=False)
        text = f"written on host A at {time.strftime('%H:%M:%S')}"  # no quotes needed in the shell
        say("# host A writes the file and closes it")
        self.run(["sh", "-c", f"echo {text} > {shlex.quote(str(a / WRITTEN))}"])
        took = _within(lambda: os.path.exists(b / WRITTEN), SEEN_TIMEOUT)
        say("# host B, right after")
        listing = self.run(["ls", "-l", b / "data"]).stdout
        if took is None or Path(WRITTEN).name not in listing:
            raise DemoError(f"host B does not see {b / WRITTEN} {SEEN_TIMEOUT:g} s after host A closed it")
        got = self.run(["cat", b / WRITTEN]).stdout
        if got != text + "\n":
            raise DemoError(f"host B read {got!r} from {b / WRITTEN}, host A wrote {text + chr(10)!r}")
        when = "at once" if not took else f"{took * 1000:.0f} ms after A's close (its kernel held the miss till then)"
        say(f"host B found the name {when}, listed it and read the new bytes: the name is in the database when A's")
        say(f"create returns, and the bytes are in the bucket (a staging object under {STAGING_NAME}/) when A's close")
        say("returns (close-to-open); no export and no import poll were needed.")

    def rename_on_b_seen_on_a(self) -> None:
        self.phase = "renaming on host B"
        a, b = self.mountpoint, self.b.mountpoint
        self.step("Host B renames it; host A sees the rename")
        self.run(["mv", b / WRITTEN, b / RENAMED])
        took = _within(lambda: not os.path.lexists(a / WRITTEN) and os.path.exists(a / RENAMED), SEEN_TIMEOUT)
        say("# host A")
        self.run(["ls", "-l", a / "data"])
        if took is None:
            raise DemoError(f"host A still saw {a / WRITTEN}, or not {a / RENAMED}, {SEEN_TIMEOUT:g} s after")
        self.run(["cat", a / RENAMED])
        when = "at once" if not took else f"{took * 1000:.0f} ms after it returned on B"
        say(f"host A saw the rename {when}: every change is announced to the other hosts (PostgreSQL NOTIFY),")
        say("which drop the entries their kernels cached (A had the old name cached since it created the file).")

    def leader_exports(self) -> None:
        """The leader (host A, mounted first) exports the file; the staging object goes."""
        self.phase = "waiting for the export"
        assert self.s3 is not None and self.fs_id is not None
        self.step("The leader exports it to the bucket")
        logs = [(name, host.home / self.fs_id / "daemon.log") for name, host in (("A", self), ("B", self.b))]
        say(f"$ grep -h 'this host leads' {' '.join(shlex.quote(str(p)) for _, p in logs)}")
        leaders = [name for name, path in logs if "this host leads" in _read(path)]
        say(f"host {' and '.join(leaders)} leads: it runs the exports, deletions and import polls for the cluster"
            if leaders else "(no leader logged yet)")  # fmt: skip
        client = self.s3.client()

        def keys() -> list[str]:
            return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]

        def exported() -> bool:
            found = keys()
            return any(k.endswith("/" + RENAMED) or k == RENAMED for k in found) and not any(
                k.startswith(STAGING_NAME + "/") for k in found
            )

        took = _within(exported, EXPORT_TIMEOUT)
        if took is None:
            raise DemoError(f"{RENAMED} was not exported to s3://{BUCKET} within {EXPORT_TIMEOUT:g} s:\n{keys()}")
        for key in keys():
            if key.endswith(RENAMED):
                body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode(errors="replace")
                say(f"s3://{BUCKET}/{key}: {body.rstrip()!r}")
        say(f"exported (export_delay=1 after the last close), and its staging object deleted, {took:.1f} s after")
        say("the rename; the export path holds only what FSx's rules put there")

    def print_next_steps(self) -> None:
        assert self.s3 is not None and self.fs_id is not None
        a, b = (shlex.quote(str(m)) for m in (self.mountpoint, self.b.mountpoint))
        cli = shown(CLI)
        logs = " ".join(shlex.quote(str(h.home / self.fs_id / "daemon.log")) for h in (self, self.b))
        self.step("Try it yourself, from other shells")
        lines = [
            f"export LUSTREFS_METADATA_ENGINE=postgresql LUSTREFS_DATABASE={shlex.quote(self.conninfo)}",
            f"export LUSTREFS_HOME={shlex.quote(str(self.home))}   # host A; host B: {shlex.quote(str(self.b.home))}",
            *self.shell_setup(),
        ]
        lines += [
            f"echo hello > {a}/data/hello.txt && cat {b}/data/hello.txt",
            f"mkdir {b}/data/made-on-b && ls -l {a}/data",
            f"{cli} describe-file-systems --file-system-ids {self.fs_id}",
            f"grep -h cluster: {logs}",
            f"psql {shlex.quote(self.conninfo)} -c '\\dn'   # the file system's schema fs_<digits>",
        ]
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            pid_a = int(json.loads((self.home / self.fs_id / "mount.json").read_text())["pid"])
            lines += [
                "# failover: kill host A's daemon (the leader; its mount then fails); host B leads within a second",
                f"kill -9 {pid_a} && sleep 2 && grep -h 'leads' {logs}",
            ]
        say("\n".join(f"  {line}" for line in lines))

    def still_up(self) -> bool:
        if self.pg is not None and not self.pg.running:
            raise DemoError(f"PostgreSQL exited unexpectedly\n{self.pg.log_tail()}")
        if not is_mounted(self.b.mountpoint):
            say(f"{self.b.mountpoint} was unmounted from outside; shutting down.")
            return False
        return super().still_up()

    # --- clean-up -------------------------------------------------------------------------------------------
    def cleanup(self) -> bool:
        """Unmount host B, then host A (the leader, which exports what is left), then stop PostgreSQL and the
        endpoint by their PIDs. True if all went well."""
        heading("Cleaning up")
        ok = self.b.release_mount()
        ok = self.release_mount() and ok
        if self.pg is not None and (self.pg.running or self.pg.base_dir is not None):
            pid = self.pg.pid
            try:
                self.pg.stop()
                say(f"stopped PostgreSQL (pid {pid}) and removed its data directory")
            except PostgresError as e:
                say(f"error: {e}")
                ok = False
        self.stop_endpoint()
        return ok


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lustrefs.demo.cluster",
        description="Mount one lustrefs file system on two hosts (PostgreSQL metadata engine) and show them agree.",
    )
    parser.add_argument("--mountpoints", type=Path, nargs=2, metavar=("MNT_A", "MNT_B"),
                        default=[Path("demo-mnt-a"), Path("demo-mnt-b")],
                        help="host A's and host B's mount points (created if missing; default ./demo-mnt-a "
                             "./demo-mnt-b)")  # fmt: skip
    parser.add_argument("--keep-state", action="store_true",
                        help="keep the state directory (both LUSTREFS_HOMEs) and logs after exit")  # fmt: skip
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="unmount and stop right after the walk-through instead of waiting for Ctrl-C")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return ClusterDemo([m.absolute() for m in args.mountpoints], args.keep_state, args.wait).main()


if __name__ == "__main__":
    sys.exit(main())
