"""Automatic import (AutoImportPolicy) through a real FUSE mount against moto's server on 127.0.0.1."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from helpers import MotoEndpoint, Mounted, run_cli, wait_for

pytestmark = pytest.mark.fuse
POLL = "poll_interval=0.2,export_delay=3600"


def cycles(m: Mounted) -> int:
    return m.stats()["import"]["cycles"]


def after_polls(m: Mounted, n: int = 3) -> None:
    """Wait until ``n`` more poll intervals have passed (each runs a full poll unless the policy is NONE)."""
    start = cycles(m)
    wait_for(lambda: cycles(m) >= start + n, 30, f"{n} polls")


def describe(fs_id: str) -> dict[str, Any]:
    rc, out, err = run_cli("describe-file-systems", "--file-system-ids", fs_id)
    assert rc == 0, err
    return json.loads(out)["FileSystems"][0]["LustreConfiguration"]["DataRepositoryConfiguration"]


@pytest.mark.parametrize("policy", ["NONE", "NEW", "NEW_CHANGED", "NEW_CHANGED_DELETED"])
def test_policies(policy: str, s3: Any, bucket: str, mounter: Any) -> None:
    put = s3.put_object
    for key, data in {
        "keep.txt": b"keep",
        "change.txt": b"version one",
        "gone.txt": b"gone",
        "old-name.txt": b"moving",
        "emptied/only.txt": b"1",
        "mixed/only.txt": b"2",
    }.items():
        put(Bucket=bucket, Key=key, Body=data)
    m = mounter(f"s3://{bucket}", options=POLL, AutoImportPolicy=policy, ExportPath=f"s3://{bucket}/exp")
    root = m.path
    assert len(os.listdir(root)) == 6  # loaded now: this is the listing NONE keeps
    assert os.listdir(root / "emptied") == ["only.txt"] and os.listdir(root / "mixed") == ["only.txt"]
    assert (root / "change.txt").read_bytes() == b"version one"
    (root / "mixed/local.txt").write_bytes(b"made here")  # a local file keeps its directory

    put(Bucket=bucket, Key="new.txt", Body=b"new")
    put(Bucket=bucket, Key="change.txt", Body=b"version two, longer")
    s3.delete_object(Bucket=bucket, Key="gone.txt")
    s3.copy_object(Bucket=bucket, Key="new-name.txt", CopySource={"Bucket": bucket, "Key": "old-name.txt"})
    s3.delete_object(Bucket=bucket, Key="old-name.txt")
    s3.delete_object(Bucket=bucket, Key="emptied/only.txt")
    s3.delete_object(Bucket=bucket, Key="mixed/only.txt")

    def state() -> tuple[set[str], set[str], bytes]:
        names = set(os.listdir(root)) - {"exp"}  # where mixed/local.txt is exported
        return names, set(os.listdir(root / "mixed")), (root / "change.txt").read_bytes()

    base = {"keep.txt", "change.txt", "mixed"}
    expected = {
        "NONE": (base | {"gone.txt", "old-name.txt", "emptied"}, {"only.txt", "local.txt"}, b"version one"),
        "NEW": (
            base | {"gone.txt", "old-name.txt", "emptied", "new.txt", "new-name.txt"},
            {"only.txt", "local.txt"},
            b"version one",
        ),
        "NEW_CHANGED": (
            base | {"gone.txt", "old-name.txt", "emptied", "new.txt", "new-name.txt"},
            {"only.txt", "local.txt"},
            b"version two, longer",
        ),
        "NEW_CHANGED_DELETED": (base | {"new.txt", "new-name.txt"}, {"local.txt"}, b"version two, longer"),
    }[policy]
    if policy == "NONE":
        after_polls(m)
        assert state() == expected
    else:
        wait_for(lambda: state() == expected, 30, f"{policy} to apply")
    if "new.txt" in expected[0]:
        assert (root / "new.txt").read_bytes() == b"new" and os.stat(root / "new-name.txt").st_size == 6
    if policy.startswith("NEW_CHANGED"):
        assert os.stat(root / "change.txt").st_size == len(b"version two, longer")
    if policy != "NEW_CHANGED_DELETED":
        assert (root / "keep.txt").read_bytes() == b"keep"


def test_an_open_file_keeps_its_version(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="v.txt", Body=b"old contents")
    m = mounter(f"s3://{bucket}", options=POLL, AutoImportPolicy="NEW_CHANGED")
    with open(m.path / "v.txt", "rb") as f:
        assert f.read() == b"old contents"
        s3.put_object(Bucket=bucket, Key="v.txt", Body=b"new contents!")
        wait_for(lambda: os.stat(m.path / "v.txt").st_size == 13, 30, "the re-import")
        f.seek(0)
        assert f.read() == b"old contents"  # pinned to the version it opened
    assert (m.path / "v.txt").read_bytes() == b"new contents!"  # the next open sees the new one


def test_local_changes_win_over_an_import(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="d/c.txt", Body=b"from s3")
    m = mounter(f"s3://{bucket}/d", options=POLL, AutoImportPolicy="NEW_CHANGED_DELETED", ExportPath=f"s3://{bucket}/d")
    (m.path / "d/c.txt").write_bytes(b"local edit")
    (m.path / "d/removed.txt").write_bytes(b"x")
    s3.put_object(Bucket=bucket, Key="d/c.txt", Body=b"someone else's edit")
    wait_for(lambda: any(e["code"] == "S3ImportConflictLocalChangesKept" for e in m.events()), 30, "the conflict")
    assert (m.path / "d/c.txt").read_bytes() == b"local edit"
    m.unmount()  # exported as usual: the local version reaches S3
    assert s3.get_object(Bucket=bucket, Key="d/c.txt")["Body"].read() == b"local edit"


def test_locally_removed_paths_are_not_brought_back(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    s3.put_object(Bucket=bucket, Key="b.txt", Body=b"b")
    m = mounter(f"s3://{bucket}", options=POLL, AutoImportPolicy="NEW_CHANGED", ExportPath=f"s3://{bucket}/exp")
    os.unlink(m.path / "a.txt")
    os.rename(m.path / "b.txt", m.path / "c.txt")
    after_polls(m)
    assert sorted(n for n in os.listdir(m.path) if n != "exp") == ["c.txt"]


def test_policy_update_applies_without_remount(moto: MotoEndpoint, s3: Any, bucket: str, mounter: Any) -> None:
    m = mounter(f"s3://{bucket}", options=POLL)  # AutoImportPolicy NONE by default
    assert os.listdir(m.path) == []
    s3.put_object(Bucket=bucket, Key="late.txt", Body=b"late")
    after_polls(m)
    assert os.listdir(m.path) == []
    rc, _, err = run_cli(
        "update-file-system", "--file-system-id", m.fs_id, "--lustre-configuration", "AutoImportPolicy=NEW"
    )
    assert rc == 0, err
    wait_for(lambda: os.listdir(m.path) == ["late.txt"], 30, "the new policy")


def test_unreadable_bucket_is_misconfigured_then_recovers(s3: Any, bucket: str, mounter: Any) -> None:
    s3.put_object(Bucket=bucket, Key="x.txt", Body=b"x")
    m = mounter(f"s3://{bucket}", options=POLL, AutoImportPolicy="NEW")
    assert (m.path / "x.txt").read_bytes() == b"x"
    assert describe(m.fs_id)["Lifecycle"] == "AVAILABLE"
    s3.delete_object(Bucket=bucket, Key="x.txt")
    s3.delete_bucket(Bucket=bucket)
    conf = wait_for(lambda: (d := describe(m.fs_id))["Lifecycle"] == "MISCONFIGURED" and d, 30, "MISCONFIGURED")
    assert bucket in conf["FailureDetails"]["Message"]
    assert (m.path / "x.txt").read_bytes() == b"x"  # the mount keeps serving what it has
    s3.create_bucket(Bucket=bucket)
    wait_for(lambda: describe(m.fs_id)["Lifecycle"] == "AVAILABLE", 30, "AVAILABLE again")
    assert "FailureDetails" not in describe(m.fs_id)


def test_a_poll_without_changes_only_lists(moto: MotoEndpoint, bucket: str, mounter: Any) -> None:
    for i in range(10_000):
        moto.backend.put_object(bucket, f"many/f{i:05d}", b"x")
    m = mounter(
        f"s3://{bucket}", options="poll_interval=0.2,posix_metadata=off", AutoImportPolicy="NEW_CHANGED_DELETED"
    )
    assert len(os.listdir(m.path / "many")) == 10_000
    before = m.stats()["requests"]
    after_polls(m, 3)  # at least two whole polls after `before`
    after = m.stats()["requests"]
    assert after["LIST"] >= before["LIST"] + 2 * 11  # the root and ten pages of "many/" per poll
    assert {k: after[k] - before[k] for k in after if k != "LIST"} == dict.fromkeys(after.keys() - {"LIST"}, 0)
