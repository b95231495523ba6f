"""Model-based test of the cluster engine: random programs of POSIX operations, each on one of three hosts (their
own daemon, home and cache; one PostgreSQL database, one bucket), with crashes of any host (the leader too),
checked against one reference tree: every host reads the model's bytes right after the step that wrote them
(close-to-open), and after quiescence the bucket holds exactly the tree (no staging object left behind).

A bounded number of programs runs in ``make test``; LUSTREFS_CLUSTER_EXAMPLES (and LUSTREFS_CLUSTER_STEPS) for a
long run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import Daemon
from memrepo import Bucket
from test_export_model import PATHS, Model, apply, check, op

HOSTS = 3
EXAMPLES = int(os.environ.get("LUSTREFS_CLUSTER_EXAMPLES", "15"))
STEPS = int(os.environ.get("LUSTREFS_CLUSTER_STEPS", "20"))

host = st.integers(min_value=0, max_value=HOSTS - 1)
sizes = st.sampled_from([3, 3000, 1_500_000])
write = st.tuples(st.just("write"), st.sampled_from(PATHS), st.binary(max_size=64), sizes)
# Writes and reads on other hosts are what close-to-open is about: they come more often than the other steps.
step = st.one_of(
    st.tuples(host, write),
    st.tuples(host, write),
    # S3 faults are the single-host model's (a close whose staging upload fails is EIO: tests/test_cluster.py).
    st.tuples(host, op.filter(lambda s: s[0] not in ("crash", "settle", "poll", "faults"))),
    st.tuples(host, st.just(("crash",))),
    st.tuples(st.just(0), st.just(("settle",))),
    st.tuples(host, st.just(("read_all",))),
    st.tuples(host, st.just(("read_all",))),
)


def new_host(home: Path, store: Bucket, conninfo: str) -> Daemon:
    return Daemon(home, store, import_policy="NONE", cluster=conninfo)


async def leader(hosts: list[Daemon], timeout: float = 20.0) -> Daemon:
    """The host that leads (one takes over within seconds after the leader's crash)."""
    with trio.fail_after(timeout):
        while not any(d.core.leading for d in hosts):
            await trio.sleep(0.01)
    return next(d for d in hosts if d.core.leading)


async def reads_all(d: Daemon, m: Model) -> None:
    """Close-to-open: this host reads every file of the model with the model's bytes."""
    for p, e in m.tree.items():
        if e.kind == "file":
            assert await d.read_file(p) == e.data, (d.home.name, p)


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)
@given(program=st.lists(step, max_size=STEPS))
def test_hosts_of_a_cluster_agree_with_one_tree(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: object, program: list
) -> None:
    base: Path = tmp_path_factory.mktemp("cluster")
    conninfo = postgres_server.create_database(base.name.replace("-", "_").lower())  # type: ignore[attr-defined]
    store = Bucket()
    store.faults.latency = 0.001

    async def main() -> None:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                m = Model()
                hosts = [new_host(base / f"h{i}", store, conninfo) for i in range(HOSTS)]
                for d in hosts:
                    await d.start(nursery)
                    await d.listening()
                await leader(hosts)
                for i, s in program:
                    d = hosts[i]
                    if s[0] == "crash":
                        await d.crash()
                        hosts[i] = new_host(d.home, store, conninfo)
                        await hosts[i].start(nursery)
                        await hosts[i].listening()
                    elif s[0] == "settle":
                        if not store.faults.error_rate and not store.faults.hang:
                            await (await leader(hosts)).settled(timeout=60)
                    elif s[0] == "read_all":
                        await reads_all(d, m)
                    else:
                        await apply(d, m, s)
                store.faults.error_rate, store.faults.hang = 0.0, set()
                for d in hosts:
                    await reads_all(d, m)
                    await d.stop()
                # What every host closed is exported once a leader runs: a remount of one host checks it all.
                again = new_host(hosts[0].home, store, conninfo)
                await again.start(nursery)
                await again.leading()
                await check(again, m)
                await again.stop()
                nursery.cancel_scope.cancel()

    trio.run(main)
