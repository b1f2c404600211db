"""A running job re-attached to another controller (agent fail-over, issue 17): two dispatchers on one database
stand for two controllers. A dispatched the job and stored some of its events, then died; the agent opens its stream
on B holding the job. B leaves it running, adopts its deadline (its watchdog times it out if no result comes), stores
the replayed events once and the result once."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from fleetctl.controller.jobs import GRACE_SECONDS, JobDispatcher, JobEventRecord
from fleetctl.controller.registry import Registry
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.fleet.jobs import JobOutcome, JobStatus
from tests.unit.controller_core.util import add_identity, facts


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'shared.db'}")


async def _dispatched_on_a(store: Store, timeout: int = 60) -> tuple[JobDispatcher, str]:
    Registry(store).report_facts(add_identity(store, "n1"), facts("n1"))
    a = JobDispatcher(store)
    job_id = await a.submit_job("n1", "verify", {}, timeout=timeout)
    stream = a.stream_for("n1", held=())
    assert (await asyncio.wait_for(stream.__anext__(), 2)).job_id == job_id
    await stream.aclose()
    now = utcnow()
    assert a.record_events("n1", [JobEventRecord(job_id, 1, "fleet_job_started", {}, now),
                                  JobEventRecord(job_id, 2, "playbook_on_task_start", {}, now)]) == 2
    return a, job_id


async def test_the_new_controller_adopts_the_held_job_and_stores_its_rest_once(store: Store) -> None:
    _, job_id = await _dispatched_on_a(store)
    b = JobDispatcher(store)  # A is gone; the agent's stream opens on B, holding the job
    stream = b.stream_for("n1", held={job_id})
    waiting = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.2)
    assert not waiting.done()  # a running job is not sent again
    assert b.get(job_id)["status"] == "running" and job_id in b._deadlines
    # the batch A stored but whose answer was lost comes again, with the rest
    now = utcnow()
    replay = [JobEventRecord(job_id, n, name, {}, now)
              for n, name in ((2, "playbook_on_task_start"), (3, "fleet_job_finished"))]
    assert b.record_events("n1", replay) == 1
    await b.complete_async("n1", JobOutcome(job_id, JobStatus.SUCCESSFUL, 0, {"ok": True}))
    await b.complete_async("n1", JobOutcome(job_id, JobStatus.SUCCESSFUL, 0, {"ok": True}))  # re-sent: no change
    shown = b.get(job_id)
    assert shown["status"] == "successful" and [e["counter"] for e in shown["events"]] == [1, 2, 3]
    assert job_id not in b._deadlines
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await stream.aclose()


async def test_the_new_controllers_watchdog_times_out_an_adopted_job_without_a_result(store: Store) -> None:
    _, job_id = await _dispatched_on_a(store, timeout=60)
    b = JobDispatcher(store)
    stream = b.stream_for("n1", held={job_id})
    waiting = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.2)
    dispatched = dt.datetime.fromisoformat(b.get(job_id)["dispatched_at"])
    assert b._deadlines[job_id] == dispatched + dt.timedelta(seconds=60 + GRACE_SECONDS)  # A's deadline, not later
    assert b.expire(dispatched + dt.timedelta(seconds=30)) == []
    assert b.expire(dispatched + dt.timedelta(seconds=60 + GRACE_SECONDS + 1)) == [job_id]
    assert b.get(job_id)["status"] == "timeout"
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await stream.aclose()
