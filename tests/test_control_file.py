"""The control file ``.lustrefs`` and unsupported extended attributes, through a real FUSE mount against moto."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import MotoEndpoint, Mounted, create_fs, mount_fs, run_cli

from lustrefs.client import control_client
from lustrefs.constants import CONTROL_INODE
from lustrefs.daemon.control_channel import Caller

pytestmark = pytest.mark.fuse
MIB = 1024 * 1024
ARCHIVED = "(0x00000009) exists archived, archive_id:1"
SYSTEM_PYTHON = "/usr/bin/python3"  # runnable by any user, unlike a virtualenv under /root
NOBODY = 65534
TEAM = 4242  # a group that no one is in unless given it
NO_ENTRY = {"ok": False, "errno": errno.ENOENT, "code": None, "message": os.strerror(errno.ENOENT)}
# Run as another user: asks each (op, ino) of argv[2] on its own handle of the control file argv[1].
ASK_EACH = """
import json, os, sys
answers = []
for op, ino in json.loads(sys.argv[2]):
    fd = os.open(sys.argv[1], os.O_RDWR)
    os.write(fd, json.dumps({"op": op, "ino": ino}).encode() + b"\\n")
    out = b""
    while chunk := os.pread(fd, 65536, len(out)):
        out += chunk
    os.close(fd)
    answers.append(json.loads(out))
