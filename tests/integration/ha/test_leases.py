"""Leader leases on PostgreSQL (controller/leases.py), judged by the database's clock: one holder at a time, the
other takes over once the lease expired (a new fencing token), a stale holder's fenced write does nothing; and two
real controller processes: one runs the verification scheduler, and after it is killed with SIGKILL the other
takes the duty over once the lease expired."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, literal, select, update

from fleetctl.controller.leases import Held, LeaderDuty, Lease, acquire, db_now, fence
from fleetctl.controller.store import Store, open_store
from tests.integration.ha.test_shared_liveness import _query
from tests.integration.rollout.controller_proc import ControllerProc, until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

DUTY_LOG = Table("duty_log", MetaData(), Column("id", Integer, primary_key=True), Column("writer", String(64)))


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[Store, Store]]:
    """Two stores on one database: what two controllers hold."""
    a, b = open_store(pg_url), open_store(pg_url)
    DUTY_LOG.create(a.engine)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def fenced_write(store: Store, held: Held) -> int:
    """The duty's write, guarded by the lease: one row, or none once another holder has the lease."""
    with store.session() as s:
        now = db_now(s)
        written = s.execute(insert(DUTY_LOG).from_select(
            ["writer"], select(literal(held.holder)).where(fence(held.name, held.token, now)))
            .returning(DUTY_LOG.c.id)).all()
        return len(written)


def take(store: Store, holder: str, ttl: float) -> Held | None:
    with store.session() as s:
        return acquire(s, "duty", holder, ttl)


def test_one_holder_takeover_after_expiry_and_the_fence(stores: tuple[Store, Store]) -> None:
    a, b = stores
    first = take(a, "controller-a", 1.0)
    assert first is not None
    assert take(b, "controller-b", 1.0) is None  # held: refused
    renewed = take(a, "controller-a", 1.0)
    assert renewed is not None and renewed.token == first.token  # a renewal keeps the token
    assert fenced_write(a, renewed) == 1

    time.sleep(1.2)  # a stalls past its lease's expiry (database clock)
    second = take(b, "controller-b", 5.0)
    assert second is not None and second.token == first.token + 1
    assert fenced_write(a, renewed) == 0, "a stale holder's write went through"
    assert take(a, "controller-a", 1.0) is None  # and it cannot take the lease back while b holds it
    assert fenced_write(b, second) == 1
    with a.session() as s:
        assert [w for (w,) in s.execute(select(DUTY_LOG.c.writer).order_by(DUTY_LOG.c.id))] == \
            ["controller-a", "controller-b"]


def test_racing_for_an_expired_lease_exactly_one_wins(stores: tuple[Store, Store]) -> None:
    a, b = stores
    for round_ in range(10):
        name = f"race-{round_}"
        winners: list[str] = []
        barrier = threading.Barrier(2)

        def race(store: Store, holder: str, name: str = name, winners: list[str] = winners,
                 barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            with store.session() as s:
                if acquire(s, name, holder, 5.0) is not None:
                    winners.append(holder)

        threads = [threading.Thread(target=race, args=(st, h)) for st, h in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(winners) == 1, (round_, winners)


def _lease(url: str, name: str) -> tuple[str | None, int] | None:
    rows = _query(url, f"SELECT holder, token FROM leases WHERE name = '{name}'")
    return (rows[0][0], int(rows[0][1])) if rows else None


async def test_scheduler_runs_on_one_controller_and_moves_after_kill9(pg_url: str, tmp_path: Path) -> None:
    procs = [ControllerProc(tmp_path / n / "controller", db=pg_url) for n in ("a", "b")]  # lease TTL 5 s
    for p in procs:
        p.start()
    try:
        for p in procs:
            await p.ready()

        async def held() -> tuple[str, int] | None:
            lease = _lease(pg_url, "verify-scheduler")
            return (lease[0], lease[1]) if lease and lease[0] else None

        holder, token = await until(held, 30)
        pids = {str(p.proc.pid): p for p in procs if p.proc}
        leader = pids[holder.split(":")[1]]
        other = next(p for p in procs if p is not leader)
        await asyncio.sleep(3)  # several renewals: the other never takes it meanwhile
        assert _lease(pg_url, "verify-scheduler") == (holder, token)
        logs = {p: (p.state.parent / "controller-1.log").read_text() for p in procs}
        assert "lease verify-scheduler taken" in logs[leader] and "lease verify-scheduler taken" not in logs[other]

        loop = asyncio.get_running_loop()
        leader.kill9()
        killed = loop.time()

        async def moved() -> bool:
            lease = _lease(pg_url, "verify-scheduler")
            return bool(lease and lease[0] and lease[0] != holder)

        await until(moved, 30, interval=0.05)
        took = loop.time() - killed
        new_holder, new_token = _lease(pg_url, "verify-scheduler") or (None, 0)
        assert other.proc is not None and new_holder is not None and f":{other.proc.pid}:" in new_holder
        assert new_token == token + 1
        print(f"\nverify-scheduler lease (TTL 5 s) taken over {took:.1f}s after the kill -9 of its holder")
    finally:
        for p in procs:
            p.stop()


async def test_a_leader_that_loses_its_lease_stops_its_duty_at_once(stores: tuple[Store, Store]) -> None:
    """Another controller takes the lease (here: the row is changed under the leader, as a takeover after a stall
    would): the leader's next renewal is refused and its duty is cancelled then — within a third of the TTL —
    and it does not run it again while the other holds the lease."""
    a, b = stores
    ticks: list[float] = []
    stopped = asyncio.Event()

    async def duty(held: Held) -> None:
        try:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)
        finally:
            stopped.set()

    leader = LeaderDuty(a, "duty", duty, holder="controller-a", ttl=1.5)
    task = asyncio.create_task(leader.run())
    try:
        for _ in range(100):
            if ticks:
                break
            await asyncio.sleep(0.05)
        assert leader.held is not None and ticks, "the leader never ran its duty"
        with b.session() as s:  # controller b takes the lease over (a new term: token + 1)
            later = db_now(s) + dt.timedelta(seconds=60)
            s.execute(update(Lease).where(Lease.name == "duty")
                      .values(holder="controller-b", token=Lease.token + 1, expires_at=later))
        taken = time.monotonic()
        await asyncio.wait_for(stopped.wait(), timeout=leader.every + 1.0)
        lost_after = time.monotonic() - taken
        count = len(ticks)
        await asyncio.sleep(leader.every * 2)  # it keeps trying, and is refused while b holds the lease
        assert len(ticks) == count and leader.held is None and leader.terms == 1
        print(f"\nleader duty cancelled {lost_after:.2f}s after losing its lease (renewal every {leader.every:.2f}s)")
    finally:
        await leader.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
