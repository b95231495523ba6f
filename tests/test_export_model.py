"""Model test of the S3 mirror: random programs of namespace operations (hard links among them), writes, unlinked
open files, request failures, hung requests and crashes run against an in-process daemon (tests/inproc.py) and a
reference model.

After each program the faults stop and the daemon settles; then the objects in the bucket must be exactly the
tree (paths, bytes, type and permission bits; each name of a hard-linked file an object), the names of one inode
in the model must be the names of one inode in the mount, nothing may be left dirty, in flight or half uploaded,
and every read on the way (including through handles of unlinked files) must have returned the model's bytes.

A bounded number of programs runs in ``make test`` (30); a long run by hand (1,000 with ``LUSTREFS_SLOW=1``, or
any number)::

    LUSTREFS_MIRROR_EXAMPLES=2000 LUSTREFS_MIRROR_STEPS=40 .venv/bin/python -m pytest tests/test_export_model.py
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import Ctx, Daemon
from memrepo import Bucket

from lustrefs import metadata

PATHS = ["a", "b", "d", "d/a", "d/b", "e", "e/a"]
# An export delay makes files of several parts upload from their close and complete after it (changes, crashes and
# remounts meet uploads held back by it).
DELAYS = [0.0, 0.05]
BOUND = 120.0  # seconds a program may take: its settling waits at most 60 s, twice
TEARDOWN = 10.0  # seconds the end of the trio run may take after the last check
EXAMPLES = int(os.environ.get("LUSTREFS_MIRROR_EXAMPLES", "1000" if os.environ.get("LUSTREFS_SLOW") else "30"))

path = st.sampled_from(PATHS)
existing = st.integers(min_value=0, max_value=50)  # the n-th file, link or node of the tree (modulo their number)
sizes = st.sampled_from([0, 3000, 1_500_000])
op = st.one_of(
    st.tuples(st.just("write"), path, st.binary(max_size=64), sizes),
    st.tuples(st.just("write"), existing, st.binary(max_size=64), sizes),  # rewrite an existing file
    st.tuples(st.just("link"), existing, path),
    st.tuples(st.just("mkdir"), path),
    st.tuples(st.just("rmdir"), path),
    st.tuples(st.just("unlink"), path),
    st.tuples(st.just("rename"), path, path),
    st.tuples(st.just("symlink"), path, st.sampled_from(["t", "../x", "a/b/c"])),
    st.tuples(st.just("mknod"), path, st.sampled_from([stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR])),
    st.tuples(st.just("chmod"), path, st.sampled_from([0o600, 0o640, 0o755])),
    st.tuples(st.just("open_unlink_read"), path),
    st.tuples(st.just("pause"), st.sampled_from([0, 0.002, 0.02])),
    st.tuples(st.just("faults"), st.sampled_from([0.0, 0.2, 0.5]), st.booleans()),
    st.tuples(st.just("crash")),
    st.tuples(st.just("settle")),
    st.tuples(st.just("poll")),
)


@dataclass(eq=False)
class Entry:
    kind: str  # "file", "dir", "link" or "node" (FIFO, socket, device: the type is in ``mode``); the names of
    # one inode (hard links) share one Entry
    mode: int
    data: bytes = b""  # file content, or link target


@dataclass
class Model:
    tree: dict[str, Entry] = field(default_factory=dict)

    def parent_ok(self, p: str) -> bool:
        head = p.rpartition("/")[0]
        return head == "" or (head in self.tree and self.tree[head].kind == "dir")

    def children(self, p: str) -> list[str]:
        return [q for q in self.tree if q.startswith(p + "/")]

    def rename(self, a: str, b: str) -> bool:
        """Apply rename(a, b) if POSIX allows it; returns whether it did."""
        if a not in self.tree or not self.parent_ok(b) or b == a or b.startswith(a + "/"):
            return False
        src, dst = self.tree[a], self.tree.get(b)
        if dst is not None and (
            (src.kind == "dir") != (dst.kind == "dir") or (dst.kind == "dir" and self.children(b))
        ):
            return False
        moved = {q: self.tree.pop(q) for q in [a, *self.children(a)]}
        self.tree.pop(b, None)
        for q, e in moved.items():
            self.tree[b + q[len(a) :]] = e
        return True


def content(n: int, seed: bytes) -> bytes:
    return (seed or b"\0") * (n // max(len(seed), 1)) + seed[: n % max(len(seed), 1)] if n else seed


def new_daemon(home: Path, store: Bucket, delay: float) -> Daemon:
    """Export prefix = import prefix, every export and import event on: the mount sees its own objects. With a
    ``delay``, files of several parts are uploaded from their close and completed after it (changes meanwhile
    abort that upload)."""
    return Daemon(home, store, delay=delay, import_policy="NEW_CHANGED_DELETED")


def nth(m: Model, n: int | str, kinds: tuple[str, ...] = ("file", "link", "node")) -> str:
    """A path given as such, or the ``n``-th entry of those ``kinds`` ('' if there is none)."""
    if isinstance(n, str):
        return n
    names = sorted(p for p, e in m.tree.items() if e.kind in kinds)
    return names[n % len(names)] if names else ""


async def apply(d: Daemon, m: Model, step: tuple) -> Daemon | None:
    """Run one step on the daemon and the model; returns a new daemon after a crash."""
    kind, *args = step
    if kind == "write":
        args[0] = nth(m, args[0], ("file",))
        p, seed, size = args
        if not p or not m.parent_ok(p) or (p in m.tree and m.tree[p].kind != "file"):
            return None
        data = content(size, seed)
        await d.write_file(p, data)
        if p in m.tree:
            m.tree[p].data = data  # every name of the inode
        else:
            m.tree[p] = Entry("file", 0o644, data)
    elif kind == "mkdir":
        (p,) = args
        if p in m.tree or not m.parent_ok(p):
            return None
        await d.mkdir(p)
        m.tree[p] = Entry("dir", 0o755)
    elif kind == "rmdir":
        (p,) = args
        if p not in m.tree or m.tree[p].kind != "dir" or m.children(p):
            return None
        await d.rmdir(p)
        del m.tree[p]
    elif kind == "unlink":
        (p,) = args
        if p not in m.tree or m.tree[p].kind == "dir":
            return None
        await d.unlink(p)
        del m.tree[p]
    elif kind == "rename":
        a, b = args
        if a != b and a in m.tree and m.tree.get(b) is m.tree[a]:
            await d.rename(a, b)  # two names of one inode: POSIX says nothing happens
        elif m.rename(a, b):
            await d.rename(a, b)
    elif kind == "link":
        a, b = nth(m, args[0]), args[1]
        if a not in m.tree or m.tree[a].kind == "dir" or b in m.tree or not m.parent_ok(b):
            return None
        parent, name = await d.parent_of(b)
        await d.ops.link(await d.resolve(a), parent, name, Ctx())
        m.tree[b] = m.tree[a]
    elif kind == "symlink":
        p, target = args
        if p in m.tree or not m.parent_ok(p):
            return None
        await d.symlink(p, target)
        m.tree[p] = Entry("link", 0o777, target.encode())
    elif kind == "mknod":
        p, node_type = args
        if p in m.tree or not m.parent_ok(p):
            return None
        parent, name = await d.parent_of(p)
        await d.ops.mknod(parent, name, node_type | 0o640, os.makedev(1, 3), Ctx(umask=0))
        m.tree[p] = Entry("node", node_type | 0o640)
    elif kind == "chmod":
        p, mode = args
        if p not in m.tree or m.tree[p].kind == "link":
            return None
        await d.chmod(p, mode)
        e = m.tree[p]
        e.mode = stat.S_IFMT(e.mode) | mode if e.kind == "node" else mode
    elif kind == "open_unlink_read":
        (p,) = args
        if p not in m.tree or m.tree[p].kind != "file":
            return None
        ino = await d.resolve(p)
        fh = (await d.ops.open(ino, os.O_RDONLY, Ctx())).fh
        await d.unlink(p)
        expected = m.tree.pop(p).data
        await trio.sleep(0.01)  # let the deletion of its object run
        assert bytes(await d.ops.read(fh, 0, len(expected) + 10)) == expected
        await d.ops.release(fh)
    elif kind == "pause":
        await trio.sleep(args[0])
    elif kind == "faults":
        rate, hang = args
        d.repo.store.faults.error_rate = rate
        d.repo.store.faults.hang = {"PUT", "DELETE"} if hang else set()
    elif kind == "settle":  # everything exported (when no fault is on: with faults it may take minutes)
        faults = d.repo.store.faults
        if not faults.error_rate and not faults.hang:
            await d.settled(timeout=60)
    elif kind == "poll":  # an import poll sees only this mount's own objects: it must change nothing
        await d.importer.poll()
    elif kind == "crash":
        return await d.crash() or new_daemon(d.home, d.repo.store, d.writeback.delay)
    return None


async def check(d: Daemon, m: Model) -> None:
    """After quiescence: the bucket is the tree, and the mount reads the model's bytes."""
    store = d.repo.store
    store.faults.error_rate, store.faults.hang = 0.0, set()
    await d.settled(timeout=60)
    expected = {p + "/" if e.kind == "dir" else p: e for p, e in m.tree.items()}
    assert set(store.objects) == set(expected)
    assert store.uploads == {}
    for key, e in expected.items():
        obj = store.objects[key]
        assert obj.body == (b"" if e.kind in ("dir", "node") else e.data), key
        mode = metadata.from_user_metadata(obj.metadata).mode
        assert mode is not None and stat.S_IMODE(mode) == stat.S_IMODE(e.mode), key
        kind = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "link": stat.S_IFLNK, "node": stat.S_IFMT(e.mode)}[e.kind]
        assert stat.S_IFMT(mode) == kind, key
    for p, e in m.tree.items():
        if e.kind == "node":
            assert (await d.ops.getattr(await d.resolve(p), Ctx())).st_mode == e.mode, p
    for p, e in m.tree.items():
        if e.kind == "file":
            assert await d.read_file(p) == e.data, p
    inodes = {p: await d.resolve(p) for p, e in m.tree.items() if e.kind != "dir"}
    for p, e in m.tree.items():
        if e.kind != "dir":
            names = sorted(q for q, f in m.tree.items() if f is e)
            assert sorted(q for q in inodes if inodes[q] == inodes[p]) == names, p
            assert (await d.ops.getattr(inodes[p], Ctx())).st_nlink == len(names), p


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
@given(
    program=st.lists(op, max_size=int(os.environ.get("LUSTREFS_MIRROR_STEPS", "25"))),
    delay=st.sampled_from(DELAYS),
)
def test_the_bucket_mirrors_the_tree(tmp_path_factory: pytest.TempPathFactory, program: list, delay: float) -> None:
    home: Path = tmp_path_factory.mktemp("model")
    store = Bucket()
    store.faults.latency = 0.001  # requests overlap with the operations that follow them

    where = ["start"]  # the step running, for the report of a program that does not end
    stuck: list[str] = []  # where the tasks waited when the program was found stuck

    ended = [0.0]  # when its last check ended

    async def watchdog(scope: trio.CancelScope) -> None:
        """Past BOUND, or TEARDOWN seconds after its last check: record every task's wait, then cancel all."""
        began = time.monotonic()
        while (now := time.monotonic()) - began < BOUND and not (where[0] == "teardown" and now - ended[0] > TEARDOWN):
            await trio.sleep(0.1)
        stuck.append(f"the program did not end within {now - began:.0f} s, at {where[0]}; its tasks:\n{task_tree()}")
        scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog, outer.cancel_scope)
            async with trio.open_nursery() as nursery:
                m = Model()
                d = new_daemon(home, store, delay)
                await d.start(nursery)
                for i, step in enumerate(program):
                    where[0] = f"step {i} {step!r:.80}"
                    new = await apply(d, m, step)
                    if new is not None:
                        d = new
                        await d.start(nursery)
                where[0] = "check"
                await check(d, m)
                where[0] = "stop"
                await d.stop()
                where[0] = "check after a remount"
                again = new_daemon(home, store, delay)  # and after a clean remount
                await again.start(nursery)
                await check(again, m)
                await again.stop()
                ended[0], where[0] = time.monotonic(), "teardown"
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    # In a thread of its own: a task that cannot be cancelled (a shielded wait) keeps trio.run from returning,
    # and a fail_after around the program could not end it. The program then fails with where its tasks waited
    # (the thread is left behind) instead of hanging until pytest's timeout.
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            trio.run(main)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, name="model program", daemon=True)
    thread.start()
    began = time.monotonic()
    while thread.is_alive() and not stuck and time.monotonic() - began < BOUND + TEARDOWN:
        thread.join(0.5)
    thread.join(TEARDOWN)  # the cancellation of a program found stuck unwinds it, unless a task cannot be cancelled
    if stuck or not outcome:
        raise AssertionError(
            (stuck[0] if stuck else f"the trio run did not end after the program (at {where[0]})")
            + ("" if outcome else "\n(the trio run does not end: a task cannot be cancelled)")
        ) from (outcome[0] if outcome else None)
    if outcome[0] is not None:
        raise outcome[0]


def task_tree() -> str:
    """Every task of the current trio run, indented by nursery, with the innermost frames it awaits in."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [
            f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:{n})"
            for f, n in task.iter_await_frames()
            if f"{os.sep}trio{os.sep}" not in f.f_code.co_filename  # trio's own frames say nothing
        ]
        lines.append("  " * depth + f"{task.name}: " + " > ".join(frames[-3:]))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)
