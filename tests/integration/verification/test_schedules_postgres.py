"""Schedules on PostgreSQL (127.0.0.1:5432, db ``test``, a throwaway schema): two controllers never run
the same due time twice, and a restarted controller picks up from the database."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.app import start_controller
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import Job, Node
from fleetctl.controller.verify_store import schedules as sch
from fleetctl.controller.verify_store.models import VerifySchedule, VerifyScheduleRun
from tests.integration.fleet_support import controller_settings, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres]
T0 = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


async def test_two_schedulers_claim_each_due_time_once(pg_url: str) -> None:
    stores = [open_store(pg_url), open_store(pg_url)]
    try:
        sid = sch.add_schedule(stores[0], "*/5 * * * *", "all", now=T0)["id"]
        calls: list[tuple[str, int]] = []

        def submitter(name: str) -> sch.Submitter:
            async def submit(selector: str, mode: str, schedule_id: int, run_id: int) -> tuple[dict[str, str], None]:
                calls.append((name, run_id))
                return {"n": f"{name}-{run_id}"}, None
            return submit

        # 3 hours of ticks, both "controllers" racing on every tick (claims run in worker threads)
        for minute in range(0, 180, 1):
            now = T0 + dt.timedelta(minutes=minute, seconds=1)
            await asyncio.gather(sch.tick(stores[0], submitter("a"), now=now, owner="a"),
                                 sch.tick(stores[1], submitter("b"), now=now, owner="b"))
        runs = sch.schedule_runs(stores[0], sid)
        assert len(runs) == 35 == len(calls)  # every 5 minutes after creation (12:05 … 14:55), each once
        assert len({r["due_at"] for r in runs}) == 35
        assert {r["claimed_by"] for r in runs} <= {"a", "b"}
        # a restarted controller (new store) sees the same history and does not repeat the last run
        stores[0].close()
        stores[0] = open_store(pg_url)
        assert await sch.tick(stores[0], submitter("a2"), now=T0 + dt.timedelta(minutes=179, seconds=30)) == []
        assert sch.list_schedules(stores[0], now=T0 + dt.timedelta(minutes=180))[0]["last_run_at"] == \
            (T0 + dt.timedelta(minutes=175)).isoformat()
    finally:
        for s in stores:
            s.close()


def _add_nodes(store: Store, hosts: list[str]) -> None:
    with store.session() as s:
        for h in hosts:
            # whole facts (a node with unreadable facts is skipped by scheduled verification, with the reason)
            s.add(Node(hostname=h, status="online", facts=load_profile("h100", hostname=h).to_json(),
                       extra={}, simulated=True, registered_at=utcnow(), facts_updated_at=utcnow(),
                       last_seen=utcnow()))


async def test_two_controller_processes_run_a_schedule_once(pg_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two real controllers (their scheduler tasks ticking every 0.1 s) on one PostgreSQL database."""
    first = await start_controller(controller_settings(tmp_path / "a", pg_url, scheduler_tick=0.1))
    second = await start_controller(controller_settings(tmp_path / "b", pg_url, scheduler_tick=0.1))
    try:
        _add_nodes(first.ctx.store, ["gpu-1", "gpu-2", "gpu-3"])
        # created two minutes ago: this minute's run is due at once, for both controllers
        sch.add_schedule(first.ctx.store, "* * * * *", "gpu-*", mode="quick",
                         now=utcnow() - dt.timedelta(minutes=2))

        def runs() -> int:
            with first.ctx.store.session() as s:
                return int(s.scalar(select(func.count()).select_from(VerifyScheduleRun)) or 0)

        await wait_for(lambda: runs() >= 1, timeout=20)
        await asyncio.sleep(1.0)  # both schedulers ticked ~10 more times
        with first.ctx.store.session() as s:
            due = list(s.scalars(select(VerifyScheduleRun.due_at)))
            jobs = list(s.execute(select(Job.node, Job.vars).where(Job.kind == "verify")))
            sched = s.scalar(select(VerifySchedule))
        assert sched is not None
        per_due = len(set(due))
        assert len(due) == per_due  # no due time claimed twice
        # each node once: a later run (if the test crossed a minute) reuses the still-pending jobs, no pile-up
        assert sorted(n for n, _ in jobs) == ["gpu-1", "gpu-2", "gpu-3"], jobs
        assert all(len(r["jobs"]) == 3 for r in sch.schedule_runs(first.ctx.store)) and per_due >= 1
        assert all(v["trigger"] == "schedule" and v["mode"] == "quick" for _, v in jobs)
    finally:
        for rc in (first, second):
            with contextlib.suppress(Exception):
                await rc.stop()
