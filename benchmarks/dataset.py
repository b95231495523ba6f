"""The data set: what the bucket holds, how it is written (S3 PUTs or s3rver's store on disk), local copies.

Bucket layout (every top-level folder has a ``folder/`` marker object, which s3rver needs to list a folder
that holds only sub-folders)::

    big/big.bin                 one big object (default 1 GiB)
    tree/d000/f000 … d099/f099  the tree: 100 directories × 100 files of 4 KiB
    wide/f0000 … f4999          one directory of 5,000 files of 4 KiB
    write/                      empty: each file system writes its big file here (deleted after each write case)
    million/d000/f000 …         (only with --million) many tiny objects, for the metadata memory case
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .endpoints import Endpoint

KIB = 1024
MIB = 1024**2
GIB = 1024**3
BLOCK = 8 * MIB  # generation and write unit of the big object
PART = 64 * MIB  # multipart part size of the big object
PUT_WORKERS = 16


@dataclass(frozen=True)
class Tree:
    """``dirs`` directories × ``per_dir`` files of ``size`` bytes under ``prefix`` (dirs=0: files directly)."""

    prefix: str
    dirs: int
    per_dir: int
    size: int

    @property
    def count(self) -> int:
        return max(self.dirs, 1) * self.per_dir

    @property
    def name(self) -> str:
        return self.prefix.strip("/")

    def relpaths(self) -> list[str]:
        """File paths relative to the tree's folder, in S3 key order."""
        fw = max(3, len(str(self.per_dir - 1)))
        if not self.dirs:
            return [f"f{f:0{fw}d}" for f in range(self.per_dir)]
        dw = max(3, len(str(self.dirs - 1)))
        return [f"d{d:0{dw}d}/f{f:0{fw}d}" for d in range(self.dirs) for f in range(self.per_dir)]

    def object_keys(self) -> list[str]:
        return [self.prefix + p for p in self.relpaths()]


@dataclass(frozen=True)
class DataSet:
    """The objects of one run; ``quick`` shrinks the trees (and the caller usually the big object)."""

    big_size: int = GIB
    tree: Tree = field(default_factory=lambda: Tree("tree/", 100, 100, 4 * KIB))
    wide: Tree = field(default_factory=lambda: Tree("wide/", 0, 5000, 4 * KIB))
    bucket: str = "lustrefs-bench"
    big_key: str = "big/big.bin"
    write_size: int = 256 * MIB  # the write case's file
    write_prefix: str = "write/"

    @classmethod
    def make(cls, big_size: int, quick: bool) -> DataSet:
        if quick:
            return cls(big_size, Tree("tree/", 10, 100, 4 * KIB), Tree("wide/", 0, 500, 4 * KIB), write_size=32 * MIB)
        return cls(big_size)

    def describe(self) -> str:
        t, w = self.tree, self.wide
        return (
            f"s3://{self.bucket}: {self.big_key} {fmt_size(self.big_size)}; {t.prefix} {t.dirs} dirs × {t.per_dir}"
            f" files of {fmt_size(t.size)}; {w.prefix} {w.count} files of {fmt_size(w.size)}; files of"
            f" {fmt_size(self.write_size)} written into {self.write_prefix}"
        )


