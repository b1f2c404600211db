"""Pending drift re-verifications (table ``drift_checks``): the debounce rule, and the rows' reads and writes.

A relevant facts change (``service.drift_relevant``) is recorded by the controller that heard it as one row per
node: due a debounce after the change, on the database's clock. A later change of the same node before then
postpones the row and merges its paths, so that an upgrade reporting several changes within seconds gets one
verification; the first change is kept, because a verify job finished since then covers the whole row. The holder
of the ``drift-checks`` lease submits the due rows and removes each once handled (``VerificationService``).

Pure rules: ``postponed``, ``is_due``, ``wait_seconds``. The store functions take the database's now
(``leases.db_now``) and, for the leader's removals, the fence of its lease (``leases.fence``) from their caller:
this module owns its table beside ``leases`` and imports it not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Table, delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from fleetctl.controller.verify_store.models import DriftCheck


@dataclass(frozen=True)
class PendingDrift:
    """A drift re-verification waiting for its due time."""

    hostname: str
    first_changed_at: dt.datetime
    due_at: dt.datetime
    paths: tuple[str, ...]  # sorted, each once


def postponed(pending: PendingDrift | None, hostname: str, paths: Iterable[str], now: dt.datetime,
              delay: float) -> PendingDrift:
    """The node's pending check after a change of ``paths`` at ``now``: due ``delay`` seconds after it (never
    sooner than it was: a controller with a longer debounce may have recorded it), paths merged, first change kept."""
    due = now + dt.timedelta(seconds=delay)
    if pending is None:
        return PendingDrift(hostname, now, due, tuple(sorted(set(paths))))
    return PendingDrift(hostname, pending.first_changed_at, max(pending.due_at, due),
                        tuple(sorted(set(pending.paths) | set(paths))))


def is_due(pending: PendingDrift, now: dt.datetime) -> bool:
    return pending.due_at <= now


def wait_seconds(next_due: dt.datetime | None, now: dt.datetime, poll: float) -> float:
    """How long the leader sleeps before it looks again: until the next due check, at most ``poll`` (a check that
    another controller records meanwhile is seen that late at most)."""
    if next_due is None:
        return poll
    return min(poll, max(0.0, (next_due - now).total_seconds()))


def _pending(row: DriftCheck) -> PendingDrift:
    return PendingDrift(row.hostname, row.first_changed_at, row.due_at, tuple(str(p) for p in row.paths or ()))


def record(s: Session, hostname: str, paths: Sequence[str], now: dt.datetime, delay: float,
           recorded_by: str) -> PendingDrift:
    """Record (or postpone) the node's check. Of two controllers recording the same node at once, the insert of one
    wins and the other postpones that row: the row is locked from the insert to the commit. Idempotent enough to be
    retried (``Store.write``): a repeat only postpones by the time the retry took."""
    table = DriftCheck.__table__
    assert isinstance(table, Table)
    first = postponed(None, hostname, paths, now, delay)
    insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    s.execute(insert(table).values(hostname=hostname, first_changed_at=first.first_changed_at, due_at=first.due_at,
                                   paths=list(first.paths), recorded_by=recorded_by)
              .on_conflict_do_nothing(index_elements=[table.c.hostname]))
    row = s.scalars(select(DriftCheck).where(DriftCheck.hostname == hostname).with_for_update()).one()
    merged = postponed(_pending(row), hostname, paths, now, delay)
    row.due_at, row.paths, row.recorded_by = merged.due_at, list(merged.paths), recorded_by
    return merged


def due(s: Session, now: dt.datetime, limit: int = 100) -> list[PendingDrift]:
    """The checks due at ``now``, oldest due first."""
    rows = s.scalars(select(DriftCheck).where(DriftCheck.due_at <= now).order_by(DriftCheck.due_at).limit(limit))
    return [_pending(r) for r in rows]


def next_due(s: Session) -> dt.datetime | None:
    found: dt.datetime | None = s.scalar(select(func.min(DriftCheck.due_at)))
    return found


def settle(s: Session, check: PendingDrift, guard: ColumnElement[bool]) -> bool:
    """Remove ``check`` once handled; False when it was postponed meanwhile (a new change: it comes due again and
    is judged then) or ``guard`` (the leader's fence) no longer holds."""
    result = s.execute(delete(DriftCheck).where(DriftCheck.hostname == check.hostname,
                                                DriftCheck.due_at == check.due_at, guard))
    return bool(getattr(result, "rowcount", 0))
