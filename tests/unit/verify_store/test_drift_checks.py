"""Drift checks as rows (controller/verify_store/drift.py): the debounce rule (a new change postpones and merges, the
first change is kept), what is due, how long the leader sleeps; recording and settling on a real SQLite store (a
removal whose fence no longer holds removes nothing); and the ``drift-checks`` duty of ``VerificationService``
submitting one quick verify job per burst of changes, a check recorded before it started included."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select, true

from fleetctl.controller.context import ControllerContext
from fleetctl.controller.leases import Held, acquire
from fleetctl.controller.settings import ControllerSettings
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import Job
from fleetctl.controller.verify_store import drift
from fleetctl.controller.verify_store.models import DriftCheck
from fleetctl.controller.verify_store.service import VerificationService
from tests.unit.verify_store.conftest import add_node

T0 = dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_a_first_change_is_due_a_debounce_later() -> None:
    first = drift.postponed(None, "gpu-1", ["torch.version", "driver.version", "torch.version"], T0, 10)
    assert first == drift.PendingDrift("gpu-1", T0, at(10), ("driver.version", "torch.version"))
    assert not drift.is_due(first, at(9.999)) and drift.is_due(first, at(10))


def test_a_new_change_postpones_and_merges_and_keeps_the_first_change() -> None:
    first = drift.postponed(None, "gpu-1", ["driver.version"], T0, 10)
    later = drift.postponed(first, "gpu-1", ["flash_attn.version"], at(6), 10)
    assert later == drift.PendingDrift("gpu-1", T0, at(16), ("driver.version", "flash_attn.version"))
    # a controller with a shorter debounce never brings a check forward
    assert drift.postponed(later, "gpu-1", ["torch.cuda"], at(7), 1).due_at == at(16)


@pytest.mark.parametrize(("next_due", "now", "wait"), [
    (None, T0, 2.0),  # nothing pending: look again after the poll interval
    (at(0.5), T0, 0.5),  # the next check comes due before that
    (at(30), T0, 2.0),  # a check recorded elsewhere meanwhile is seen within the poll interval
    (at(-5), T0, 0.0),  # overdue
])
def test_the_leader_sleeps_until_the_next_due_check_at_most_the_poll(next_due: dt.datetime | None, now: dt.datetime,
                                                                     wait: float) -> None:
    assert drift.wait_seconds(next_due, now, 2.0) == wait


@pytest.fixture
def ctx(tmp_path: Path) -> ControllerContext:
    c = ControllerContext(ControllerSettings(state_dir=tmp_path / "c"))
    for h in ("gpu-1", "gpu-2"):
        add_node(c.store, h)
    c.registry.load()
    return c


def _rows(store: Store) -> dict[str, tuple[dt.datetime, dt.datetime, list[str], str]]:
    with store.session() as s:
        return {r.hostname: (r.first_changed_at, r.due_at, list(r.paths), r.recorded_by)
                for r in s.scalars(select(DriftCheck))}


def test_record_postpones_one_row_per_node_and_settle_removes_only_what_it_read(ctx: ControllerContext) -> None:
    store = ctx.store
    with store.session() as s:
        drift.record(s, "gpu-1", ["driver.version"], T0, 10, "ctl-a")
        drift.record(s, "gpu-2", ["torch.version"], at(1), 10, "ctl-a")
    with store.session() as s:
        drift.record(s, "gpu-1", ["toolkit.nvcc"], at(5), 10, "ctl-b")
    assert _rows(store) == {"gpu-1": (T0, at(15), ["driver.version", "toolkit.nvcc"], "ctl-b"),
                            "gpu-2": (at(1), at(11), ["torch.version"], "ctl-a")}
    with store.session() as s:
        assert drift.due(s, at(10.9)) == []
        assert [c.hostname for c in drift.due(s, at(15))] == ["gpu-2", "gpu-1"]  # oldest due first
        assert drift.next_due(s) == at(11)
        (read,) = drift.due(s, at(11))
    with store.session() as s:  # gpu-2 changes again after the leader read it: the removal leaves the new due time
        drift.record(s, "gpu-2", ["torch.cuda"], at(11.5), 10, "ctl-a")
    with store.session() as s:
        assert not drift.settle(s, read, true())
        (again,) = drift.due(s, at(21.5))[1:]
        assert again.hostname == "gpu-2"
        assert not drift.settle(s, again, ~true())  # the fence no longer holds: nothing removed
        assert drift.settle(s, again, true())
    assert list(_rows(store)) == ["gpu-1"]
    ctx.close()


async def test_the_duty_submits_one_job_per_burst_and_a_check_recorded_before_it_started(
        ctx: ControllerContext) -> None:
    svc = VerificationService(ctx, drift_delay=0.3)
    with ctx.store.session() as s:  # recorded by another controller (or this one before a restart), already due
        drift.record(s, "gpu-2", ["driver.version"], utcnow() - dt.timedelta(seconds=60), 10, "ctl-gone")
        lease = acquire(s, "drift-checks", ctx.registry.holder, 30)
    assert isinstance(lease, Held)
    duty = asyncio.create_task(svc.run_drift_checks(lease))
    try:
        for _ in range(3):
            svc.facts_changed("gpu-1", ["torch.version"])
        svc.facts_changed("gpu-1", ["gpus[0].uuid"])  # not a change that matters
        await svc.idle()
        assert set(_rows(ctx.store)) <= {"gpu-1", "gpu-2"}
        for _ in range(100):
            if len(svc.drift_submitted) == 2 and not _rows(ctx.store):
                break
            await asyncio.sleep(0.05)
        assert sorted(h for h, _ in svc.drift_submitted) == ["gpu-1", "gpu-2"]
        assert not _rows(ctx.store)
        with ctx.store.session() as s:
            jobs = [(j.node, j.vars["trigger"], j.vars["mode"]) for j in s.scalars(select(Job))]
        assert sorted(jobs) == [("gpu-1", "drift", "quick"), ("gpu-2", "drift", "quick")]

        # a change while its verify job is still pending: covered by that job, no second one
        svc.facts_changed("gpu-1", ["driver.version"])
        await svc.idle()
        for _ in range(100):
            if not _rows(ctx.store):
                break
            await asyncio.sleep(0.05)
        assert not _rows(ctx.store) and len(svc.drift_submitted) == 2
    finally:
        duty.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await duty
        ctx.close()