def million_tree(count: int) -> Tree:
    """``count`` tiny objects in directories of 1,000 (the --million case)."""
    per_dir = min(count, 1000)
    return Tree("million/", -(-count // per_dir), per_dir, 16)


def fmt_size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    """``64MiB``, ``1GiB``, ``512M``, ``4096`` → bytes (binary units)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = {"k": KIB, "m": MIB, "g": GIB}.get(t[-1:], 1)
    return int(float(t.rstrip("kmg")) * scale)


def random_blocks(size: int) -> Iterator[bytes]:
    """``size`` random bytes in blocks of BLOCK (incompressible, never all in memory)."""
    left = size
    while left > 0:
        n = min(BLOCK, left)
        yield os.urandom(n)
        left -= n


# ------------------------------------------------------------------------------------------------ writers


class Writer(Protocol):
    """Puts objects into the bucket."""

    method: str

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        """Write ``(key, size)`` objects of random content (size 0 for folder markers)."""

    def put_big(self, key: str, size: int) -> None:
        """Write one big object of random content."""


class ApiWriter:
    """S3 PUTs with PUT_WORKERS in flight; the big object as a multipart upload of PART-sized parts."""

    method = "S3 PUTs, 16 in flight (big object: multipart upload)"

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        def put(item: tuple[str, int]) -> None:
            self.client.put_object(Bucket=self.bucket, Key=item[0], Body=os.urandom(item[1]))

        with ThreadPoolExecutor(PUT_WORKERS) as pool:
            for _ in pool.map(put, items):
                pass

    def put_big(self, key: str, size: int) -> None:
        if size <= PART:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"".join(random_blocks(size)))
            return
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

        def part(number: int) -> dict[str, Any]:
            body = b"".join(random_blocks(min(PART, size - (number - 1) * PART)))
            resp = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": resp["ETag"]}

        with ThreadPoolExecutor(4) as pool:
            parts = list(pool.map(part, range(1, -(-size // PART) + 1)))
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )


class S3rverDiskWriter:
    """Writes objects straight into s3rver's store: ``<bucket>/<dirs>/<name>._S3rver_object`` plus ``.md5``.

    This is s3rver 3.x's own layout (``lib/stores/filesystem.js``): the ETag is the ``.md5`` file's content,
    Last-Modified the object file's mtime; ``._S3rver_metadata.json`` holds the Content-Type and is optional
    (left out for tiny objects: one file fewer per object, s3rver then reports binary/octet-stream).
    """

    method = "files written into s3rver's on-disk store"

    def __init__(self, data_dir: Path, bucket: str) -> None:
        self.root = data_dir / bucket
        self.metadata_files = True

    def _path(self, key: str) -> Path:
        *dirs, name = key.split("/")
        return self.root.joinpath(*dirs, f"{name}._S3rver_object")

    def _write(self, key: str, blocks: Iterable[bytes]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5()
        with open(path, "wb") as f:
            for block in blocks:
                md5.update(block)
                f.write(block)
        Path(f"{path}.md5").write_text(md5.hexdigest())
        if self.metadata_files:
            meta = path.with_name(path.name.removesuffix("object") + "metadata.json")
            meta.write_text(json.dumps({"content-type": "application/octet-stream"}))

    def put_many(self, items: Iterable[tuple[str, int]]) -> None:
        for key, size in items:
            self._write(key, [os.urandom(size)])

    def put_big(self, key: str, size: int) -> None:
        self._write(key, random_blocks(size))


def writer_for(endpoint: Endpoint, bucket: str, direct: bool) -> Writer:
    """With ``direct``, the disk writer for an s3rver we started; else (and for other endpoints) S3 PUTs."""
    if endpoint.data_dir is not None and direct:
        return S3rverDiskWriter(endpoint.data_dir, bucket)
    return ApiWriter(endpoint.client(pool=PUT_WORKERS + 4), bucket)


def create_bucket(endpoint: Endpoint, bucket: str) -> None:
    client = endpoint.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=bucket)


def _write_tree(writer: Writer, tree: Tree) -> None:
    writer.put_many([(tree.prefix, 0)])  # the folder marker
    writer.put_many((k, tree.size) for k in tree.object_keys())


def populate(ds: DataSet, endpoint: Endpoint, method: str) -> tuple[float, str]:
    """Create the bucket and write the data set, with S3 PUTs as a user would unless ``method`` is ``disk``;
    returns (seconds, how it was written)."""
    start = time.perf_counter()
    create_bucket(endpoint, ds.bucket)
    writer = writer_for(endpoint, ds.bucket, direct=method == "disk")
    writer.put_many([(ds.big_key.split("/")[0] + "/", 0), (ds.write_prefix, 0)])
    for tree in (ds.tree, ds.wide):
        _write_tree(writer, tree)
    writer.put_big(ds.big_key, ds.big_size)
    return time.perf_counter() - start, writer.method


def populate_tree(tree: Tree, endpoint: Endpoint, bucket: str, method: str) -> tuple[float, str]:
    """Write one tree of tiny objects (and its folder marker), creating the bucket if needed, into s3rver's store
    directly unless ``method`` is ``api`` (a million PUTs take about an hour); returns (seconds, how)."""
    start = time.perf_counter()
    create_bucket(endpoint, bucket)
    writer = writer_for(endpoint, bucket, direct=method != "api")
    if isinstance(writer, S3rverDiskWriter):
        writer.metadata_files = False
    _write_tree(writer, tree)
    return time.perf_counter() - start, writer.method


# -------------------------------------------------------------------------------------------- local copies


def local_copy(ds: DataSet, root: Path) -> tuple[Path, Path]:
    """A local big file and a local copy of the tree under ``root``; returns (big file, tree folder)."""
    root.mkdir(parents=True, exist_ok=True)
    big = root / "big.bin"
    with open(big, "wb") as f:
        for block in random_blocks(ds.big_size):
            f.write(block)
        os.fsync(f.fileno())
    tree_dir = root / ds.tree.name
    for rel in ds.tree.relpaths():
        path = tree_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(ds.tree.size))
    os.sync()
    return big, tree_dir
