"""The rollout lease fences the engine that drives a rollout (issue 17; docs/ha.md "Rollout leadership"), on a
PostgreSQL database of the test's own. Engine A drives a running rollout; mid-install its lease ``rollout:<id>`` is
taken over by controller B — once after A's renewals stalled past A's TTL (B's transaction holds the lease row, as
a database stuck for A would look to A), once by expiring it in the database — and then:

* A stops acting on the rollout at once: its term ends (in the stall, by its own clock, before B got the lease),
  its node tasks are gone, and every job it inserted was inserted before that;
* A's units run again with the lease A held (token N) write nothing: each finds 0 rows of the lease to hold and
  raises ``LeaseLost``, and the rollout's rows, its jobs and its audit log are what they were;
* B (token N + 1) finishes the rollout, re-attaching to A's jobs: every node done, no step run twice.

Both engines run in this process on the fake agents of controller/testing.py; B's takeover runs on a second
connection pool."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.leases import Held, Lease, LeaseLost, acquire, hold_lease
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.core import State
from fleetctl.controller.rollout.engine import RolloutEngine, StepRun, rollout_lease
from fleetctl.controller.rollout.models import Rollout, RolloutNode, RolloutTransition
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.store.models import AuditLog, Job
from fleetctl.controller.testing import FakeFleet
from fleetctl.fleet.jobs import JobOutcome, JobStatus
from tests.unit.rollout.wait import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

NODES = [(f"a100-{i}", "a100") for i in range(4)]  # each: install-wheel, then verify
# other hosts than this one: neither is ever taken for a dead process of this host (leases.holder_gone)
HOLDER_A, HOLDER_B = "ctl-a:101:aaaa", "ctl-b:202:bbbb"
TTL_A, TTL_B = 2.0, 10.0
STALL_S = 3.0  # longer than A's TTL


class WitnessedEngine(RolloutEngine):
    """The engine as it is, with the jobs its ``_submit`` units inserted written down: (when, node, job kind)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inserted: list[tuple[float, str, str]] = []

    def _submit(self, step: StepRun, held: Held) -> Any:
        out = super()._submit(step, held)
        if out is not None and out[1] is not None:
            self.inserted.append((time.monotonic(), step.hostname, step.kind))
        return out


def engine(fleet: FakeFleet, owner: str, ttl: float) -> WitnessedEngine:
    return WitnessedEngine(fleet.ctx.store, fleet.ctx.jobs, artifacts=fleet.ctx.artifacts,
                           artifacts_dir=fleet.ctx.settings.state_dir / "artifacts", owner=owner, lease_ttl=ttl,
                           tick=0.1)


@contextlib.asynccontextmanager
async def running(e: RolloutEngine) -> AsyncIterator[RolloutEngine]:
    task = asyncio.create_task(e.run())
    try:
        yield e
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def fleet(pg_url: str, tmp_path: Path) -> AsyncIterator[FakeFleet]:
    f = FakeFleet.create(tmp_path / "controller", pg_url)
    f.kind_seconds.update({"install-wheel": 2.0, "verify": 1.0})
    await f.add_nodes(load_profile(profile, host) for host, profile in NODES)
    yield f
    await f.close()


@pytest.fixture
def other(pg_url: str) -> Iterator[Store]:
    """Controller B's connection pool on the same database."""
    store = open_store(pg_url, migrate_schema=False)
    try:
        yield store
    finally:
        store.close()


def stall_then_take(store: Store, name: str) -> Held | None:
    """B's transaction holds the lease row while A's renewal (and every fenced unit of A) waits on it, past A's TTL
    (the database's clock), then takes the lease as any controller does: ``acquire`` of an expired lease."""
    with store.session() as s:
        s.execute(select(Lease.token).where(Lease.name == name).with_for_update())
        time.sleep(STALL_S)
        return acquire(s, name, HOLDER_B, TTL_B)


def expire_then_take(store: Store, name: str) -> Held | None:
    """The lease expired in the database (A is alive and renewing every tick), and B takes it at once."""
    with store.session() as s:
        s.execute(text("UPDATE leases SET expires_at = clock_timestamp() - interval '1 second' WHERE name = :n"),
                  {"n": name})
        return acquire(s, name, HOLDER_B, TTL_B)


def rollout_rows(store: Store, rid: str) -> tuple[Any, ...]:
    """Everything of the rollout an engine writes, as the database has it now."""
    with store.session() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        nodes = [(n.hostname, n.state, n.step, n.job_id, n.cause, n.result, n.diagnosis, n.step_started_at,
                  n.step_deadline, n.updated_at)
                 for n in s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == rid)
                                    .order_by(RolloutNode.hostname))]
        return ((r.status, r.reason, r.current_batch, r.hold, r.notified_status, r.updated_at), nodes,
                s.scalar(select(func.count()).select_from(RolloutTransition)
                         .where(RolloutTransition.rollout_id == rid)),
                sorted(tuple(row) for row in s.execute(select(Job.id, Job.status))),
                s.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.target == rid)),
                tuple(s.execute(select(Lease.holder, Lease.token, Lease.expires_at)
                                .where(Lease.name == rollout_lease(rid))).one()))


