"""Model-based test: random sequences of file operations on the mount and on a local directory must agree.

A bounded number of examples runs in CI; set LUSTREFS_MODEL_EXAMPLES (and LUSTREFS_MODEL_STEPS) for a long run.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

pytestmark = pytest.mark.fuse
MIB = 1024 * 1024
PATHS = st.sampled_from(["a", "b", "c", "x", "x/a", "x/b", "y", "y/c"])
OFFSETS = st.sampled_from([0, 1, 4095, MIB - 3, MIB, 2 * MIB + 5])
DATA = st.binary(min_size=0, max_size=3000)
MODES = st.sampled_from([0o600, 0o640, 0o644, 0o700, 0o755])


def outcome(fn: Callable[[Path], Any], root: Path) -> Any:
    """What ``fn`` returned, or the errno it failed with."""
    try:
        return ("ok", fn(root))
    except OSError as exc:
        return ("errno", exc.errno)


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below ``root``: type, permission bits, size and content of files."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), st_.st_size, path.read_bytes())
    return out


def make_machine(mount_root: Path, local_root: Path) -> type[RuleBasedStateMachine]:
    counter = itertools.count()

    class FileSystemModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            n = next(counter)
            self.roots = (mount_root / f"ex{n}", local_root / f"ex{n}")
            for root in self.roots:
                root.mkdir()

        def both(self, fn: Callable[[Path], Any]) -> Any:
            mount, local = (outcome(fn, root) for root in self.roots)
            assert mount == local
            return mount

        @rule(path=PATHS, data=DATA)
        def create(self, path: str, data: bytes) -> None:
            self.both(lambda r: (r / path).write_bytes(data))

        @rule(path=PATHS, off=OFFSETS, data=DATA)
        def write_at(self, path: str, off: int, data: bytes) -> None:
            def write(r: Path) -> int:
                fd = os.open(r / path, os.O_WRONLY)
                try:
                    return os.pwrite(fd, data, off)
                finally:
                    os.close(fd)

            self.both(write)

        @rule(path=PATHS, size=OFFSETS)
        def truncate(self, path: str, size: int) -> None:
            self.both(lambda r: os.truncate(r / path, size))

        @rule(src=PATHS, dst=PATHS)
        def rename(self, src: str, dst: str) -> None:
            self.both(lambda r: os.rename(r / src, r / dst))

        @rule(path=PATHS)
        def unlink(self, path: str) -> None:
            self.both(lambda r: os.unlink(r / path))

        @rule(path=PATHS)
        def mkdir(self, path: str) -> None:
            self.both(lambda r: os.mkdir(r / path))

        @rule(path=PATHS)
        def rmdir(self, path: str) -> None:
            self.both(lambda r: os.rmdir(r / path))

        @rule(path=PATHS, mode=MODES)
        def chmod(self, path: str, mode: int) -> None:
            self.both(lambda r: os.chmod(r / path, mode))

        @rule(path=PATHS, off=OFFSETS)
        def read(self, path: str, off: int) -> None:
            def read(r: Path) -> bytes:
                with open(r / path, "rb") as f:
                    f.seek(off)
                    return f.read(5000)

            self.both(read)

        @invariant()
        def same_tree(self) -> None:
            mount, local = (tree(root) for root in self.roots)
            assert mount == local

    return FileSystemModel


def test_mount_behaves_like_a_local_directory(s3: Any, bucket: str, mounter: Any, tmp_path: Path) -> None:
    m = mounter(f"s3://{bucket}", options="export_delay=0.1", ExportPath=f"s3://{bucket}/export")
    local = tmp_path / "local"
    local.mkdir()
    machine = make_machine(m.path, local)
    examples = int(os.environ.get("LUSTREFS_MODEL_EXAMPLES", "12"))
    steps = int(os.environ.get("LUSTREFS_MODEL_STEPS", "25"))
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert not any(e["level"] == "ERROR" for e in m.events())
