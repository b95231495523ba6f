"""Export: writing new and changed entries back to the export prefix, and deleting removed ones.

The exporter drives each entry through the state machine of lustrefs.store.exports (dirty -> uploading -> new key
recorded -> old key deleted -> clean), which is the only writer of the export state. An entry is dirty in
SQLite from the local change until its export is recorded, so nothing is lost to a crash: at start-up every
dirty entry is exported again, and every key an interrupted request may have written (its intent) has its
multipart uploads aborted and is deleted unless the tree names it. Content changes are exported once the file
is closed and has been idle for ``delay`` seconds (a file of several parts is uploaded from its close on, and its
upload completes only then); metadata changes and renames at once. A failed export is
logged in the event log and retried with backoff; the file stays dirty (and in the cache) meanwhile.

One request per key at a time: an export waits while its key is being written or deleted. Before an object is
overwritten or deleted, any other entry that still reads its clean data from it (a renamed entry not exported
yet, an unlinked file still open) gets that data copied into its local parts.
"""

from __future__ import annotations

import logging
import math
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from lustrefs.constants import ROOT_INODE
from lustrefs.data.cache import Cache, FileData, ObjectVersion, first_error
from lustrefs.errors import NoEntry
from lustrefs.events import EventLog
from lustrefs.metadata import to_user_metadata
from lustrefs.s3.repository import MAX_DELETE_BATCH, AccessDenied, NotFound, ObjectStore, RepositoryError
from lustrefs.s3.routing import OUTSIDE
from lustrefs.store import db
from lustrefs.store.exports import DATA, ORPHAN
from lustrefs.store.inodes import Inode
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024
MAX_FILE_SIZE = 5 * 1024**4
MAX_COPY_SIZE = 5 * 1024**3  # larger objects cannot be copied by one CopyObject
EVENTS = ("NEW", "CHANGED", "DELETED")
MAX_BACKOFF = 60.0  # seconds between retries of an entry whose export keeps failing
FLUSH_RETRY = 1.0  # at unmount, failed entries are retried at least this often
DELETE_BACKOFF = 5.0  # seconds deletions pause after one failed
KEY_WAIT = 60.0  # seconds an export waits for its key to be free (requests are bounded by io_timeout)


STAGING_GRACE = 600.0  # seconds after which a staging upload's intent is another host's crash, recovered
STAGING_SCAN = 60.0  # seconds between the leader's looks for such intents
LEADER_WAIT = 120.0  # seconds an explicit export on a cluster host waits for the leader's
LEADER_POLL = 0.05  # seconds between looks at the rows meanwhile


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure: 2, 4, 8, … up to MAX_BACKOFF."""
    return min(2.0 ** min(failures, 16), MAX_BACKOFF)


@dataclass(frozen=True)
class ExportTarget:
    """Where paths go: ``base + path`` (``base`` is '' when the export prefix is the import prefix)."""

    base: str

    @classmethod
    def of(cls, import_prefix: str, export_prefix: str) -> ExportTarget:
        export = export_prefix.rstrip("/")
        if export in ("", import_prefix.rstrip("/")):
            return cls("")
        return cls(export + "/")

    def key(self, path: str, is_dir: bool) -> str:
        return self.base + path + ("/" if is_dir else "")


@dataclass
class _State:
    due: dict[int, float] = field(default_factory=dict)  # ino -> monotonic time it may be exported
    running: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)  # ino -> consecutive failures (backoff)
    errors: dict[int, str] = field(default_factory=dict)  # ino -> last error, for the unmount report
    given_up: dict[int, int] = field(default_factory=dict)  # ino -> data_gen it cannot be exported at
    writers: dict[int, int] = field(default_factory=dict)  # ino -> handles open for writing
    busy: dict[str, trio.Event] = field(default_factory=dict)  # key -> set when its request (or recovery) ends
    # intents whose multipart uploads may still be open (left by an earlier run, or an abort that failed), not
    # recovered yet: busy meanwhile
    stale: set[str] = field(default_factory=set)
    release_at: dict[int, float] = field(default_factory=dict)  # ino -> monotonic time its upload may complete
    requested: set[int] = field(default_factory=set)  # cluster leader: explicit exports other hosts asked for


@dataclass(frozen=True)
class Failure:
    """Why an explicit export did not make an entry clean: FSx's error code and a message."""

    code: str
    message: str


