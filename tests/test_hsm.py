"""HSM commands (``lustrefs hsm_*``, as ``lfs`` spells them) through a real FUSE mount against moto on 127.0.0.1."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import LUSTREFS, MotoEndpoint, create_fs, mount_fs, run_cli, wait_for

pytestmark = pytest.mark.fuse
MIB = 1024 * 1024
SYSTEM_PYTHON = "/usr/bin/python3"  # runnable by any user, unlike a virtualenv under /root


def hsm(verb: str, *paths: Path) -> tuple[int, str, str]:
    return run_cli(verb, *map(str, paths))


def state(path: Path) -> str:
    rc, out, err = hsm("hsm_state", path)
    assert rc == 0, err
    return out.strip()


def flags(path: Path, expected: str) -> str:
    """The line ``lustrefs hsm_state`` should print for ``path`` given its flags part."""
    return f"{path}: {expected}"


RELEASED = "(0x0000000d) released exists archived, archive_id:1"
ARCHIVED = "(0x00000009) exists archived, archive_id:1"
DIRTY_ARCHIVED = "(0x0000000b) exists dirty archived, archive_id:1"
NEW_DIRTY = "(0x00000003) exists dirty, archive_id:1"


def body(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_states_through_import_read_write_and_archive(s3: Any, bucket: str, mounter: Any) -> None:
    data = random.Random(1).randbytes(3 * MIB + 17)
    s3.put_object(Bucket=bucket, Key="d/imported.bin", Body=data)
    m = mounter(f"s3://{bucket}", options="export_delay=3600", ExportPath=f"s3://{bucket}/exp")
    f = m.path / "d/imported.bin"
    assert state(f) == flags(f, RELEASED)
    assert hsm("hsm_action", f)[1] == f"{f}: NOOP\n"

    with open(f, "rb") as fh:
        assert fh.read(10) == data[:10]
    assert state(f) == flags(f, ARCHIVED)  # any data cached: no longer released

    with open(f, "r+b") as fh:
        fh.write(b"changed")
    assert state(f) == flags(f, DIRTY_ARCHIVED)
    new = m.path / "d/new.txt"
    new.write_bytes(b"brand new")
    assert state(new) == flags(new, NEW_DIRTY)
    assert hsm("hsm_action", new)[1] == f"{new}: ARCHIVE waiting (from 0 to EOF)\n"  # queued for export

    assert hsm("hsm_archive", f, new) == (0, "", "")
    assert hsm("hsm_action", new)[1] == f"{new}: NOOP\n"
    assert body(s3, bucket, "exp/d/new.txt") == b"brand new"
    assert body(s3, bucket, "exp/d/imported.bin") == b"changed" + data[7:]
    _, out, _ = hsm("hsm_state", f, new)
    assert out.splitlines() == [flags(f, ARCHIVED), flags(new, ARCHIVED)]


def test_release_and_restore(s3: Any, bucket: str, mounter: Any) -> None:
    data = random.Random(2).randbytes(4 * MIB)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    f = m.path / "big.bin"
    assert f.read_bytes() == data
    used = m.stats()["cache"]["used"]
    assert used >= len(data)

    assert hsm("hsm_release", f) == (0, "", "")
    assert state(f) == flags(f, RELEASED)
    assert m.stats()["cache"]["used"] == used - len(data)

    assert hsm("hsm_restore", f) == (0, "", "")
    wait_for(lambda: state(f) == flags(f, ARCHIVED) and m.stats()["cache"]["used"] == used, 30, "the restore")
    wait_for(lambda: hsm("hsm_action", f)[1] == f"{f}: NOOP\n", 10, "the restore to finish")
    fetched = m.stats()["cache"]["bytes_fetched"]
    assert f.read_bytes() == data
    assert m.stats()["cache"]["bytes_fetched"] == fetched  # read from the cache, not fetched again


def test_release_of_a_dirty_file_is_refused(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    f = m.path / "local.txt"
    f.write_bytes(b"not exported yet")
    rc, out, err = hsm("hsm_release", f)
    assert rc == 1 and out == ""
    assert err == (
        f"Cannot send HSM request (use of {f}): ResourceBusy: the file has changes not exported yet; archive it first\n"
    )
    assert state(f) == flags(f, NEW_DIRTY)
    assert f.read_bytes() == b"not exported yet"
    rc, _, err = hsm("hsm_archive", m.path)
    assert rc == 1 and err == f'error: "{m.path}" is not a regular file\n'


def test_archive_failure_is_reported(s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    deep = m.path
    for c in "abcd":
        deep /= c * 250
        deep.mkdir()
    f = deep / ("f" * 30)  # the key is 1,034 bytes
    f.write_bytes(b"x")
    rc, _, err = hsm("hsm_archive", f)
    assert rc == 1
    assert err.startswith(f"Cannot send HSM request (use of {f}): PathSizeTooLong: The key ")
    assert state(f) == flags(f, NEW_DIRTY)
    assert any(e["code"] == "PathSizeTooLong" for e in m.events())


def test_only_root_or_the_owner_may_act_on_a_file(moto: MotoEndpoint, s3: Any, bucket: str, home: Path) -> None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to act as another user")
    s3.put_object(Bucket=bucket, Key="roots.bin", Body=b"r" * 1000)
    fs_id = create_fs(moto, f"s3://{bucket}", ExportPath=f"s3://{bucket}/exp")
    top = Path(tempfile.mkdtemp(prefix="lustrefs-hsm-"))  # reachable by other users, unlike tmp_path
    os.chmod(top, 0o755)
    res, m = mount_fs(fs_id, top / "mnt", "allow_other,export_delay=3600")
    assert m is not None, res.stderr
    try:
        os.chmod(m.path, 0o777)
        roots = m.path / "roots.bin"
        os.chmod(roots, 0o666)  # writable by anyone: still only root or its owner may act on it
        wait_for(lambda: "dirty" not in state(roots), 30, "the export of the chmod")
        assert roots.read_bytes() == b"r" * 1000
        theirs = m.path / "theirs.txt"

        def as_user(code: str) -> subprocess.CompletedProcess[str]:
            """Run ``code`` as uid 2000 with ``ask(path, op)``: one request through the control file, by hand."""
            ask = (
                "def ask(path, op):\n"
                f"    fd = os.open({str(m.path / '.lustrefs')!r}, os.O_RDWR)\n"
                "    os.write(fd, json.dumps({'op': op, 'ino': os.stat(path).st_ino}).encode() + b'\\n')\n"
                "    out = b''\n"
                "    while chunk := os.pread(fd, 65536, len(out)):\n"
                "        out += chunk\n"
                "    os.close(fd)\n"
                "    return json.loads(out)\n"
            )
            return subprocess.run(
                [SYSTEM_PYTHON, "-c", f"import json, os\n{ask}{code}"], user=2000, group=2000, capture_output=True,
                text=True, timeout=60,
            )  # fmt: skip

        for action in ("hsm_release", "hsm_archive", "hsm_restore"):
            res = as_user(f"print(json.dumps(ask({str(roots)!r}, {action!r})))")
            assert json.loads(res.stdout) == {
                "ok": False,
                "errno": errno.EPERM,
                "code": "AccessDenied",
                "message": f"only root or the owner may {action.removeprefix('hsm_')} this file",
            }, res.stderr
        assert state(roots) == flags(roots, ARCHIVED)  # nothing was released

        res = as_user(
            f"open({str(theirs)!r}, 'w').write('mine')\n"
            f"assert ask({str(theirs)!r}, 'hsm_archive') == {{'ok': True, 'value': None}}\n"
            f"print(json.dumps(ask({str(theirs)!r}, 'hsm_state')))"
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"ok": True, "value": {"flags": 9, "archive_id": 1}}  # the owner archived it
        assert body(s3, bucket, "exp/theirs.txt") == b"mine"
        assert hsm("hsm_release", roots) == (0, "", "")  # root may
        assert state(roots) == flags(roots, RELEASED)
    finally:
        m.cleanup()
        shutil.rmtree(top, ignore_errors=True)


def test_the_installed_command_prints_lfs_lines(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    m = mounter(f"s3://{bucket}")
    res = subprocess.run(
        [LUSTREFS, "hsm_state", str(m.path / "a.txt"), str(m.path / "missing")], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stdout == flags(m.path / "a.txt", RELEASED) + "\n"
    assert res.stderr == f"can't get hsm state for {m.path / 'missing'}: No such file or directory\n"