print(json.dumps(answers))
"""


def read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.pread(fd, 65536, len(out)):
        out += chunk
    return out


def ask(root: Path, *writes: bytes) -> dict[str, Any]:
    """Write ``writes`` in turn on one handle of the control file, then read the response from offset 0."""
    fd = os.open(root / ".lustrefs", os.O_RDWR)
    try:
        for data in writes:
            assert os.write(fd, data) == len(data)
        return json.loads(read_all(fd))
    finally:
        os.close(fd)


def request(op: str, ino: int, value: str | None = None) -> bytes:
    return json.dumps({"op": op, "ino": ino, "value": value}).encode() + b"\n"


def test_the_control_file_is_hidden_and_shadows_a_bucket_object(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key=".lustrefs", Body=b"from the bucket")
    s3.put_object(Bucket=bucket, Key=".lustrefs/inner.txt", Body=b"inner")
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    s3.put_object(Bucket=bucket, Key="sub/.lustrefs", Body=b"nested")  # only the root's name is reserved
    m = mounter(f"s3://{bucket}", options="export_delay=3600")
    control = m.path / ".lustrefs"

    st = os.stat(control)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert (st.st_ino, st.st_uid, st.st_gid, st.st_size) == (CONTROL_INODE, 0, 0, 0)
    assert sorted(os.listdir(m.path)) == ["a.txt", "sub"]
    assert os.listdir(m.path / "sub") == [".lustrefs"]
    assert (m.path / "sub/.lustrefs").read_bytes() == b"nested"
    assert json.loads(control.read_bytes())["value"]["file_system_id"] == m.fs_id  # read-only: the stats
    skipped = {e["key"] for e in m.events() if e["code"] == "S3ObjectPathNotPosixCompliant"}
    assert skipped == {".lustrefs", ".lustrefs/"}

    # The name is not the namespace's: no entry can take it, and the control file cannot be removed or changed.
    for change in (
        lambda: os.rename(m.path / "a.txt", control),
        lambda: os.rename(control, m.path / "b.txt"),
        lambda: os.unlink(control),
        lambda: os.chmod(control, 0o600),
        lambda: os.chown(control, 1000, 1000),
    ):
        with pytest.raises(PermissionError):
            change()
    with pytest.raises(FileExistsError):
        os.mkdir(control)
    with pytest.raises(FileExistsError):
        os.symlink("a.txt", control)
    (m.path / "sub/.lustrefs").rename(m.path / "sub/moved")  # elsewhere the name is an ordinary one
    assert os.stat(control).st_ino == CONTROL_INODE
    assert sorted(os.listdir(m.path)) == ["a.txt", "sub"]

    assert (m.path / "a.txt").read_bytes() == b"a"
    assert run_cli("hsm_state", str(m.path / "a.txt")) == (0, f"{m.path / 'a.txt'}: {ARCHIVED}\n", "")


def test_extended_attributes_are_not_supported_and_cost_one_request(s3: Any, bucket: str, mounter: Any) -> None:
    for i in range(50):
        s3.put_object(Bucket=bucket, Key=f"many/f{i:02d}.txt", Body=b"x")
    m = mounter(f"s3://{bucket}")
    files = [m.path / "many" / f"f{i:02d}.txt" for i in range(50)]

    res = subprocess.run(["ls", "-l", str(m.path / "many")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 51, res.stderr
    for path in [m.path, m.path / ".lustrefs", *files]:
        for name in ("security.selinux", "user.lustrefs.stats", "system.posix_acl_access"):
            with pytest.raises(OSError) as exc:
                os.getxattr(path, name)
            # The kernel answers ACLs itself (no ACL: ENODATA) once the daemon has no getxattr.
            assert exc.value.errno in ((errno.EOPNOTSUPP, errno.ENODATA) if "acl" in name else (errno.EOPNOTSUPP,))
    assert m.stats()["fuse"]["xattr_requests"] <= 1  # the first ENOSYS ended getxattr on the connection

    for path in files:
        for call, args in (
            (os.setxattr, (path, "user.x", b"1")),
            (os.listxattr, (path,)),
            (os.removexattr, (path, "user.x")),
        ):
            with pytest.raises(OSError) as exc:
                call(*args)
            assert exc.value.errno == errno.EOPNOTSUPP
    assert m.stats()["fuse"]["xattr_requests"] <= 4  # at most one of each kind


def test_malformed_requests_get_error_responses(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a" * 100)
    m = mounter(f"s3://{bucket}")
    a = m.path / "a.txt"
    ino = os.stat(a).st_ino

    def refused(response: dict[str, Any], err: int, code: str | None, message: str) -> bool:
        assert response == {"ok": False, "errno": err, "code": code, "message": response["message"]}
        assert message in response["message"], response["message"]
        return True

    assert refused(ask(m.path, b"not json\n"), errno.EINVAL, "BadRequest", "the request is not JSON")
    assert refused(ask(m.path, b'["stats"]\n'), errno.EINVAL, "BadRequest", "a request is a JSON object")
    assert refused(ask(m.path, b'{"op": "hsm_state"}\n'), errno.EINVAL, "BadRequest", "ino must be an inode")
    assert refused(ask(m.path, request("frobnicate", ino)), errno.ENOTSUP, "BadRequest", "unknown op 'frobnicate'")
    assert refused(ask(m.path, request("hsm_state", 10**12)), errno.ENOENT, None, "No such file or directory")
    assert refused(ask(m.path, request("stats", ino)), errno.ENOTSUP, "BadRequest", "asked of the root")
    assert refused(ask(m.path, request("task_cancel", 1)), errno.EINVAL, "BadRequest", "task_cancel needs a value")
    assert refused(ask(m.path), errno.EINVAL, "BadRequest", "no complete request was written")
    assert refused(ask(m.path, b'{"op": "hsm_state", '), errno.EINVAL, "BadRequest", "no complete request")

    # A request may come in pieces, without a newline; a handle serves one request after another.
    assert ask(m.path, b'{"op": "hsm_', b'state", "ino": ', str(ino).encode() + b"}")["value"]["flags"] == 0x0D
    fd = os.open(m.path / ".lustrefs", os.O_RDWR)
    try:
        os.write(fd, request("hsm_action", ino))
        assert json.loads(read_all(fd)) == {"ok": True, "value": {"action": "NOOP", "state": "", "bytes": 0}}
        os.write(fd, request("stats", 1))
        assert json.loads(read_all(fd))["value"]["file_system_id"] == m.fs_id
        written = os.pwrite(fd, b" " * 2 * MIB, 0)  # the kernel stops at the first piece refused
        assert written <= MIB
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b" " * MIB, written)  # past the largest request
        assert exc.value.errno == errno.EFBIG
    finally:
        os.close(fd)

    with pytest.raises(control_client.ControlError) as err:
        control_client.request(str(a), "frobnicate")
    assert (err.value.errno, err.value.code, err.value.message) == (
        errno.ENOTSUP,
        "BadRequest",
        "unknown op 'frobnicate'",
    )
    assert err.value.strerror == "BadRequest: unknown op 'frobnicate'"

    # The mount goes on serving.
    assert a.read_bytes() == b"a" * 100
    assert control_client.request(str(a), "hsm_state") == {"flags": 0x09, "archive_id": 1}
    assert m.stats()["file_system_id"] == m.fs_id


def test_stats_on_a_read_only_mount(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    m = mounter(f"s3://{bucket}", options="ro")
    assert (m.path / "a.txt").read_bytes() == b"a"
    rc, out, err = run_cli("stats", str(m.path), "--json")
    assert rc == 0, err
    assert json.loads(out)["file_system_id"] == m.fs_id  # a read-only handle: no write needed
    with pytest.raises(OSError) as exc:
        os.open(m.path / ".lustrefs", os.O_RDWR)
    assert exc.value.errno == errno.EROFS  # the other requests need a write, which the kernel refuses
    rc, _, err = run_cli("hsm_state", str(m.path / "a.txt"))
    assert (rc, err) == (1, f"can't get hsm state for {m.path / 'a.txt'}: Read-only file system\n")
    rc, _, err = run_cli("stats", str(m.path / "a.txt"))
    assert (rc, err) == (1, f"lustrefs stats: {m.path / 'a.txt'}: not the root of a lustrefs mount\n")


@pytest.fixture
def shared_mount(moto: MotoEndpoint, bucket: str, home: Path) -> Iterator[Mounted]:
    """A mount with ``allow_other`` on a mount point other users can reach (tmp_path is root's alone)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to act as another user")
    fs_id = create_fs(moto, f"s3://{bucket}")
    top = Path(tempfile.mkdtemp(prefix="lustrefs-control-"))
    os.chmod(top, 0o755)
    res, m = mount_fs(fs_id, top / "mnt", "allow_other,export_delay=3600")
    assert m is not None, res.stderr
    try:
        yield m
    finally:
        m.cleanup()
        shutil.rmtree(top, ignore_errors=True)


def ask_as(m: Mounted, groups: list[int], questions: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The responses to ``questions`` (op, ino) asked by uid NOBODY with supplementary ``groups``."""
    res = subprocess.run(
        [SYSTEM_PYTHON, "-c", ASK_EACH, str(m.path / ".lustrefs"), json.dumps(questions)], user=NOBODY,
        group=NOBODY, extra_groups=groups, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def make_file(path: Path, mode: int, uid: int = 0, gid: int = 0) -> int:
    path.write_bytes(b"x")
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return os.stat(path).st_ino


def make_dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> int:
    path.mkdir()
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return os.stat(path).st_ino


def test_a_user_is_answered_only_about_files_it_could_open(shared_mount: Mounted) -> None:
    root = shared_mount.path
    os.chmod(root, 0o755)
    make_dir(root / "public", 0o755)
    hidden = {
        "missing": 10**12,
        "secret": make_dir(root / "secret", 0o700),  # root's: no one else may search it
        "secret/file": make_file(root / "secret/file", 0o644),
        "team": make_dir(root / "team", 0o750, gid=TEAM),
        "team/file": make_file(root / "team/file", 0o640, gid=TEAM),
        # POSIX takes the owner's bits for the owner, even when the others' would allow more.
        "public/not_for_owner": make_file(root / "public/not_for_owner", 0o044, uid=NOBODY),
    }
    readable = make_file(root / "public/file", 0o644)
    not_for_team = make_file(root / "public/not_for_team", 0o404, gid=TEAM)  # the group's bits, for the group
    ops = ("hsm_state", "hsm_action", "hsm_archive", "hsm_release", "hsm_restore")

    # Whatever the op, an entry the user could not open answers as one that does not exist.
    answers = ask_as(shared_mount, [], [(op, ino) for ino in hidden.values() for op in ops])
    assert answers == [NO_ENTRY] * len(hidden) * len(ops)

    # One it could open is answered: state for anyone, actions for root and the owner only.
    answers = ask_as(shared_mount, [], [(op, ino) for ino in (readable, not_for_team) for op in ops])
    refused = [
        {
            "ok": False,
            "errno": errno.EPERM,
            "code": "AccessDenied",
            "message": f"only root or the owner may {verb} this file",
        }
        for verb in ("archive", "release", "restore")
    ]
    for state, action, *actions in (answers[:5], answers[5:]):
        assert state["ok"] and state["value"]["flags"] & 0x01 and action["ok"], (state, action)
        assert actions == refused

    # A supplementary group of the process that opened the handle counts, as the kernel counts it.
    team = [("hsm_state", hidden["team/file"]), ("hsm_state", not_for_team), ("hsm_state", hidden["secret/file"])]
    answers = ask_as(shared_mount, [TEAM], team)
    assert answers[0]["ok"] and answers[1:] == [NO_ENTRY, NO_ENTRY], answers


def test_the_caller_is_the_process_that_opened_the_handle() -> None:
    me = Caller.of(SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
    assert me == Caller(os.getuid(), os.getgid(), frozenset({os.getgid(), *os.getgroups()}))
    # The process is gone, or is no longer the one that asked: its primary group only.
    assert Caller.of(SimpleNamespace(uid=NOBODY, gid=NOBODY, pid=0)) == Caller(NOBODY, NOBODY, frozenset({NOBODY}))
    assert Caller.of(SimpleNamespace(uid=NOBODY, gid=TEAM, pid=os.getpid())) == Caller(NOBODY, TEAM, frozenset({TEAM}))


@pytest.mark.parametrize(
    ("caller", "mode", "allowed"),
    [
        (Caller(0, 0, frozenset({0})), 0o000, True),  # root may read and search anything
        (Caller(5, 6, frozenset({6})), 0o400, True),  # the owner: its bits
        (Caller(5, 6, frozenset({6})), 0o077, False),  # the owner: its bits only
        (Caller(7, 8, frozenset({8, 9})), 0o040, True),  # in the file's group (supplementary): the group's bits
        (Caller(7, 8, frozenset({8, 9})), 0o707, False),  # the group's bits only
        (Caller(7, 8, frozenset({8})), 0o004, True),  # anyone else: the others' bits
        (Caller(7, 8, frozenset({8})), 0o770, False),
    ],
)
def test_permission_classes_in_posix_order(caller: Caller, mode: int, allowed: bool) -> None:
    assert caller.may(os.R_OK, mode, 5, 9) is allowed