class Writeback:
    """The exporter: one trio task scheduling exports, a few running at once.

    Longer than the other classes on purpose: scheduling, the export of an entry, deletions and the recovery of
    intents are one state machine over one set of key locks (``_State.busy``) and one rule (``_protect``); split
    apart, each piece would need the others' state.
    """

    def __init__(
        self,
        ns: Namespace,
        cache: Cache,
        repo: ObjectStore,
        events: EventLog,
        target: ExportTarget,
        policy: Callable[[str], frozenset[str] | None] = lambda key: frozenset(EVENTS),
        delay: float = 3.0,
        upload_part: int = 8 * 1024 * 1024,
        parallel_files: int = 4,
        staging_prefix: str | None = None,
        leads: Callable[[], bool] = lambda: True,
        ask_leader: Callable[[int], None] = lambda ino: None,
    ) -> None:
        self.ns = ns
        self.host = ns.host
        self.staging_prefix = staging_prefix  # cluster engine: where closed files' data waits for its export
        self.leads = leads  # whether this host runs the exports (always, embedded)
        self.ask_leader = ask_leader  # cluster engine: ask the leader for an explicit export of a name
        self.ledger = ns.exports
        self.cache = cache
        self.repo = repo
        self.events = events
        self.target = target
        self.policy = policy
        self.delay = delay
        self.upload_part = upload_part
        self.s = _State()
        self._wake = trio.Event()
        self._finished = trio.Event()  # set (and replaced) whenever an export ends
        self._files = trio.CapacityLimiter(parallel_files)
        self._delete_backoff = 0.0
        self._next_scan = 0.0  # when the leader looks for stale staging intents again
        self._unmounting = trio.Event()  # set by flush: uploads held back until their export is due complete now

    # ----------------------------------------------------------------------------------------- scheduling

    def schedule(self, ino: int, delay: float) -> None:
        """``ino`` changed: export it after ``delay`` seconds (inf: when its writers close it). 0 wakes only."""
        if ino:
            at = time.monotonic() + delay if ino not in self.s.writers else math.inf
            self.s.due[ino] = min(self.s.due.get(ino, math.inf), at) if delay == 0 else at
        self._wake.set()

    def opened_for_write(self, ino: int) -> None:
        self.s.writers[ino] = self.s.writers.get(ino, 0) + 1

    def closed_for_write(self, ino: int) -> None:
        left = self.s.writers.get(ino, 0) - 1
        if left > 0:
            self.s.writers[ino] = left
            return
        self.s.writers.pop(ino, None)
        early = self._uploads_early(ino)
        for name in self.ns.names(ino):
            if early:  # its parts go out now; the object appears (the upload completes) after the delay
                self.s.release_at[name] = time.monotonic() + self.delay
            self.schedule(name, 0 if early else self.delay)  # export() returns at once if nothing is dirty

    def _uploads_early(self, ino: int) -> bool:
        """Whether a file just closed is uploaded from now on rather than after ``delay``: a multipart upload
        (larger than one part) of new data, held before its completion until the delay has passed."""
        row = self.ns.find(ino)
        return (
            self.delay > 0
            and row is not None
            and stat.S_ISREG(row.mode)
            and bool(row.dirty & DATA)
            and row.size > self.upload_part
        )

    def queue_length(self) -> int:
        return len(self.s.due) + len(self.s.running)

    def is_running(self, ino: int) -> bool:
        return ino in self.s.running

    def is_waiting(self, ino: int) -> bool:
        """Whether ``ino`` is queued for an (automatic) export."""
        return ino in self.s.due

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export what is due until cancelled; at start, everything left dirty or in flight by a previous run."""
        for ino, _ in self.ledger.dirty_inodes(self.host):
            self.s.due[ino] = time.monotonic()
        self._adopt_intents(first=True)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._adopt_intents()
                await self._recover_intents()
                await self._delete_pending()
                now = time.monotonic()
                for ino in [i for i, t in self.s.due.items() if t <= now and i not in self.s.running]:
                    del self.s.due[ino]
                    self.s.running.add(ino)
                    nursery.start_soon(self._export_one, ino)
                while self.s.requested:
                    nursery.start_soon(self.export_now, self.s.requested.pop())
                wait = min(self.s.due.values(), default=math.inf) - now
                if self.staging_prefix is not None:
                    wait = min(wait, self._next_scan - now)
                if self.s.stale or self.ledger.any_pending_delete():
                    wait = min(wait, max(self._delete_backoff - now, 0.05))
                with trio.move_on_after(max(wait, 0.0) if wait != math.inf else math.inf):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def flush(self, timeout: float) -> list[tuple[str, str]]:
        """Export everything dirty now (at unmount); returns (path, reason) of what is still not exported.

        Entries refused by the policy or the limits are neither waited for nor returned.
        """
        deadline = time.monotonic() + timeout
        last_report = 0.0
        self.s.writers.clear()
        self._unmounting.set()
        while (now := time.monotonic()) < deadline:
            waiting = self._left()
            if not waiting:
                break
            for ino in waiting:  # due now, or within FLUSH_RETRY if backing off from a failure
                if ino and ino not in self.s.running:
                    self.s.due[ino] = min(self.s.due.get(ino, now), now + FLUSH_RETRY)
            self._delete_backoff = min(self._delete_backoff, now + FLUSH_RETRY)
            self._wake.set()
            if now - last_report > 5:
                log.info("unmount: %d entries still to export", len(waiting))
                last_report = now
            await trio.sleep(min(0.05, max(deadline - now, 0)))
        return [(self._path(ino), self.s.errors.get(ino, "not exported in time")) for ino in self._left()]

    def _left(self) -> list[int]:
        """Dirty entries not refused at their current version (0 stands for deletions still to do)."""
        left = [ino for ino, gen in self.ledger.dirty_inodes(self.host) if self.s.given_up.get(ino) != gen]
        if self.s.stale or self.ledger.any_pending_delete():
            left.append(0)
        return left

    def _path(self, ino: int) -> str:
        if ino == 0:
            return "(pending deletions)"
        try:
            return "/" + self.ns.path_key(ino)
        except NoEntry:
            return f"(inode {ino})"

    # ----------------------------------------------------------------------------------------- exporting

    async def _export_one(self, ino: int) -> None:
        try:
            async with self._files:
                await self.export(ino)
            self.s.failures.pop(ino, None)
            if self.s.given_up.get(ino) is None:
                self.s.errors.pop(ino, None)
        except (RepositoryError, OSError, BaseExceptionGroup) as exc:
            err = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
            n = self.s.failures[ino] = self.s.failures.get(ino, 0) + 1
            code = "S3ExportAccessDenied" if isinstance(err, AccessDenied) else "S3ExportFailed"
            self.s.errors[ino] = f"{code}: {err}"
            path = self._path(ino)
            self.events.emit("ERROR", code, f"Export of {path} failed (attempt {n}): {err}", path=path)
            self.s.due.setdefault(ino, time.monotonic() + backoff(n))
        except NoEntry:
            pass  # purged before its export started: no request was sent
        except Exception as exc:
            log.exception("export of inode %d failed", ino)
            self.s.errors[ino] = f"InternalError: {exc}"
            self.s.due.setdefault(ino, time.monotonic() + MAX_BACKOFF)
        finally:
            self.s.running.discard(ino)
            self.s.release_at.pop(ino, None)
            self._one_finished()

    async def stage(self, ino: int) -> None:
        """Cluster engine, at a close or fsync: put the data of file ``ino`` that only this host's cache holds
        into shared storage (a staging object), so that a host opening it next reads it; its export then copies
        that object to its key. A file changed during the upload stays held (the next close stages it)."""
        row = self.ns.find(ino)
        if self.staging_prefix is None or row is None or row.holder != self.host or row.is_orphan:
            return
        gen = row.data_gen
        if not stat.S_ISREG(row.mode) or not row.dirty & DATA:
            with db.transaction(self.ns.conn):
                self.ledger.staged(ino, None, gen)
            return
        key = f"{self.staging_prefix}{ino}-{gen}-{secrets.token_hex(4)}"
        source = ObjectVersion(ino, row.key, row.etag, row.src_limit) if row.etag else None
        data = FileData(ino, row.size, source, True)

        def unchanged() -> bool:
            current = self.ns.find(ino)
            return current is not None and current.data_gen == gen

        with db.transaction(self.ns.conn):
            self.ledger.begin(ino, key)
        etag, done = None, False
        try:
            etag = await self._put_data(ino, key, data, {}, False, unchanged)
        finally:
            with db.transaction(self.ns.conn):
                if etag is not None and unchanged():
                    self.ledger.staged(ino, (key, etag, row.size), gen, source.key if self._staging(source) else None)
                    done = True
                elif key not in self.s.stale:  # failed, or changed meanwhile: the object is deleted
                    self.ledger.abandon(key)  # (an upload that could not be aborted: its intent stays)
        if done:
            self.cache.adopt(ino, source, ObjectVersion(ino, key, etag, row.size))
            for name in self.ns.names(ino):
                self.schedule(name, self.delay)
        self._wake.set()

    @property
    def stages(self) -> bool:
        """Whether closes put data in shared storage (the cluster engine)."""
        return self.staging_prefix is not None

    def _staging(self, source: ObjectVersion | None) -> bool:
        """Whether ``source`` is a staging object (cluster engine)."""
        return source is not None and self._staging_key(source.key)

    def _staging_key(self, key: str) -> bool:
        """Whether ``key`` is in this file system's staging area (cluster engine)."""
        return self.staging_prefix is not None and key.startswith(self.staging_prefix)

    async def stage_held(self) -> list[tuple[str, str]]:
        """Stage every file this host holds (at unmount); returns (path, reason) of those that failed."""
        left = []
        for ino in self.ns.inodes.held(self.host) if self.host is not None else []:
            try:
                await self.stage(ino)
            except (RepositoryError, OSError) as exc:
                left.append((self._path(ino), f"not staged: {exc}"))
        return left

    def request(self, ino: int) -> None:
        """Cluster leader: another host asks for the explicit export of name ``ino`` (its HSM command or task)."""
        self.s.requested.add(ino)
        self._wake.set()

    async def export_now(self, ino: int, attempts: int = 5) -> Failure | None:
        """Export inode ``ino`` now under each of its names (a name's row: that name), whatever the policy
        (hsm_archive, export tasks); None once they are clean. A cluster host that does not lead stages the file
        and has the leader export it."""
        row = self.ns.find(ino)
        if row is not None and row.node in self.s.writers:
            return Failure("ResourceBusy", "the file is open for writing; it is exported once it is closed")
        if not self.leads():
            return await self._export_by_leader(ino)
        for name in self.ns.names(ino):
            if failure := await self._export_name_now(name, attempts):
                return failure
        return None

    async def deletions_done(self, prefix: str) -> bool:
        """Whether no deletion is queued under key ``prefix`` any more (if some are, the exporter is woken and
        given a moment)."""
        if not any(key.startswith(prefix) for key in self.ledger.pending_deletes()):
            return True
        self._wake.set()
        await trio.sleep(LEADER_POLL)
        return False

    async def _export_by_leader(self, ino: int) -> Failure | None:
        """Stage ``ino`` if this host holds its data, ask the leader to export each of its names, and wait until
        they are clean (at most LEADER_WAIT seconds)."""
        await self.stage(ino)
        names = self.ns.names(ino)
        for name in names:
            self.ask_leader(name)
        with trio.move_on_after(LEADER_WAIT):
            while any((r := self.ns.find(name)) is not None and r.dirty and not r.is_orphan for name in names):
                await trio.sleep(LEADER_POLL)
            return None
        return Failure("ResourceBusy", f"the cluster's leader did not export it within {LEADER_WAIT:.0f} s")

    async def _export_name_now(self, ino: int, attempts: int) -> Failure | None:
        for _ in range(attempts):
            try:
                row = self.ns.get(ino)
            except NoEntry:
                return None  # deleted meanwhile: nothing left to export
            if row.dirty == 0 or row.parent == ORPHAN:
                return None
            if ino in self.s.running:
                await self._wait_idle(ino)
                continue
            self.s.running.add(ino)  # keeps the exporter's own scheduling off this entry meanwhile
            try:
                await self.export(ino, explicit=True)
            except NoEntry:
                return None
            except RepositoryError as exc:
                return Failure(exc.code, str(exc))
            except OSError as exc:
                return Failure("InternalError", str(exc))
            except BaseExceptionGroup as group:
                err = first_error(group)
                return Failure(getattr(err, "code", "InternalError"), str(err))
            finally:
                self.s.running.discard(ino)
                self._one_finished()  # the exporter may have skipped this entry meanwhile
            row = self.ns.get(ino)
            if row.dirty == 0 or row.parent == ORPHAN:
                return None
            if self.s.given_up.get(ino) == row.data_gen:
                code, _, message = self.s.errors.get(ino, "InternalError: not exported").partition(": ")
                return Failure(code, message)
        return Failure("ResourceBusy", "the file kept changing during the export")

    async def _wait_idle(self, ino: int) -> None:
        """Wait until no export of ``ino`` runs (each export's requests are bounded)."""
        while ino in self.s.running:
            await self._finished.wait()

    def _one_finished(self) -> None:
        self._finished.set()
        self._finished = trio.Event()
        self._wake.set()

    async def export(self, ino: int, explicit: bool = False) -> None:
        """Export one entry now (its content, metadata and name) if it is dirty.

        ``explicit`` (hsm_archive, export tasks): the AutoExportPolicy does not apply, and a refusal is retried.
        """
        while True:
            row = self.ns.get(ino)
            if row.dirty == 0 or row.parent == ORPHAN:
                return
            if not explicit and self.s.due.get(ino, 0.0) > time.monotonic():
                return  # due again later since this export was started (closed meanwhile: the delay counts anew)
            if ino == ROOT_INODE:
                with db.transaction(self.ns.conn):
                    self.ledger.mark_clean(ino)
                return
            if row.node in self.s.writers:
                self.s.due[ino] = math.inf  # exported when closed
                return
            node = row if row.link_of is None else self.ns.get(row.link_of)  # a hard link's data and attributes
            if node.holder not in (None, self.host):
                return  # its data is in another host's cache: that host's close stages it (a change follows)
            is_dir = stat.S_ISDIR(row.mode)
            desired = self.target.key(self.ns.path_key(ino), is_dir)
            if self.s.given_up.get(ino) == row.data_gen and not explicit:
                return
            if problem := self._refusal(node.size, desired, row.exported_key, explicit):
                code, message = problem
                self.s.given_up[ino] = row.data_gen
                self.s.errors[ino] = f"{code}: {message}"
                level = "WARN" if code == OUTSIDE else "ERROR"
                self.events.emit(level, code, message, path="/" + desired[len(self.target.base) :])
                return
            if desired in self.s.busy:
                with trio.move_on_after(KEY_WAIT):
                    await self.s.busy[desired].wait()
                    continue  # the entry may have changed meanwhile: decide again
                self.s.due.setdefault(ino, time.monotonic() + DELETE_BACKOFF)  # a recovery backing off: later
                return
            if await self._protect(desired, ino):
                continue  # data was copied to local parts meanwhile: decide again
            break
        await self._upload(ino, row.data_gen, node, desired, hold=not explicit)

    async def _upload(self, ino: int, gen: int, r: Inode, desired: str, hold: bool) -> None:
        """Write the object of name ``ino`` (at ``data_gen`` ``gen``) at ``desired`` (the key is free) from the
        data and attributes of inode ``r``, and record the outcome. ``hold``: a multipart upload completes no
        sooner than the name's ``release_at``."""
        is_dir, is_link, is_file = stat.S_ISDIR(r.mode), stat.S_ISLNK(r.mode), stat.S_ISREG(r.mode)
        meta = to_user_metadata(r.mode, r.uid, r.gid, r.mtime_ns, r.atime_ns, r.rdev)
        source = ObjectVersion(r.ino, r.key, r.etag, r.src_limit) if r.etag else None
        done = self.s.busy[desired] = trio.Event()
        etag: str | None = None
        try:
            with db.transaction(self.ns.conn):
                self.ledger.begin(ino, desired)
            if is_dir or not (is_link or is_file):  # directories, FIFOs, sockets, devices: zero-length objects
                etag = await self.repo.put(desired, b"", meta)
            elif is_link:
                body = (await self.ns.readlink(r.ino)).encode("utf-8", "surrogateescape")
                etag = await self.repo.put(desired, body, meta)
            elif not r.dirty & DATA and source is not None and source.size == r.size <= MAX_COPY_SIZE:
                etag, source = await self._copy(r.ino, source, desired, meta)  # unchanged data: server-side
            else:
                data = FileData(r.ino, r.size, source, bool(r.dirty & DATA))
                etag = await self._put_data(ino, desired, data, meta, hold, lambda: self._still(ino, gen, desired))
        finally:
            if etag is None and desired not in self.s.stale:  # failed, or superseded while held back
                with db.transaction(self.ns.conn):
                    self.ledger.abandon(desired)  # the object may exist: deleted unless the tree names it
            del self.s.busy[desired]
            if desired in self.s.stale:  # its upload could not be aborted: the intent stays, recovered later
                self.s.busy[desired] = trio.Event()
            done.set()
        if etag is None:  # the entry changed, moved or was reopened meanwhile: decide again
            self.s.due.setdefault(ino, time.monotonic())
            return
        self._exported(ino, gen, desired, etag, source, r.size, not is_file)

    async def _put_data(
        self, ino: int, key: str, data: FileData, meta: dict[str, str], hold: bool, still: Callable[[], bool]
    ) -> str | None:
        """Write a file's ``data`` to ``key``: one PUT, or a multipart upload beyond one part."""
        if data.size <= self.upload_part:
            return await self.repo.put(key, await self.cache.read_bytes(data, 0, data.size), meta)
        return await self._multipart(ino, key, data, meta, hold, still)

    async def _multipart(
        self, ino: int, key: str, data: FileData, meta: dict[str, str], hold: bool, still: Callable[[], bool]
    ) -> str | None:
        """Upload ``data`` to ``key`` in parts (several in flight), then complete the upload once the name's
        export is due (``release_at``: the parts go out from the close on, the object appears after the delay).
        Returns the new ETag, or None if ``still`` says the entry changed, moved or was reopened for writing
        meanwhile: the upload is then aborted and never completed, as on any failure."""
        upload_id = await self.repo.start_upload(key, meta)
        etag = None
        try:
            etags: dict[int, str] = {}
            async with trio.open_nursery() as nursery:
                for number, off in enumerate(range(0, data.size, self.upload_part), start=1):
                    await self.repo.upload_slots.acquire()  # bounds the parts (and their memory) in flight
                    nursery.start_soon(self._upload_part, key, upload_id, number, data, off, etags)
            if hold:
                with trio.move_on_at(trio.current_time() + self.s.release_at.get(ino, 0.0) - time.monotonic()):
                    await self._unmounting.wait()
            if still():
                etag = await self.repo.complete_upload(key, upload_id, etags)
        finally:
            if etag is None:
                with trio.CancelScope(shield=True):
                    try:
                        await self.repo.abort_upload(key, upload_id)
                    except RepositoryError as exc:  # aborted again by the recovery of intents (or the next start)
                        log.warning("could not abort the upload to %s: %s", key, exc)
                        self.s.stale.add(key)
        return etag

    async def _upload_part(
        self, key: str, upload_id: str, number: int, data: FileData, off: int, etags: dict[int, str]
    ) -> None:
        try:
            body = await self.cache.read_bytes(data, off, min(self.upload_part, data.size - off))
            etags[number] = await self.repo.upload_part(key, upload_id, number, body)
        finally:
            self.repo.upload_slots.release()

    def _still(self, ino: int, gen: int, key: str) -> bool:
        """Whether name ``ino`` is still at ``data_gen`` ``gen``, maps to ``key`` and is not open for writing."""
        row = self.ns.find(ino)
        return (
            row is not None
            and row.parent != ORPHAN
            and row.data_gen == gen
            and row.node not in self.s.writers
            and self._key_of(row) == key
        )

    async def _copy(
        self, ino: int, source: ObjectVersion, desired: str, meta: dict[str, str]
    ) -> tuple[str, ObjectVersion]:
        """CopyObject of the entry's data to ``desired``; returns the new ETag and the source it came from.

        A source object that is gone is looked for again at ``desired`` (a copy recorded by an earlier release
        of lustrefs that deleted the source before recording the copy): if an object of the file's size is
        there, it is the file's data.
        """
        try:
            return await self.repo.copy(source.key, source.etag, desired, meta), source
        except NotFound:
            if source.key == desired:
                raise
            try:
                found = await self.repo.head(desired)
            except NotFound:
                found = None
            if found is None or found.size != source.size:
                raise
        self.events.emit(
            "WARN",
            "S3ExportSourceRelocated",
            f"The data of {desired} was not at {source.key} any more; the object at {desired} is taken as it.",
            key=desired,
        )
        with db.transaction(self.ns.conn):
            self.ledger.relocate(ino, desired, found.etag)
        moved = ObjectVersion(ino, desired, found.etag, source.size)
        return await self.repo.copy(desired, found.etag, desired, meta), moved

    async def _protect(self, key: str, exporter: int | None) -> bool:
        """Before the object at ``key`` is overwritten or deleted: copy the data of every other entry that still
        reads from it into its local parts (it becomes dirty ``DATA``). Returns whether any was copied."""
        readers = [
            r
            for r in self.ledger.readers_of(key)
            if r.ino != exporter and (r.parent != ORPHAN or r.ino in self.ns.open_counts)
        ]  # an unlinked file nobody has open is never read again
        for r in readers:
            version = ObjectVersion(r.ino, r.key, r.etag, r.src_limit)
            await self.cache.materialize(FileData(r.ino, r.size, version, False))
            current = self.ns.find(r.ino)
            if current is not None and current.etag == r.etag and not current.dirty & DATA:
                with db.transaction(self.ns.conn):
                    self.ns.exports.mark_dirty(r.ino, DATA)
                if current.parent != ORPHAN:
                    self.schedule(r.ino, 0)
        return bool(readers)

    def _refusal(self, size: int, desired: str, old_key: str | None, explicit: bool) -> tuple[str, str] | None:
        """Why an entry of ``size`` bytes is not exported to ``desired`` (FSx's codes), or None."""
        if len(desired.encode()) > MAX_KEY_BYTES:
            return "PathSizeTooLong", f"The key {desired[:80]}… is longer than {MAX_KEY_BYTES} bytes; not exported."
        if size > MAX_FILE_SIZE:
            return "FileSizeTooLarge", f"{desired} is larger than 5 TiB; not exported."
        events = self.policy(desired)
        if events is None:
            return OUTSIDE, f"{desired}: in no data repository association; not exported."
        event = "NEW" if old_key is None else "CHANGED"
        if not explicit and event not in events:
            return "ExportSkippedByPolicy", f"{desired}: {event} events are not exported (AutoExportPolicy)."
        return None

    def _exported(
        self, ino: int, gen: int, key: str, etag: str, source: ObjectVersion | None, size: int, no_data: bool
    ) -> None:
        """Record a finished export of ``size`` bytes to ``key``; the entry is clean unless it changed meanwhile.

        An entry removed or renamed during its upload does not own ``key``: the new object is deleted. For a
        file, the new object becomes its clean data either way (an export to the same key replaced the old
        version): bytes changed during the upload are in local parts, which stay authoritative.
        """
        row = self.ns.find(ino)
        with db.transaction(self.ns.conn):
            if row is None or row.parent == ORPHAN or self._key_of(row) != key:
                self.ledger.abandon(key)
                self._wake.set()
                return
            clean = self.ledger.record(ino, key, gen, None if no_data else (etag, size), self.target.base == "")
            if not no_data and row.link_of is None and self._staging(source):
                assert source is not None
                self.ledger.queue_delete(source.key)  # copied to its key: the staging object has done its work
        self._wake.set()  # the old key may be queued for deletion
        if not clean:
            self.s.due.setdefault(ino, time.monotonic() + (0 if row.node not in self.s.writers else math.inf))
        if no_data or row.link_of is not None:  # a hard link's object is not its inode's clean data
            return
        if clean:
            self.cache.adopt(ino, source, ObjectVersion(ino, key, etag, size))
        elif source is not None and source.etag != etag:
            self.cache.drop_version(ino, source.etag)

    def _key_of(self, row: Inode) -> str | None:
        """The key the entry's path maps to now (None if it is not in the tree)."""
        try:
            path = self.ns.path_key(row.ino)
        except NoEntry:
            return None
        return self.target.key(path, stat.S_ISDIR(row.mode))

    # ----------------------------------------------------------------------------------------- deletions

    def _adopt_intents(self, first: bool = False) -> None:
        """The intents this run recovers: at its start, those left by an earlier run; in a cluster, a staging
        intent once it is STAGING_GRACE old (until then the host that wrote it may still be uploading: checked
        every STAGING_SCAN seconds, with the dirty entries no notification scheduled). Each is busy until
        recovered: no export or deletion of its key meanwhile."""
        now = time.monotonic()
        if not first and (self.staging_prefix is None or now < self._next_scan):
            return
        self._next_scan = now + STAGING_SCAN
        if not first:  # a change whose notification was lost (the listener reconnecting) is exported all the same
            for ino, _ in self.ledger.dirty_inodes(self.host):
                if ino not in self.s.due and ino not in self.s.running:
                    self.s.due[ino] = now + self.delay
        oldest = time.time_ns() - int(STAGING_GRACE * 1e9)
        for key, since_ns in self.ledger.intents():
            staged = self._staging_key(key)
            if key not in self.s.busy and ((first and not staged) or (staged and since_ns < oldest)):
                self.s.stale.add(key)
                self.s.busy[key] = trio.Event()

    async def _recover_intents(self) -> None:
        """Keys an earlier run was writing when it stopped, or whose upload could not be aborted: abort their
        multipart uploads, then treat them as failed exports (deleted unless a live entry is exported there)."""
        if not self.s.stale or (self._delete_backoff and time.monotonic() < self._delete_backoff):
            return
        for key in sorted(self.s.stale):
            try:
                aborted = await self.repo.abort_uploads(key)
            except RepositoryError as exc:
                self.events.emit("ERROR", "S3ExportDeleteFailed", f"Aborting uploads to {key} failed: {exc}", key=key)
                self._delete_backoff = time.monotonic() + DELETE_BACKOFF
                return
            if aborted:
                log.info("aborted %d multipart uploads to %s left by an earlier run", aborted, key)
            with db.transaction(self.ns.conn):
                self.ledger.abandon(key)
            self.s.stale.discard(key)
            if (done := self.s.busy.pop(key, None)) is not None:  # None: a key no export waits for
                done.set()

    async def _delete_pending(self) -> None:
        """Delete the objects of removed entries, unless a live entry has been exported to the same key; up to
        MAX_DELETE_BATCH keys per request."""
        if self._delete_backoff and time.monotonic() < self._delete_backoff:
            return
        todo = []
        for key in self.ledger.pending_deletes():
            if key in self.s.busy:
                continue  # a request writes it, or a recovery: the outcome decides
            staged = self._staging_key(key)  # deleted whatever the policy says
            if not (staged or "DELETED" in (self.policy(key) or ())) or self.ledger.live(key):
                with db.transaction(self.ns.conn):
                    self.ledger.deleted(key)
            else:
                todo.append(key)
        for start in range(0, len(todo), MAX_DELETE_BATCH):
            if not await self._delete_batch(todo[start : start + MAX_DELETE_BATCH]):
                self._delete_backoff = time.monotonic() + DELETE_BACKOFF
                return
        self._delete_backoff = 0.0

    async def _delete_batch(self, keys: list[str]) -> bool:
        """Delete ``keys`` (free, not live); returns whether all of them are gone."""
        done = trio.Event()
        for key in keys:
            self.s.busy[key] = done
        try:
            for key in keys:
                await self._protect(key, None)
            failed = await self.repo.delete_many(keys)
        except (RepositoryError, OSError) as exc:
            failed = dict.fromkeys(keys, str(exc))
        finally:
            for key in keys:
                del self.s.busy[key]
            done.set()
        with db.transaction(self.ns.conn):
            for key in keys:
                if key not in failed:
                    self.ledger.deleted(key)
        for key, why in list(failed.items())[:10]:  # the first few: a whole batch fails for one reason
            self.events.emit("ERROR", "S3ExportDeleteFailed", f"Deleting {key} failed: {why}", key=key)
        return not failed
