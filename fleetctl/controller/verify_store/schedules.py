"""Re-verification schedules: cron parsing, the atomic claim of a due run, and the scheduler loop.

A schedule is a row of ``verify_schedules`` (cron, node selector, mode). Nothing about its timing lives
in memory: at every tick the scheduler computes, from the database, the latest cron time at or before
now (``due``); if that is after the schedule's creation and no ``verify_schedule_runs`` row exists for
(schedule, due), it inserts one. The unique (schedule_id, due_at) constraint makes that insert the
claim: with two controllers on one PostgreSQL both may try, exactly one succeeds, and only the winner
submits the verify jobs. A controller that was down over several due times runs the latest one once
when it comes back (no burst of catch-up runs); a restart never repeats a run already claimed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from croniter import croniter
from croniter.croniter import CroniterError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fleetctl.controller.rollout.core import parse_selector
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.verify_store.models import VerifySchedule, VerifyScheduleRun
from fleetctl.fleet.errors import NotFoundError, StoreError, UsageError

log = logging.getLogger(__name__)

CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_FIELD_HELP = {"minute": "0-59", "hour": "0-23", "day-of-month": "1-31", "month": "1-12 or jan-dec",
               "day-of-week": "0-6 (0 = Sunday) or sun-sat"}
TICK_SECONDS = 5.0  # ControllerSettings.scheduler_tick
MODES = ("quick", "full")


def parse_cron(text: str) -> str:
    """Validate a 5-field cron expression; a bad one raises ``UsageError`` naming the field."""
    expr = " ".join((text or "").split())
    fields = expr.split(" ") if expr else []
    if len(fields) != 5:
        raise UsageError(f"cron expression {text!r} has {len(fields)} field(s), expected 5 "
                         f"({' '.join(CRON_FIELDS)})", hint='e.g. "0 3 * * *" = every day at 03:00 UTC')
    for i, (name, value) in enumerate(zip(CRON_FIELDS, fields, strict=True)):
        probe = ["*"] * 5
        probe[i] = value
        if not croniter.is_valid(" ".join(probe)):
            raise UsageError(f"cron expression {text!r}: bad {name} field {value!r}",
                             hint=f"{name} takes {_FIELD_HELP[name]}, lists (a,b), ranges (a-b) and steps (*/n)")
    if not croniter.is_valid(expr):
        raise UsageError(f"cron expression {text!r} is not valid", hint='e.g. "0 3 * * *"')
    try:  # e.g. "0 0 31 2 *" never fires
        croniter(expr, utcnow()).get_next(dt.datetime)
    except (CroniterError, ValueError) as exc:
        raise UsageError(f"cron expression {text!r} never fires: {exc}", hint="check day-of-month and month") \
            from exc
    return expr


def latest_due(cron: str, now: dt.datetime) -> dt.datetime:
    """The latest cron time at or before ``now`` (UTC)."""
    base = now.astimezone(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
    value: dt.datetime = croniter(cron, base).get_prev(dt.datetime)
    return value.astimezone(dt.UTC)


def next_due(cron: str, after: dt.datetime) -> dt.datetime:
    value: dt.datetime = croniter(cron, after.astimezone(dt.UTC)).get_next(dt.datetime)
    return value.astimezone(dt.UTC)


# ---- CRUD ---------------------------------------------------------------------------------------------------


def schedule_json(row: VerifySchedule, last_due: dt.datetime | None = None,
                  now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    return {"id": row.id, "cron": row.cron, "selector": row.selector, "mode": row.mode,
            "quick": row.mode == "quick", "enabled": row.enabled, "created_at": row.created_at.isoformat(),
            "created_by": row.created_by, "last_run_at": last_due.isoformat() if last_due else None,
            "next_run_at": next_due(row.cron, max(now, last_due or now)).isoformat()}


def add_schedule(store: Store, cron: str, selector: str, *, mode: str = "full", actor: str = "admin",
                 now: dt.datetime | None = None) -> dict[str, Any]:
    expr = parse_cron(cron)
    parse_selector(selector)  # the rollout's selector syntax; errors name the bad term
    if mode not in MODES:
        raise UsageError(f"unknown verification mode {mode!r}", hint="use quick or full")
    with store.session() as s:
        row = VerifySchedule(cron=expr, selector=selector or "all", mode=mode, created_at=now or utcnow(),
                             created_by=actor[:253], enabled=True)
        s.add(row)
        s.flush()
        return schedule_json(row, now=now)


def list_schedules(store: Store, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    with store.session() as s:
        last = {sid: due for sid, due in s.execute(select(VerifyScheduleRun.schedule_id,
                                                            func.max(VerifyScheduleRun.due_at))
                                                     .group_by(VerifyScheduleRun.schedule_id))}
        return [schedule_json(r, last.get(r.id), now) for r in s.scalars(select(VerifySchedule)
                                                                          .order_by(VerifySchedule.id))]


def remove_schedule(store: Store, schedule_id: int) -> dict[str, Any]:
    with store.session() as s:
        row = s.get(VerifySchedule, schedule_id)
        if row is None:
            raise NotFoundError(f"no schedule {schedule_id}", hint="see `fleetctl schedule list`")
        out = schedule_json(row)
        s.execute(delete(VerifyScheduleRun).where(VerifyScheduleRun.schedule_id == schedule_id))
        s.delete(row)
        return out


def schedule_runs(store: Store, schedule_id: int | None = None) -> list[dict[str, Any]]:
    with store.session() as s:
        stmt = select(VerifyScheduleRun).order_by(VerifyScheduleRun.due_at, VerifyScheduleRun.id)
        if schedule_id is not None:
            stmt = stmt.where(VerifyScheduleRun.schedule_id == schedule_id)
        return [{"id": r.id, "schedule_id": r.schedule_id, "due_at": r.due_at.isoformat(),
                 "claimed_at": r.claimed_at.isoformat(), "claimed_by": r.claimed_by, "jobs": r.jobs,
                 "error": r.error} for r in s.scalars(stmt)]


# ---- claiming -----------------------------------------------------------------------------------------------


def due_schedules(store: Store, now: dt.datetime) -> list[tuple[int, str, str, dt.datetime]]:
    """(id, selector, mode, due_at) of every enabled schedule with an unclaimed due time ≤ now."""
    out = []
    with store.session() as s:
        last = {sid: due for sid, due in s.execute(select(VerifyScheduleRun.schedule_id,
                                                            func.max(VerifyScheduleRun.due_at))
                                                     .group_by(VerifyScheduleRun.schedule_id))}
        for row in s.scalars(select(VerifySchedule).where(VerifySchedule.enabled.is_(True))):
            due = latest_due(row.cron, now)
            if due <= row.created_at:
                continue
            prev = last.get(row.id)
            if prev is not None and due <= prev:
                continue
            out.append((row.id, row.selector, row.mode, due))
    return out


def claim(store: Store, schedule_id: int, due_at: dt.datetime, owner: str) -> int | None:
    """Atomically claim the run of ``schedule_id`` at ``due_at``: the run's id, or None when another
    controller (or an earlier tick) already has it."""
    try:
        with store.session() as s:
            run = VerifyScheduleRun(schedule_id=schedule_id, due_at=due_at, claimed_at=utcnow(),
                                    claimed_by=owner[:128], jobs={})
            s.add(run)
            s.flush()
            return run.id
    except StoreError as exc:
        if isinstance(exc.__cause__, IntegrityError):
            return None
        raise


def set_run_jobs(store: Store, run_id: int, jobs: dict[str, str], error: str | None) -> None:
    with store.session() as s:
        run = s.get(VerifyScheduleRun, run_id)
        if run is not None:
            run.jobs, run.error = jobs, error


Submitter = Callable[[str, str, int, int], Awaitable[tuple[dict[str, str], str | None]]]
"""(selector, mode, schedule_id, run_id) → ({hostname: job id}, error)."""


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def tick(store: Store, submit: Submitter, *, now: dt.datetime | None = None,
               owner: str | None = None) -> list[int]:
    """One scheduler pass: claim and start every due run. Returns the ids of the runs this call claimed."""
    now = now or utcnow()
    owner = owner or owner_name()
    started = []
    for schedule_id, selector, mode, due in await asyncio.to_thread(due_schedules, store, now):
        run_id = await asyncio.to_thread(claim, store, schedule_id, due, owner)
        if run_id is None:
            continue
        log.info("schedule %d: run due %s claimed by %s", schedule_id, due.isoformat(), owner)
        try:
            jobs, error = await submit(selector, mode, schedule_id, run_id)
        except Exception as exc:  # a bad selector, no node: recorded on the run, the loop goes on
            jobs, error = {}, str(getattr(exc, "message", exc))
            log.warning("schedule %d: %s", schedule_id, error)
        await asyncio.to_thread(set_run_jobs, store, run_id, jobs, error)
        started.append(run_id)
    return started


async def run_scheduler(store: Store, submit: Submitter, *, tick_seconds: float = TICK_SECONDS,
                        stop: asyncio.Event | None = None) -> None:
    """The controller's scheduler task: ``tick`` every ``tick_seconds`` until cancelled or ``stop`` is set."""
    owner = owner_name()
    while stop is None or not stop.is_set():
        try:
            await tick(store, submit, owner=owner)
        except (StoreError, SQLAlchemyError) as exc:
            log.error("scheduler: %s", exc)
        except Exception:
            log.exception("scheduler tick failed")
        try:
            if stop is None:
                await asyncio.sleep(tick_seconds)
            else:
                await asyncio.wait_for(stop.wait(), tick_seconds)
        except TimeoutError:
            pass

