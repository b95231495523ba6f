"""A small POSIX conformance check, by hand: the same checks on a lustrefs mount and on a local directory.

``python -m benchmarks.posix_check [--mountpoint DIR]``: without a mount point it starts moto on 127.0.0.1,
creates and mounts a file system (ExportPath = ImportPath), runs every check on the mount and on a temporary local
directory, prints each check that differs from the local file system, and the totals. Checks run as root; those
about another user run a child process as uid 65534. It is no substitute for pjdfstest (not packaged here): it
covers the namespace operations lustrefs implements, their errnos, link counts and timestamps.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Check = tuple[str, Callable[[Path], object]]


def _errno(fn: Callable[[], object]) -> object:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, exc.errno)
    return "ok"


def _ticks(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_mtime_ns, st.st_ctime_ns


def _changed(before: tuple[int, int], path: Path) -> tuple[bool, bool]:
    after = _ticks(path)
    return after[0] > before[0], after[1] > before[1]


def _changes(watched: Path, action: Callable[[], object], after: Path | None = None) -> tuple[bool, bool]:
    """Whether the (mtime, ctime) of ``watched`` (found at ``after`` once ``action`` ran) move when it runs."""
    before = _ticks(watched)
    time.sleep(0.01)
    action()
    return _changed(before, after or watched)


def _later(fn: Callable[[Path], object]) -> Callable[[Path], object]:
    """Run ``fn`` after a pause, so that a timestamp it sets differs from the one before."""

    def run(root: Path) -> object:
        time.sleep(0.01)
        return fn(root)

    return run


def checks() -> list[Check]:
    out: list[Check] = []

    def add(name: str) -> Callable[[Callable[[Path], object]], Callable[[Path], object]]:
        def wrap(fn: Callable[[Path], object]) -> Callable[[Path], object]:
            out.append((name, fn))
            return fn

        return wrap

    for kind, make in {
        "file": lambda p: p.write_bytes(b""),
        "dir": lambda p: p.mkdir(),
        "fifo": lambda p: os.mkfifo(p),
        "chr": lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "blk": lambda p: os.mknod(p, stat.S_IFBLK | 0o600, os.makedev(7, 0)),
        "sock": lambda p: socket.socket(socket.AF_UNIX).bind(str(p)),
        "symlink": lambda p: os.symlink("target", p),
    }.items():

        @add(f"create {kind}: type, nlink, rdev")
        def _(root: Path, make: Callable[[Path], object] = make) -> object:
            make(root / "x")
            st = os.lstat(root / "x")
            return stat.S_IFMT(st.st_mode), st.st_nlink, st.st_rdev

        @add(f"create {kind}: an existing name is EEXIST")
        def _(root: Path, make: Callable[[Path], object] = make) -> object:
            (root / "x").write_bytes(b"")
            return _errno(lambda: make(root / "x"))

        @add(f"create {kind}: parent mtime and ctime change")
        def _(root: Path, make: Callable[[Path], object] = make) -> object:
            before = _ticks(root)
            time.sleep(0.01)
            make(root / "x")
            return _changed(before, root)

        @add(f"create {kind}: name of 256 bytes is ENAMETOOLONG")
        def _(root: Path, make: Callable[[Path], object] = make) -> object:
            return _errno(lambda: make(root / ("n" * 256)))

        @add(f"create {kind}: in a missing directory is ENOENT")
        def _(root: Path, make: Callable[[Path], object] = make) -> object:
            return _errno(lambda: make(root / "missing" / "x"))

        @add(f"create {kind}: under a file is ENOTDIR")
        def _(root: Path, make: Callable[[Path], object] = make) -> object:
            (root / "f").write_bytes(b"")
            return _errno(lambda: make(root / "f" / "x"))

    @add("unlink: a missing name is ENOENT")
    def _(root: Path) -> object:
        return _errno(lambda: os.unlink(root / "nothing"))

    @add("unlink: a directory is EISDIR")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        return _errno(lambda: os.unlink(root / "d"))

    @add("rmdir: a file is ENOTDIR")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"")
        return _errno(lambda: os.rmdir(root / "f"))

    @add("rmdir: a non-empty directory is ENOTEMPTY")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        (root / "d/f").write_bytes(b"")
        return _errno(lambda: os.rmdir(root / "d"))

    @add("unlink: parent mtime and ctime change")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"")
        return _changes(root, lambda: os.unlink(root / "f"))

    @add("rename: over a file replaces it")
    def _(root: Path) -> object:
        (root / "a").write_bytes(b"a")
        (root / "b").write_bytes(b"b")
        os.rename(root / "a", root / "b")
        return (root / "b").read_bytes(), (root / "a").exists()

    @add("rename: a directory over a file is ENOTDIR")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        (root / "f").write_bytes(b"")
        return _errno(lambda: os.rename(root / "d", root / "f"))

    @add("rename: a file over a directory is EISDIR")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        (root / "f").write_bytes(b"")
        return _errno(lambda: os.rename(root / "f", root / "d"))

    @add("rename: over a non-empty directory is ENOTEMPTY")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        (root / "e").mkdir()
        (root / "e/f").write_bytes(b"")
        return _errno(lambda: os.rename(root / "d", root / "e"))

    @add("rename: a directory into itself is EINVAL")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        return _errno(lambda: os.rename(root / "d", root / "d/e"))

    @add("rename: the moved entry's ctime changes")
    def _(root: Path) -> object:
        (root / "a").write_bytes(b"")
        return _changes(root / "a", lambda: os.rename(root / "a", root / "b"), after=root / "b")[1]

    @add("rename: both parents' mtime change")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        (root / "e").mkdir()
        (root / "d/f").write_bytes(b"")
        before = (_ticks(root / "d"), _ticks(root / "e"))
        time.sleep(0.01)
        os.rename(root / "d/f", root / "e/f")
        return _changed(before[0], root / "d")[0], _changed(before[1], root / "e")[0]

    for what, change in {
        "chmod": lambda p: os.chmod(p, 0o600),
        "chown": lambda p: os.chown(p, 5, 6),
        "truncate": lambda p: os.truncate(p, 3),
        "utime": lambda p: os.utime(p, (1, 1)),
    }.items():

        @add(f"{what}: ctime changes")
        def _(root: Path, change: Callable[[Path], object] = change) -> object:
            (root / "f").write_bytes(b"abcdef")
            before = _ticks(root / "f")
            time.sleep(0.01)
            change(root / "f")
            return _changed(before, root / "f")[1]

    @add("truncate: mtime changes and the size is set")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"abcdef")
        return _changes(root / "f", lambda: os.truncate(root / "f", 2))[0], (root / "f").read_bytes()

    @add("chmod: keeps the type, sets the bits")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        os.chmod(root / "d", 0o1750)
        return oct(os.stat(root / "d").st_mode)

    @add("mkdir: link counts of parent and child")
    def _(root: Path) -> object:
        (root / "d").mkdir()
        (root / "d/a").mkdir()
        (root / "d/b").mkdir()
        (root / "d/f").write_bytes(b"")
        os.rmdir(root / "d/b")
        return os.stat(root / "d").st_nlink, os.stat(root / "d/a").st_nlink

    @add("symlink: a loop is ELOOP")
    def _(root: Path) -> object:
        os.symlink("b", root / "a")
        os.symlink("a", root / "b")
        return _errno(lambda: (root / "a").read_bytes())

    @add("symlink: readlink gives the target")
    def _(root: Path) -> object:
        os.symlink("some/where/../x", root / "l")
        return os.readlink(root / "l")

    @add("link: a second name, one inode, two links")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        result = _errno(lambda: os.link(root / "f", root / "g"))
        f, g = os.stat(root / "f"), os.stat(root / "g")
        return result, f.st_ino == g.st_ino, f.st_nlink, g.st_nlink

    @add("link: data written through one name is read through the other")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"one")
        os.link(root / "f", root / "g")
        with open(root / "g", "ab") as out:
            out.write(b" two")
        return (root / "f").read_bytes()

    @add("link: unlink of the first name keeps the data under the other")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"kept")
        os.link(root / "f", root / "g")
        os.unlink(root / "f")
        return (root / "g").read_bytes(), os.stat(root / "g").st_nlink

    @add("link: rename onto another link of the same inode does nothing")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        os.link(root / "f", root / "g")
        os.rename(root / "f", root / "g")
        return (root / "f").exists(), (root / "g").exists(), os.stat(root / "g").st_nlink

    @add("link: the file's ctime changes, its mtime does not")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        return _changes(root / "f", lambda: os.link(root / "f", root / "g"))

    @add("link: parent mtime and ctime change")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        (root / "d").mkdir()
        return _changes(root / "d", lambda: os.link(root / "f", root / "d/g"))

    @add("unlink of one of two names: the file's ctime changes")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        os.link(root / "f", root / "g")
        return _changes(root / "g", lambda: os.unlink(root / "f"))

    @add("link: errnos (directory, existing name, missing source, missing directory, long name, under a file)")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        (root / "d").mkdir()
        return [
            _errno(lambda: os.link(root / "d", root / "e")),
            _errno(lambda: os.link(root / "f", root / "d")),
            _errno(lambda: os.link(root / "none", root / "e")),
            _errno(lambda: os.link(root / "f", root / "none/e")),
            _errno(lambda: os.link(root / "f", root / ("n" * 256))),
            _errno(lambda: os.link(root / "f", root / "f/e")),
        ]

    @add("link: of a symlink, a FIFO and a socket")
    def _(root: Path) -> object:
        os.symlink("target", root / "l")
        os.mkfifo(root / "p")
        socket.socket(socket.AF_UNIX).bind(str(root / "s"))
        out = []
        for name in ("l", "p", "s"):
            os.link(root / name, root / (name + "2"), follow_symlinks=False)
            st = os.lstat(root / (name + "2"))
            out.append((stat.S_IFMT(st.st_mode), st.st_nlink))
        return out, os.readlink(root / "l2")

    @add("link: an unlinked open file has no links (fstat)")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        with open(root / "f", "rb") as f:
            os.unlink(root / "f")
            return os.fstat(f.fileno()).st_nlink, f.read()

    @add("link: cp -al makes a tree of links")
    def _(root: Path) -> object:
        (root / "t/u").mkdir(parents=True)
        (root / "t/u/f").write_bytes(b"x")
        subprocess.run(["cp", "-al", str(root / "t"), str(root / "c")], check=True)
        return os.stat(root / "c/u/f").st_ino == os.stat(root / "t/u/f").st_ino, os.stat(root / "t/u/f").st_nlink

    @add("chown: ctime changes, mtime does not")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        return _changes(root / "f", lambda: os.chown(root / "f", 65534, 65534)), os.stat(root / "f").st_uid

    @add("chown -1 -1: ctime changes (Linux)")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        return _changes(root / "f", lambda: os.chown(root / "f", -1, -1))

    @add("truncate and write beyond the largest file size are EFBIG")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        with open(root / "f", "r+b") as f:
            return _errno(lambda: os.truncate(root / "f", 10**18)), _errno(lambda: os.pwrite(f.fileno(), b"x", 10**18))

    @add("utimes: sets atime and mtime, ctime changes")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        before = _ticks(root / "f")[1]
        time.sleep(0.01)
        os.utime(root / "f", ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(root / "f")
        return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns > before

    @add("open: O_CREAT|O_EXCL of an existing name is EEXIST; O_DIRECTORY of a file is ENOTDIR")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        return [
            _errno(lambda: os.close(os.open(root / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY))),
            _errno(lambda: os.close(os.open(root / "f", os.O_RDONLY | os.O_DIRECTORY))),
        ]

    @add("symlink: a path through a loop is ELOOP; a long target is kept")
    def _(root: Path) -> object:
        os.symlink("b", root / "a")
        os.symlink("a", root / "b")
        os.symlink("x" * 1000, root / "long")
        return _errno(lambda: open(root / "a/x")), len(os.readlink(root / "long"))

    @add("open O_TRUNC: mtime and ctime change, also of an empty file")
    def _(root: Path) -> object:
        (root / "e").write_bytes(b"")
        (root / "f").write_bytes(b"x")
        before = _ticks(root / "e"), _ticks(root / "f")
        time.sleep(0.01)
        for name in ("e", "f"):
            os.close(os.open(root / name, os.O_WRONLY | os.O_TRUNC))
        return _changed(before[0], root / "e"), _changed(before[1], root / "f")

    @add("truncate to the same size: mtime and ctime change")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"xyz")
        return _changes(root / "f", lambda: os.truncate(root / "f", 3))

    @add("write: mtime and ctime change")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"xyz")
        before = _ticks(root / "f")
        time.sleep(0.01)
        with open(root / "f", "r+b") as f:
            f.write(b"a")
        return _changed(before, root / "f")

    @add("rename of a directory: its ctime changes, its link count follows")
    def _(root: Path) -> object:
        (root / "d/s").mkdir(parents=True)
        (root / "e").mkdir()
        ctime = _changes(root / "d", lambda: os.rename(root / "d", root / "e/d"), after=root / "e/d")[1]
        return ctime, os.stat(root / "e").st_nlink, os.stat(root).st_nlink

    @add("rename: a file to a name in another directory keeps its inode")
    def _(root: Path) -> object:
        (root / "f").write_bytes(b"x")
        (root / "d").mkdir()
        ino = os.stat(root / "f").st_ino
        os.rename(root / "f", root / "d/g")
        return os.stat(root / "d/g").st_ino == ino, (root / "d/g").read_bytes()

    @add("fifo: carries data")
    def _(root: Path) -> object:
        os.mkfifo(root / "p")
        fd = os.open(root / "p", os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(fd, b"hi")
            return os.read(fd, 10)
        finally:
            os.close(fd)

    @add("sticky directory: another user cannot remove root's file (EPERM)")
    def _(root: Path) -> object:
        (root / "t").mkdir()
        os.chmod(root / "t", 0o1777)
        (root / "t/f").write_bytes(b"")
        code = "import os, sys; os.setgid(65534); os.setuid(65534)\ntry:\n os.unlink(sys.argv[1]); print('ok')\n"
        code += "except OSError as e:\n import errno; print(errno.errorcode[e.errno])"
        res = subprocess.run([sys.executable, "-c", code, str(root / "t/f")], capture_output=True, text=True)
        return res.stdout.strip()

    @add("permissions: another user cannot read a 0600 file (EACCES)")
    def _(root: Path) -> object:
        (root / "s").write_bytes(b"secret")
        os.chmod(root / "s", 0o600)
        os.chmod(root, 0o755)
        code = "import os, sys; os.setgid(65534); os.setuid(65534)\ntry:\n open(sys.argv[1]).read(); print('ok')\n"
        code += "except OSError as e:\n import errno; print(errno.errorcode[e.errno])"
        res = subprocess.run([sys.executable, "-c", code, str(root / "s")], capture_output=True, text=True)
        return res.stdout.strip()

    return out


def run(root: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    for i, (name, fn) in enumerate(checks()):
        work = root / f"c{i}"
        work.mkdir()
        os.chmod(work, 0o777)
        try:
            results[name] = fn(work)
        except Exception as exc:  # a check that cannot even run counts as a difference
            results[name] = f"raised {type(exc).__name__}: {exc}"
    return results


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.posix_check")
    ap.add_argument("--mountpoint", help="a lustrefs mount to check (default: make one on moto)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # other users' checks must reach the directories below
        (Path(tmp) / "local").mkdir()
        local = run(Path(tmp) / "local")
        mounted = run(Path(a.mountpoint)) if a.mountpoint else _on_a_new_mount(Path(tmp))
    differ = [n for n in local if local[n] != mounted.get(n)]
    for name in differ:
        print(f"DIFFERS  {name}: local {local[name]!r}, lustrefs {mounted.get(name)!r}")
    print(f"{len(local) - len(differ)} passed, {len(differ)} failed")
    return 1 if differ else 0


def _on_a_new_mount(tmp: Path) -> dict[str, object]:
    """Start moto on 127.0.0.1, create and mount a file system, run the checks on it, unmount and stop."""
    from benchmarks import endpoints

    with endpoints.moto(tmp / "moto.log") as ep:
        endpoints.apply_env(ep)
        ep.client().create_bucket(Bucket="posix-check")
        cli = [sys.executable, "-m", "lustrefs.client.cli", "--endpoint-url", ep.url]
        env = {**os.environ, "LUSTREFS_HOME": str(tmp / "home")}
        out = subprocess.run(
            [*cli, "create-file-system", "--file-system-type", "LUSTRE", "--storage-capacity", "1200",
             "--lustre-configuration", "ImportPath=s3://posix-check,ExportPath=s3://posix-check"],
            capture_output=True, text=True, env=env, check=True, timeout=60,
        ).stdout  # fmt: skip
        fs_id = json.loads(out)["FileSystem"]["FileSystemId"]
        mnt = tmp / "mnt"
        mnt.mkdir()
        subprocess.run([*cli, "mount", fs_id, str(mnt), "-o", "allow_other,attr_timeout=0.01"], env=env, check=True,
                       timeout=120)  # fmt: skip
        try:
            os.chmod(mnt, 0o777)
            return run(mnt)
        finally:
            subprocess.run([*cli, "umount", str(mnt)], env=env, timeout=180)


if __name__ == "__main__":
    sys.exit(main())