async def take_over_mid_install(fleet: FakeFleet, other: Store, take: Callable[[Store, str], Held | None],
                                ) -> dict[str, float]:
    rid = service.start_rollout(fleet.ctx.store, RolloutRequest(canary=0, batch="100%"))["id"]
    name = rollout_lease(rid)
    a = engine(fleet, HOLDER_A, TTL_A)
    b = engine(fleet, HOLDER_B, TTL_B)
    async with running(a):
        def installing() -> bool:
            nodes = service.get_status(fleet.ctx.store, rid)["nodes"]
            return all(n["state"] == "install" and n["in_step"] for n in nodes)

        await wait_for(installing, timeout=30)
        held_a = a._terms[rid].held
        assert (held_a.holder, held_a.name) == (HOLDER_A, name)

        async def a_stops() -> float:
            while rid in a._terms:
                await asyncio.sleep(0.01)
            return time.monotonic()

        watcher = asyncio.create_task(a_stops())
        asked = time.monotonic()
        held_b = await asyncio.to_thread(take, other, name)
        took = time.monotonic()
        stopped = await asyncio.wait_for(watcher, 10)
        assert held_b is not None and held_b.token == held_a.token + 1, (held_a, held_b)
        await wait_for(lambda: not a._tasks, timeout=5)  # its node tasks are gone
        assert all(at < stopped for at, _, _ in a.inserted), (a.inserted, stopped)
        assert sorted((h, k) for _, h, k in a.inserted) == [(h, "install-wheel") for h, _ in NODES]

        # A's units with the lease it held: each finds it gone and writes nothing
        before = await asyncio.to_thread(rollout_rows, fleet.ctx.store, rid)
        host = NODES[0][0]
        with fleet.ctx.store.session() as s:
            node = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == rid, RolloutNode.hostname == host))
            assert node is not None and node.job_id is not None and node.step_started_at is not None
            job_id, started = node.job_id, node.step_started_at
        install = StepRun(rid, host, State.INSTALL, "install-wheel", {"rollout_id": rid, "attempt": 1}, 900, job_id,
                          started, started + dt.timedelta(seconds=900))
        unsubmitted = StepRun(rid, host, State.INSTALL, "install-wheel", {"rollout_id": rid, "attempt": 7}, 900, None,
                              started, started + dt.timedelta(seconds=900))
        stale: list[Callable[[], object]] = [
            lambda: a._drive_db(rid, held_a, frozenset()),
            lambda: a._prepare(rid, host, held_a),
            lambda: a._submit(unsubmitted, held_a),
            lambda: a._finish_step(install, JobOutcome(job_id, JobStatus.FAILED, 1, {}, "stale"), held_a),
            lambda: a._note(install, held_a, "a stale note"),
            lambda: a._provision_failed(install, held_a, LeaseLost("stale")),
        ]
        for unit in stale:
            with pytest.raises(LeaseLost):
                await asyncio.to_thread(unit)
        with pytest.raises(LeaseLost):
            await fleet.ctx.jobs.cancel_async(job_id, "stale", fence=lambda s: hold_lease(s, held_a))
        assert await asyncio.to_thread(rollout_rows, fleet.ctx.store, rid) == before
        assert not a.inserted[len(NODES):]

        async with running(b):  # A runs on: it never gets the lease back while B renews it
            st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused", timeout=60)
        assert rid not in a._terms and not a._tasks
    assert st["status"] == "succeeded", st["reason"]
    assert all(n["state"] == "done" for n in st["nodes"]), [(n["hostname"], n["state"]) for n in st["nodes"]]
    counts = fleet.job_counts()
    assert sorted(counts) == sorted([(h, "install-wheel") for h, _ in NODES] + [(h, "verify") for h, _ in NODES])
    assert all(n == 1 for n in counts.values()), counts  # no step ran twice
    assert sorted((h, k) for _, h, k in b.inserted) == [(h, "verify") for h, _ in NODES]  # B re-attached to A's
    with fleet.ctx.store.session() as s:
        lease = s.get(Lease, rollout_lease(rid))
        assert lease is not None and lease.holder is None and lease.token == held_b.token  # released at the end
    return {"a_stopped_after_ask": stopped - asked, "a_stopped_after_takeover": stopped - took,
            "takeover_s": took - asked}


async def test_a_stalled_renewal_stops_the_engine_before_the_takeover(fleet: FakeFleet, other: Store) -> None:
    times = await take_over_mid_install(fleet, other, stall_then_take)
    # A stopped by its own clock (TTL 2 s after its last renewal was asked), before B could take the lease
    assert times["a_stopped_after_takeover"] < 0, times
    print(f"\nstalled renewals: A stopped {times['a_stopped_after_ask']:.2f}s into the {STALL_S:g}s stall (TTL "
          f"{TTL_A:g}s), {-times['a_stopped_after_takeover']:.2f}s before B took the lease")


async def test_a_refused_renewal_stops_the_engine_at_once(fleet: FakeFleet, other: Store) -> None:
    times = await take_over_mid_install(fleet, other, expire_then_take)
    assert 0 <= times["a_stopped_after_takeover"] < 2.0, times  # its next tick (0.1 s), loaded machine or not
    print(f"\nexpired and taken over: A stopped {times['a_stopped_after_takeover']:.2f}s after B took the lease")
