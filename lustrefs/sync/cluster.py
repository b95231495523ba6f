"""The cluster engine's coordination between hosts: the leader, and the changes other hosts make.

Every host of a cluster serves the file system from the shared tables in PostgreSQL. One of them, the leader
(whoever holds the file system's leader lock), runs what must run once per file system: the exporter's automatic
exports and deletions, the explicit exports other hosts ask for, the importer's polls and its event queue. The
lock is a session lock of this host's listening connection: when the leader's host dies or loses the database,
the server releases it and another host takes it at its next try (every ``LEAD_RETRY`` seconds).

The same connection receives the change notifications of the ``inodes`` table (lustrefs.store.pg): the changes
other hosts made are dropped from this host's kernel caches (the ``Notifier``) and, on the leader, scheduled for
export.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import psycopg
import trio

from lustrefs.constants import ROOT_INODE
from lustrefs.store.pg import Change, Listener
from lustrefs.sync.importer import Notifier
from lustrefs.tree.namespace import Namespace

log = logging.getLogger(__name__)

LEAD_RETRY = 1.0  # seconds between tries for the leader lock (and reconnections of the listener)
WAIT = 0.5  # seconds one wait for notifications lasts in its worker thread


class Cluster:
    """This host's part in the cluster: ``run`` listens, leads when it can, and runs ``lead`` while leading."""

    def __init__(
        self,
        conninfo: str,
        fs_id: str,
        ns: Namespace,
        notifier: Notifier,
        lead: Callable[[], Awaitable[None]],
        on_dirty: Callable[[int], None],
        on_request: Callable[[int], None],
        own_session: Callable[[], int],
        on_news: Callable[[], None],
    ) -> None:
        self.conninfo = conninfo
        self.fs_id = fs_id
        self.ns = ns
        self.notifier = notifier
        self.lead = lead  # the leader's services: run until cancelled
        self.on_dirty = on_dirty  # an entry another host changed needs exporting (0: only wake the exporter)
        self.on_request = on_request  # another host asks for an explicit export (leader only)
        self.own_session = own_session  # the namespace connection's session: its own changes are not news
        self.on_news = on_news  # rows this host read may be stale now
        self.leading = False
        self.became_leader = trio.Event()
        self.listening = trio.Event()  # set once the first listener is connected (changes are received from then)
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self._serve()
            except* psycopg.Error as group:  # the listener's, or the leader's services' (they stop with it)
                log.warning("cluster: lost the database (%s); again in %.0f s", group.exceptions[0], LEAD_RETRY)
            self.leading = False
            await trio.sleep(LEAD_RETRY)

    async def _serve(self) -> None:
        listener = await trio.to_thread.run_sync(Listener, self.conninfo, self.fs_id, limiter=self._limiter)
        self.listening.set()
        try:
            async with trio.open_nursery() as nursery:
                next_try = 0.0
                while True:
                    if not self.leading and trio.current_time() >= next_try:
                        if await trio.to_thread.run_sync(listener.try_lead, limiter=self._limiter):
                            self.leading = True
                            log.info("cluster: this host leads %s", self.fs_id)
                            self.became_leader.set()
                            nursery.start_soon(self.lead)
                        next_try = trio.current_time() + LEAD_RETRY
                    changes = await trio.to_thread.run_sync(listener.changes, WAIT, limiter=self._limiter)
                    session = self.own_session()
                    for change in changes:
                        if isinstance(change, int):
                            if self.leading:
                                self.on_request(change)
                        elif change.session != session:
                            self._apply(change)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(listener.close, limiter=self._limiter)

    def _apply(self, change: Change) -> None:
        """Another host changed a row: drop what the kernel caches of it, export it if this host leads."""
        self.on_news()
        self.notifier.inode(change.ino if change.link_of is None else change.link_of)
        for place in (change.old, change.new):
            if place is not None and place[1] and (place[0] in self.ns.lookup_counts or place[0] == ROOT_INODE):
                self.notifier.entry(*place)
        if self.leading:  # an entry to export, or (0) a deletion the other host may have queued: wake the exporter
            self.on_dirty(change.ino if change.dirty and change.new is not None else 0)
