"""Mount options (``-o a=b,c``): parsing, validation and the defaults taken from the file system record."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

GIB = 1024**3
MIB = 1024**2
DEFAULT_PART_MIB = 4  # parts of 4 MiB: a quarter of the files and index rows of 1 MiB parts, 15% faster cold reads

LOG_LEVELS = ("debug", "info", "warning", "error")


class OptionError(ValueError):
    """A mount option that is unknown or has a bad value; the message names it."""


@dataclass
class MountOptions:
    """What a mount was asked for. ``None`` means "take it from the file system record"."""

    cache_dirs: list[str] = field(default_factory=list)  # cache targets; empty = <fs dir>/cache
    cache_size_gib: float | None = None  # None = the file system's StorageCapacity
    uid: int = 0  # owner of objects that carry no POSIX metadata (FSx: root)
    gid: int = 0
    file_mode: int = 0o755  # permission bits of files without metadata (FSx: 0755)
    dir_mode: int = 0o755
    allow_other: bool = False
    ro: bool = False
    nodev: bool = False  # device nodes neither opened (the kernel) nor imported from S3 (always so unless root)
    endpoint_url: str | None = None  # None = the endpoint remembered at create time
    log_level: str = "info"
    posix_metadata: bool = True  # HEAD each object for x-amz-meta-file-* (off: listing attributes only)
    attr_timeout: float = 60.0  # seconds the kernel may cache attributes and entries
    # seconds the kernel may cache the absence of a name; None: 5, or 0 with the cluster engine (a name another
    # host creates is found at once)
    negative_timeout: float | None = None
    read_ahead_mib: int = 64  # largest read-ahead window of a sequential reader
    kernel_read_ahead_kib: int = 16384  # the kernel's read-ahead for this mount (root only; 0 leaves it alone)
    part_size_mib: int | None = None  # unit of fetching and caching (None: the cache's, else 4 MiB)
    max_connections: int = 16  # S3 connection budget of the whole mount
    poll_interval: float = 60.0  # seconds between two polls of S3 for the AutoImportPolicy
    export_delay: float = 3.0  # seconds a written file must be closed and idle before it is exported
    export_timeout: float = 60.0  # seconds an unmount waits for dirty data to be exported
    io_timeout: float = 30.0  # seconds one S3 request may take, retries included, before it fails with EIO
    sse_kms_key_id: str | None = None  # export with SSE-KMS and this key (default: the bucket's encryption)
    event_queue: str | None = None  # URL of an SQS queue receiving the buckets' S3 event notifications


def _int(name: str, value: str, base: int = 10, low: int = 0, high: int = 2**32 - 1) -> int:
    try:
        n = int(value, base)
    except ValueError:
        raise OptionError(f"mount option {name}={value!r}: not a number") from None
    if not low <= n <= high:
        raise OptionError(f"mount option {name}={value!r}: must be between {low} and {high}")
    return n


def _float(name: str, value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise OptionError(f"mount option {name}={value!r}: not a number") from None
    if not math.isfinite(f):
        raise OptionError(f"mount option {name}={value!r}: must be finite")
    if f <= 0:
        raise OptionError(f"mount option {name}={value!r}: must be positive")
    return f


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise OptionError(f"mount option {name}={value!r}: use on or off")


def parse_options(text: str | None) -> MountOptions:
    """Parse a comma-separated ``-o`` string. Raises OptionError naming the offending option."""
    opts = MountOptions()
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        if name in ("allow_other", "ro", "rw", "nodev", "dev") and not sep:
            if name in ("rw", "dev"):
                setattr(opts, "ro" if name == "rw" else "nodev", False)
            else:
                setattr(opts, name, True)
            continue
        if not sep:
            raise OptionError(f"unknown mount option {name!r}")
        if name == "cache_dir":
            opts.cache_dirs = [d for d in value.split(":") if d]
            if not opts.cache_dirs:
                raise OptionError("mount option cache_dir: give at least one directory")
        elif name == "cache_size":
            opts.cache_size_gib = _float(name, value)
        elif name in ("uid", "gid"):
            setattr(opts, name, _int(name, value))
        elif name in ("file_mode", "dir_mode"):
            setattr(opts, name, _int(name, value, base=8, high=0o7777))
        elif name == "endpoint_url":
            opts.endpoint_url = value
        elif name == "log_level":
            if value.lower() not in LOG_LEVELS:
                raise OptionError(f"mount option log_level={value!r}: one of {', '.join(LOG_LEVELS)}")
            opts.log_level = value.lower()
        elif name == "posix_metadata":
            opts.posix_metadata = _bool(name, value)
        elif name == "negative_timeout" and value.strip() in ("0", "0.0"):
            opts.negative_timeout = 0.0
        elif name in ("attr_timeout", "negative_timeout", "export_timeout", "io_timeout", "poll_interval"):
            setattr(opts, name, _float(name, value))
        elif name == "export_delay":
            opts.export_delay = _float(name, value) if value not in ("0", "0.0") else 0.0
        elif name == "sse_kms_key_id":
            opts.sse_kms_key_id = value
        elif name == "event_queue":
            if not value.startswith(("https://", "http://")):
                raise OptionError(f"mount option event_queue={value!r}: the URL of an SQS queue (https://...)")
            opts.event_queue = value
        elif name == "kernel_read_ahead":
            opts.kernel_read_ahead_kib = _int(name, value, high=1024 * 1024)
        elif name == "read_ahead":
            opts.read_ahead_mib = _int(name, value, low=1, high=1024)
        elif name == "part_size":
            opts.part_size_mib = _int(name, value, low=1, high=64)
        elif name == "max_connections":
            opts.max_connections = _int(name, value, low=1, high=256)
        else:
            raise OptionError(f"unknown mount option {name!r}")
    return opts


def to_string(opts: MountOptions) -> str:
    """The ``-o`` string that parses back to ``opts`` (used to hand options to the daemon process)."""
    defaults = MountOptions()
    out = []
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name == "cache_dirs":
            out.append("cache_dir=" + ":".join(value))
        elif f.name == "cache_size_gib":
            out.append(f"cache_size={value}")
        elif f.name in ("allow_other", "ro", "nodev"):
            out.append(f.name)
        elif f.name in ("file_mode", "dir_mode"):
            out.append(f"{f.name}={value:o}")
        elif f.name == "posix_metadata":
            out.append(f"posix_metadata={'on' if value else 'off'}")
        elif f.name in ("part_size_mib", "read_ahead_mib", "kernel_read_ahead_kib"):
            out.append(f"{f.name.removesuffix('_mib').removesuffix('_kib')}={value}")
        else:
            out.append(f"{f.name}={value}")
    return ",".join(out)
