"""Database faults against a real controller and real agents (issue 13, docs/security.md "Availability and faults").

- An outside lock on the database (SQLite ``BEGIN EXCLUSIVE`` from another connection; PostgreSQL
  ``LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE`` in another session) held ~8 s while 12 agents heartbeat:
  ``/live`` keeps answering fast, no node goes offline, ``/ready`` and ``/health`` say the database is
  blocked, and afterwards everything (last_seen, a facts report asked for during the lock) is written.
- PostgreSQL backends killed (``pg_terminate_backend``) during a burst of job completions and verification
  records: nothing lost, nothing doubled.
- A read-only database: ``/health`` and ``/ready`` say so (503 with the reason).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from sqlalchemy import event, func, select

from fleetctl.controller.app import RunningController
from fleetctl.controller.registry import Transition
from fleetctl.controller.store import Store
from fleetctl.controller.store.models import Job, JobEvent, Node
from fleetctl.controller.verify_store.models import Verification
from fleetctl.fleet.jobs import JobOutcome, JobStatus
from tests.integration.fleet_support import PG_ADMIN, SimAgents, wait_for

LOCK_SECONDS = 8.0
NODES = 12


def _pg_options(store: Store) -> str:
    return unquote(str(store.engine.url.query.get("options", "")))


def hold_lock(store: Store, locked: threading.Event, seconds: float) -> None:
    """Hold an exclusive lock on ``store``'s database from another connection (this thread) for ``seconds``
    (also used by tests/integration/rollout/test_engine_db_lock.py)."""
    if store.is_sqlite:
        conn = sqlite3.connect(str(store.engine.url.database), isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(PG_ADMIN, options=_pg_options(store)) as pg:
        pg.execute("LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE")
        locked.set()
        time.sleep(seconds)
        pg.commit()


async def _get(client: httpx.AsyncClient, path: str) -> tuple[float, httpx.Response]:
    t = time.monotonic()
    resp = await client.get(path, timeout=30)
    return time.monotonic() - t, resp


@pytest.mark.usefixtures("db_url")
async def test_outside_lock_freezes_nothing_and_offlines_no_node(controller: RunningController,
                                                                 fleet: SimAgents) -> None:
    rc = controller
    for i in range(NODES):
        await fleet.start(f"node-{i:02d}", "a100")
    offline: list[Transition] = []
    rc.ctx.registry.on_transition.append(lambda tr: offline.append(tr) if tr.new == "offline" else None)
    facts_before = await asyncio.to_thread(_facts_updated_at, rc, "node-00")

    locked = threading.Event()
    holder = asyncio.create_task(asyncio.to_thread(hold_lock, rc.ctx.store, locked, LOCK_SECONDS))
    await wait_for(locked.is_set, timeout=10)
    lock_started = time.monotonic()
    rc.ctx.loop_lag.reset()
    rc.ctx.registry.request_facts("node-00")  # a database write the agent asks for during the lock
    live_max = 0.0
    ready: httpx.Response | None = None
    health: httpx.Response | None = None
    async with httpx.AsyncClient(base_url=rc.ctx.http_url or "") as client:
        while not holder.done():
            took, resp = await _get(client, "/api/v1/live")
            assert resp.status_code == 200
            live_max = max(live_max, took)
            if ready is None and time.monotonic() - lock_started > 3:
                _, ready = await _get(client, "/api/v1/ready")
                _, health = await _get(client, "/api/v1/health")
            await asyncio.sleep(0.2)
        await holder
        released = time.time()
        lag = rc.ctx.loop_lag.summary().get("max_ms", 0.0)
        print(f"\n{rc.ctx.store.engine.dialect.name}: lock held {LOCK_SECONDS:g}s; /live max {live_max * 1000:.0f} ms; "
              f"event loop stall max {lag:.0f} ms; /ready {ready and ready.json()}")

        assert lag < 1000, f"the event loop stalled {lag:.0f} ms during the lock: it waited on the database"
        assert live_max < 1.0, f"/live took {live_max:.2f}s during the lock: the event loop waited on the database"
        assert not offline, f"nodes marked offline while heartbeating: {offline}"
        assert ready is not None and ready.status_code == 503 and "blocked" in ready.json()["db"]["reason"]
        assert health is not None and health.status_code == 503 and not health.json()["ok"]

        # afterwards: healthy again, and what waited is written
        await wait_for(lambda: _all_seen_after(rc, released), timeout=15)
        await wait_for(lambda: (_facts_updated_at(rc, "node-00") or 0) > (facts_before or 0), timeout=15)
        _, ready = await _get(client, "/api/v1/ready")
        _, health = await _get(client, "/api/v1/health")
        assert ready.status_code == 200 and health.status_code == 200, health.json()
    assert all(rc.ctx.registry.status_of(f"node-{i:02d}") == "online" for i in range(NODES))


def _facts_updated_at(rc: RunningController, host: str) -> float | None:
    with rc.ctx.store.session() as s:
        at = s.scalar(select(Node.facts_updated_at).where(Node.hostname == host))
        return at.timestamp() if at else None


def _all_seen_after(rc: RunningController, t: float) -> bool:
    with rc.ctx.store.session() as s:
        rows = s.execute(select(Node.last_seen, Node.status)).all()
    return len(rows) == NODES and all(seen is not None and seen.timestamp() > t and status == "online"
                                      for seen, status in rows)


@pytest.mark.postgres
async def test_dropped_connections_lose_and_double_nothing(pg_url: str, tmp_path: Any) -> None:
    """Kill every other backend of the controller's database repeatedly during a burst of job events, job
    results and verification records; count what was stored."""
    from fleetctl.controller.app import start_controller
    from tests.integration.fleet_support import controller_settings, enroll_creds, profile_facts

    rc = await start_controller(controller_settings(tmp_path / "controller", pg_url))
    try:
        hosts = [f"node-{i:02d}" for i in range(NODES)]
        for h in hosts:  # enrolled and registered; the burst below plays the agents' part through the dispatcher
            creds = await enroll_creds(rc, h)
            ident = rc.ctx.enrollment.identities.lookup(creds.agent_id)
            assert ident is not None
            await rc.ctx.registry.report_facts_async(ident, profile_facts("a100", h))
        svc = rc.ctx.verification
        jobs = {h: await rc.ctx.jobs.submit_job(h, "verify", {"mode": "quick", "expect": "flash_attn"}) for h in hosts}
        for job_id in jobs.values():  # as if dispatched by this controller (the agents' part is played here)
            rc.ctx.jobs._deadlines[job_id] = rc.ctx.jobs._deadlines.get(job_id) or _far()

        stop = threading.Event()
        killed: list[int] = []
        kills = threading.Thread(target=_kill_backends, args=(_pg_options(rc.ctx.store), stop, killed), daemon=True)
        kills.start()
        try:
            from fleetctl.controller.jobs import JobEventRecord
            from fleetctl.controller.store import utcnow

            async def one(h: str) -> None:
                job_id = jobs[h]
                evs = [JobEventRecord(job_id, n, "runner_on_ok", {"n": n}, utcnow()) for n in range(1, 6)]
                await _retrying(lambda: rc.ctx.jobs.record_events_async(h, evs[:3]))
                await _retrying(lambda: rc.ctx.jobs.record_events_async(h, evs))  # overlapping resend
                failed = JobOutcome(job_id, JobStatus.FAILED, 2, {}, "boom")
                await _retrying(lambda: rc.ctx.jobs.complete_async(h, failed))

            await asyncio.gather(*(one(h) for h in hosts))
            await asyncio.sleep(1.0)  # recording runs after the results: keep killing a while longer
        finally:
            stop.set()
            kills.join(10)
        await svc.idle(timeout=40)

        with rc.ctx.store.session() as s:
            statuses = dict(s.execute(select(Job.id, Job.status).where(Job.id.in_(jobs.values()))).all())
            events = s.scalar(select(func.count(JobEvent.id)).where(JobEvent.job_id.in_(jobs.values())))
            records = dict(s.execute(select(Verification.job_id, func.count(Verification.id))
                                     .where(Verification.job_id.in_(jobs.values()))
                                     .group_by(Verification.job_id)).all())
        print(f"\nkilled backends {sum(killed)} times; jobs {len(statuses)}, events {events}, "
              f"verification records {sum(records.values())}")
        assert sum(killed) > 0
        assert all(st == "failed" for st in statuses.values()) and len(statuses) == NODES
        assert events == NODES * 5  # nothing lost, nothing doubled
        assert records == dict.fromkeys(jobs.values(), 1)
    finally:
        await rc.stop(grace=0.2)


def _far() -> Any:
    import datetime as dt

    from fleetctl.controller.store import utcnow

    return utcnow() + dt.timedelta(hours=1)


async def _retrying(fn: Any, attempts: int = 20) -> None:
    """What an agent does: a call that fails (UNAVAILABLE) is sent again, the same payload."""
    from fleetctl.fleet.errors import StoreError

    for attempt in range(attempts):
        try:
            await fn()
            return
        except StoreError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05)


def _kill_backends(options: str, stop: threading.Event, killed: list[int]) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, options=options, autocommit=True) as pg:
        while not stop.is_set():
            n = pg.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                           "AND application_name NOT LIKE 'pg_%' AND backend_type = 'client backend'").fetchone()
            killed.append(int(n[0] if n else 0))
            stop.wait(0.25)  # rounds of kills: every pooled connection dies several times during the burst


async def test_read_only_database_is_unhealthy(controller: RunningController) -> None:
    rc = controller
    engine = rc.ctx.store.engine

    def read_only(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")  # what a read-only file or mount does to every write
        cur.close()

    event.listen(engine, "connect", read_only)
    engine.dispose()  # every connection from now on is read-only
    async with httpx.AsyncClient(base_url=rc.ctx.http_url or "") as client:
        _, ready = await _get(client, "/api/v1/ready")
        _, health = await _get(client, "/api/v1/health")
        _, live = await _get(client, "/api/v1/live")
    assert live.status_code == 200
    assert ready.status_code == 503 and "read-only" in ready.json()["db"]["reason"], ready.json()
    assert health.status_code == 503 and "read-only" in health.json()["db"]["reason"], health.json()
