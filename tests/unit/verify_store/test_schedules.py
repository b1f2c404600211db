"""Schedules: cron parsing errors, due-time computation, atomic claims, persistence across restarts."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from fleetctl.controller.store import open_store
from fleetctl.controller.verify_store import schedules as sch
from fleetctl.fleet.errors import NotFoundError, UsageError

T0 = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(("expr", "field"), [
    ("0 3 * * 8", "day-of-week"), ("61 3 * * *", "minute"), ("0 25 * * *", "hour"), ("0 3 32 * *", "day-of-month"),
    ("0 3 * 13 *", "month"), ("0 3 * foo *", "month"), ("x 3 * * *", "minute"),
])
def test_bad_field_is_named(expr: str, field: str) -> None:
    with pytest.raises(UsageError) as err:
        sch.parse_cron(expr)
    assert f"bad {field} field" in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("expr", ["", "0 3 * *", "0 3 * * * *"])
def test_wrong_number_of_fields(expr: str) -> None:
    with pytest.raises(UsageError, match="expected 5"):
        sch.parse_cron(expr)


def test_good_expressions() -> None:
    assert sch.parse_cron("0  3 * * *") == "0 3 * * *"
    assert sch.parse_cron("*/15 * * * mon-fri") == "*/15 * * * mon-fri"
    assert sch.latest_due("0 3 * * *", T0) == dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.UTC)
    assert sch.latest_due("0 12 * * *", T0) == T0  # exactly on a fire time: due now
    assert sch.next_due("0 3 * * *", T0) == dt.datetime(2026, 11, 25, 3, 0, tzinfo=dt.UTC)


def test_bad_selector_and_mode(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    with pytest.raises(UsageError, match="selector key"):
        sch.add_schedule(store, "0 3 * * *", "bogus=1")
    with pytest.raises(UsageError, match="mode"):
        sch.add_schedule(store, "0 3 * * *", "all", mode="slow")
    with pytest.raises(NotFoundError):
        sch.remove_schedule(store, 42)
    store.close()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(self, selector: str, mode: str, schedule_id: int, run_id: int) -> tuple[dict[str, str], None]:
        self.calls.append((selector, mode, schedule_id))
        return {"n1": f"job-{run_id}"}, None


def test_runs_once_per_due_time_and_survives_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    store = open_store(url)
    made = sch.add_schedule(store, "0 3 * * *", "gpu=H100", mode="quick", now=T0)
    assert made["next_run_at"] == "2026-11-25T03:00:00+00:00"
    rec = Recorder()

    async def scenario() -> None:
        assert await sch.tick(store, rec, now=T0) == []  # created after today's 03:00: nothing due
        day1 = dt.datetime(2026, 11, 25, 3, 0, 2, tzinfo=dt.UTC)
        assert len(await sch.tick(store, rec, now=day1)) == 1
        assert await sch.tick(store, rec, now=day1 + dt.timedelta(seconds=5)) == []  # same due time
    asyncio.run(scenario())
    assert rec.calls == [("gpu=H100", "quick", made["id"])]
    store.close()

    # "restart": a new store (new process state) on the same database
    store2 = open_store(url)
    listed = sch.list_schedules(store2, now=dt.datetime(2026, 11, 25, 4, 0, tzinfo=dt.UTC))
    assert listed[0]["last_run_at"] == "2026-11-25T03:00:00+00:00"
    assert listed[0]["next_run_at"] == "2026-11-26T03:00:00+00:00"

    async def after_restart() -> None:
        assert await sch.tick(store2, rec, now=dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.UTC)) == []
        # down for three days: the latest missed run happens once, not three times
        assert len(await sch.tick(store2, rec, now=dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC))) == 1
        assert await sch.tick(store2, rec, now=dt.datetime(2026, 11, 28, 9, 1, tzinfo=dt.UTC)) == []
    asyncio.run(after_restart())
    runs = sch.schedule_runs(store2, made["id"])
    assert [r["due_at"][:10] for r in runs] == ["2026-11-25", "2026-11-28"]
    assert runs[0]["jobs"] == {"n1": f"job-{runs[0]['id']}"}
    sch.remove_schedule(store2, made["id"])
    assert sch.list_schedules(store2) == [] and sch.schedule_runs(store2) == []
    store2.close()


def test_claim_is_exclusive(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    sid = sch.add_schedule(store, "* * * * *", "all", now=T0)["id"]
    due = T0 + dt.timedelta(minutes=1)
    first = sch.claim(store, sid, due, "a")
    assert first is not None
    assert sch.claim(store, sid, due, "b") is None
    store.close()


def test_submit_failure_is_recorded_on_the_run(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    sid = sch.add_schedule(store, "* * * * *", "node-*", now=T0)["id"]

    async def failing(selector: str, mode: str, schedule_id: int, run_id: int) -> tuple[dict[str, str], None]:
        raise UsageError("node selector 'node-*' matches no node")

    asyncio.run(sch.tick(store, failing, now=T0 + dt.timedelta(minutes=2)))
    (run,) = sch.schedule_runs(store, sid)
    assert run["error"] == "node selector 'node-*' matches no node" and run["jobs"] == {}
    store.close()
