"""The machine the benchmark runs on: timed commands with timeouts, the page cache, process memory and CPU, tools."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class CaseError(RuntimeError):
    """A measurement that failed (bad exit status, wrong result); the message says why."""


class OpTimeout(CaseError):
    """An operation that did not finish within its time limit (e.g. on a hung mount)."""


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Ran:
    """A finished command: wall-clock seconds and its output."""

    seconds: float
    stdout: str
    stderr: str


def run_timed(
    argv: list[str],
    timeout: float,
    *,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    capture: bool = True,
) -> Ran:
    """Run a command to completion and time it. Raises OpTimeout, or CaseError on a non-zero exit status."""
    start = time.perf_counter()
    try:
        res = subprocess.run(
            argv,
            input=stdin,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise OpTimeout(f"{argv[0]} did not finish within {timeout:g} s") from None
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise CaseError(f"{' '.join(argv[:3])}… exited {res.returncode}: {' | '.join(err)}")
    out = res.stdout.decode(errors="replace") if capture else ""
    return Ran(elapsed, out, res.stderr.decode(errors="replace"))


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run ``fn`` in a daemon thread; raise OpTimeout if it has not returned after ``timeout`` seconds.

    A thread stuck on a hung FUSE mount is left behind; it returns (with an error) once the mount is torn down.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    t = threading.Thread(target=target, daemon=True, name=what)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise OpTimeout(f"{what} did not finish within {timeout:g} s")
    if error:
        raise error[0]
    return result[0]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (each call itself bounded) until true; raise OpTimeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not call_with_timeout(condition, max(deadline - time.monotonic(), 1.0), what):
        if time.monotonic() > deadline:
            raise OpTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def is_mount(path: Path, timeout: float = 10.0) -> bool:
    """``os.path.ismount`` that cannot hang on a dead FUSE mount (a hung probe counts as mounted)."""
    try:
        return call_with_timeout(lambda: os.path.ismount(path), timeout, f"ismount {path}")
    except OpTimeout:
        return True


class PageCache:
    """Drops the kernel's page cache: ``drop_caches`` when permitted, else ``POSIX_FADV_DONTNEED`` per file."""

    def __init__(self) -> None:
        self.method = "drop_caches" if self._try_drop_caches() else "fadvise"

    @staticmethod
    def _try_drop_caches() -> bool:
        try:
            os.sync()
            DROP_CACHES.write_text("3\n")
            return True
        except OSError:
            return False

    def drop(self, *paths: Path, timeout: float = 120.0) -> None:
        """Drop cached pages (all of them, or with fadvise those of the files under ``paths``)."""
        if self.method == "drop_caches":
            call_with_timeout(self._try_drop_caches, timeout, "drop_caches")
        else:
            call_with_timeout(lambda: _fadvise_all(paths), timeout, "fadvise DONTNEED")

    def describe(self) -> str:
        if self.method == "drop_caches":
            return "`sync; echo 3 > /proc/sys/vm/drop_caches` (page cache, dentries and inodes)"
        return "`posix_fadvise(POSIX_FADV_DONTNEED)` on the files read (drop_caches not permitted)"


def _files_under(paths: Iterable[Path]) -> Iterable[Path]:
    for p in paths:
        if p.is_dir():
            for root, _dirs, files in os.walk(p):
                yield from (Path(root) / f for f in files)
        elif p.exists():
            yield p


def _fadvise_all(paths: Iterable[Path]) -> None:
    for f in _files_under(paths):
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set size (``VmHWM``) in bytes, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) the process has used so far, in seconds; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """Wait up to ``timeout`` for ``pid`` to exit, then SIGTERM, then SIGKILL (only this PID)."""
    for sig in (None, 15, 9):
        if sig is not None and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if not alive(pid):
            return


def ensure_tool(binary: str, package: str, allow_install: bool) -> str | None:
    """Find ``binary``; install Debian ``package`` with apt-get if allowed and root. Returns why not, or None."""
    if shutil.which(binary):
        return None
    if not allow_install:
        return f"{binary} is not installed (apt-get install {package}; installing was not allowed)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} is not installed and this user cannot apt-get install {package}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for update_first in (False, True):  # the package lists may be missing or stale: update once, then retry
        if update_first:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False)
        install = ["apt-get", "install", "-y", "-qq", package]
        subprocess.run(install, env=env, capture_output=True, timeout=600, check=False)
        if shutil.which(binary):
            return None
    return f"{binary}: apt-get install {package} failed"


def tool_version(argv: list[str]) -> str:
    """The first line a ``--version`` style command prints, or ``?``."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[0] if lines else "?"


class Bystanders:
    """What else was running: a background thread samples, every ``interval`` seconds, the CPU time of the
    processes that are not part of the run (not this process nor its descendants, nor a process naming ``mark``,
    the run's work directory, on its command line, such as a detached lustrefs daemon; kernel threads are left
    out). A process first seen in a sample counts with all its CPU time; one that starts and ends between two
    samples is missed, so the figure is a lower bound."""

    def __init__(self, mark: str, interval: float = 1.0) -> None:
        self.mark = mark
        self.interval = interval
        self.cpu: dict[str, float] = {}  # command -> CPU seconds used during the run
        self.total = 0.0  # CPU seconds of all of them so far (read by the run while the thread samples)
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="bystanders")
        self._started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Bystanders:
        self._started = time.monotonic()
        self._sample(record=False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.seconds = time.monotonic() - self._started

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, ValueError):
                self._sample(record=True)

    def _sample(self, record: bool) -> None:
        procs: dict[int, tuple[int, float]] = {}  # pid -> (ppid, CPU seconds)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
                    procs[int(entry.name)] = (int(fields[1]), cpu)
        ours, me = set(), os.getpid()
        for pid in procs:  # this process and its descendants
            chain, p = [], pid
            while p in procs and p not in ours and p != me and p > 1:
                chain.append(p)
                p = procs[p][0]
            if p == me or p in ours:
                ours.update(chain)
        last, self._last = self._last, {}
        for pid, (ppid, cpu) in procs.items():
            if pid == me or pid in ours or ppid == 2 or pid == 2:
                continue
            try:
                argv = (Path(f"/proc/{pid}") / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not any(argv) or self.mark in os.fsdecode(b" ".join(argv)):
                continue  # no command line: an exited process not reaped yet (e.g. a detached lustrefs daemon)
            command = " ".join(os.fsdecode(a) for a in argv[:4] if a)
            self._last[pid] = cpu
            if record and cpu > last.get(pid, 0.0):  # a new process: all its CPU time is the run's
                self.cpu[command[:60]] = self.cpu.get(command[:60], 0.0) + cpu - last.get(pid, 0.0)
                self.total += cpu - last.get(pid, 0.0)

    def describe(self, top: int = 3) -> str:
        total = self.total
        if not self.seconds:
            return "not watched"
        cores = total / self.seconds
        busiest = sorted(self.cpu.items(), key=lambda kv: -kv[1])[:top]
        detail = "; ".join(f"`{name}` {sec:,.0f} CPU-s" for name, sec in busiest if sec >= 1)
        return f"{total:,.0f} CPU-s, {cores:.2f} cores on average" + (f" ({detail})" if detail else "")


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages (other work on the machine moves every figure), or ``?``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    """A one-line description: cores, memory, kernel, OS."""
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024**2
    os_name = "Linux"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return f"{os.cpu_count()} cores, {mem} GiB RAM, {os_name}, kernel {platform.release()}"
