"""The ``cleanup`` leader duty: removes from the database what has expired (issue 17; docs/operations.md, "Cleanup
and retention").

One controller of those sharing the database runs it, the holder of the ``cleanup`` lease (controller/app.py runs
``Cleanup.run`` under a ``LeaderDuty``): a round when it takes the lease, then one every ``CleanupPolicy.interval``
seconds. A round applies every rule of ``RULES`` in turn; a rule removes in batches of ``BATCH`` rows, each batch
its own short transaction on the database's clock whose writes carry the lease's fence, so a controller that lost
the lease removes nothing more, and the duty is cancelled between two batches. Each round logs what it removed
and counts it on /metrics (``fleet_controller_cleanup_removed_rows_total{table}``,
``fleet_controller_cleanup_rounds_total{outcome}``: on the controller that ran it).

``RULES`` is the one list of what is removed: a table's expiry rule is one function ``(session, policy, now,
guard, batch) -> rows removed`` (``guard``: the fence, in every write's WHERE) and one ``ExpiryRule`` entry.
Never removed: a job's row (its final status and result), verifications, the audit log, nodes, artifacts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter
from sqlalchemy import ColumnElement, Result, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from fleetctl.controller.dashboard_sessions import DashboardSession
from fleetctl.controller.enrollment import IdentityState
from fleetctl.controller.leases import AgentSession, Held, Lease, db_now, fence
from fleetctl.controller.store import Store
from fleetctl.controller.store.models import EnrollmentToken, Identity, Job, JobEvent, Node
from fleetctl.controller.telemetry import REGISTRY
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.jobs import FINISHED

log = logging.getLogger(__name__)

BATCH = 1000  # rows per transaction: a first round over a large backlog holds no lock for long
#: a lease row nobody renewed (or released) for this long belongs to a duty that is gone (a finished rollout's);
#: its next holder, if any, makes it again. Its fencing token goes on from the clock (leases.acquire)
STALE_LEASE = dt.timedelta(days=1)


@dataclass(frozen=True)
class CleanupPolicy:
    """What the cleanup keeps, and how often it runs (``ControllerSettings.cleanup``)."""

    interval: float = 3600.0  # seconds between rounds (FLEET_CLEANUP_INTERVAL)
    job_event_retention_days: int = 30  # events of jobs finished longer ago are removed; 0: kept forever
    enrollment_token_retention_days: int = 7  # tokens expired or used up longer ago are removed; 0: kept forever


def cutoff(now: dt.datetime, days: int) -> dt.datetime | None:
    """What ended before this is removed; None: kept forever (0 days)."""
    return None if days == 0 else now - dt.timedelta(days=days)


def _count(result: Result[object]) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def remove_enrollment_tokens(s: Session, policy: CleanupPolicy, now: dt.datetime, guard: ColumnElement[bool],
                             batch: int) -> int:
    """Tokens that can no longer enroll — expired (revoked ones included) or used up — for the retention period.
    Agents enrolled with one keep working: their identity only stops naming it (the audit log's ``enroll`` row
    keeps which token it was). A token an enrollment waiting for approval names is kept."""
    before = cutoff(now, policy.enrollment_token_retention_days)
    if before is None:
        return 0
    token = EnrollmentToken
    waiting = exists().where(Identity.token_id == token.id, Identity.state == IdentityState.PENDING)
    ended = or_(token.expires_at < before, and_(token.uses >= token.max_uses, token.used_at < before))
    ids = list(s.scalars(select(token.id).where(ended, ~waiting).order_by(token.id).limit(batch)))
    if not ids:
        return 0
    s.execute(update(Identity).where(Identity.token_id.in_(ids), guard).values(token_id=None))
    return _count(s.execute(delete(token).where(token.id.in_(ids), guard)))


def remove_orphan_agent_sessions(s: Session, policy: CleanupPolicy, now: dt.datetime, guard: ColumnElement[bool],
                                 batch: int) -> int:
    """Session leases of nodes no longer registered (the foreign key's cascade removes them with their node; these
    are what a removal without it left, e.g. by hand with foreign keys off)."""
    gone = select(AgentSession.node_id).where(~exists().where(Node.id == AgentSession.node_id)).limit(batch)
    return _count(s.execute(delete(AgentSession).where(AgentSession.node_id.in_(gone), guard)))


def remove_stale_leases(s: Session, policy: CleanupPolicy, now: dt.datetime, guard: ColumnElement[bool],
                        batch: int) -> int:
    """Leader leases that expired, or were released, ``STALE_LEASE`` ago and nobody took since."""
    before = now - STALE_LEASE
    stale = or_(Lease.expires_at < before,
                and_(Lease.holder.is_(None), or_(Lease.acquired_at.is_(None), Lease.acquired_at < before)))
    names = select(Lease.name).where(stale).limit(batch)
    return _count(s.execute(delete(Lease).where(Lease.name.in_(names), guard)))


def remove_job_events(s: Session, policy: CleanupPolicy, now: dt.datetime, guard: ColumnElement[bool],
                      batch: int) -> int:
    """The events of jobs finished more than the retention period ago; the job's row, its final status and result,
    stays (and its verification, which is a row of its own)."""
    before = cutoff(now, policy.job_event_retention_days)
    if before is None:
        return 0
    old_jobs = select(Job.id).where(Job.status.in_(sorted(FINISHED)), Job.finished_at < before)
    events = select(JobEvent.id).where(JobEvent.job_id.in_(old_jobs)).limit(batch)
    return _count(s.execute(delete(JobEvent).where(JobEvent.id.in_(events), guard)))


def remove_ended_dashboard_sessions(s: Session, policy: CleanupPolicy, now: dt.datetime, guard: ColumnElement[bool],
                                    batch: int) -> int:
    """Dashboard logins past their absolute or idle end. A login purges them too (dashboard_sessions.purge_expired);
    this removes those of users who do not log in again."""
    ended = or_(DashboardSession.expires_at <= now, DashboardSession.idle_expires_at <= now)
    ids = select(DashboardSession.id).where(ended).limit(batch)
    return _count(s.execute(delete(DashboardSession).where(DashboardSession.id.in_(ids), guard)))


Remove = Callable[[Session, CleanupPolicy, dt.datetime, ColumnElement[bool], int], int]


@dataclass(frozen=True)
class ExpiryRule:
    """One table's expiry: its name (the metric's ``table`` label, the log's word), what it removes (said in the
    log, with the policy's figures) and the function that removes one batch."""

    table: str
    what: Callable[[CleanupPolicy], str]
    remove: Remove


def _days(days: int, text: str) -> str:
    return f"{text} more than {days} days ago" if days else f"none: {text.split(' ', 1)[0]} kept forever"


RULES: tuple[ExpiryRule, ...] = (
    ExpiryRule("enrollment_tokens",
               lambda p: _days(p.enrollment_token_retention_days, "tokens expired or used up"),
               remove_enrollment_tokens),
    ExpiryRule("agent_sessions", lambda p: "of nodes no longer registered", remove_orphan_agent_sessions),
    ExpiryRule("leases", lambda p: f"expired or released more than {STALE_LEASE.days} day(s) ago",
               remove_stale_leases),
    ExpiryRule("job_events", lambda p: _days(p.job_event_retention_days, "events of jobs finished"),
               remove_job_events),
    ExpiryRule("dashboard_sessions", lambda p: "logins past their absolute or idle end",
               remove_ended_dashboard_sessions),
)

REMOVED = Counter("fleet_controller_cleanup_removed_rows", "Rows the cleanup duty removed from the database, by table "
                  "(counted on the controller that ran the round)", ["table"], registry=REGISTRY)
ROUNDS = Counter("fleet_controller_cleanup_rounds", "Cleanup rounds this controller ran, by outcome (done, failed)",
                 ["outcome"], registry=REGISTRY)
for _rule in RULES:  # every table's series from the start, at 0: a rate over it needs no first removal
    REMOVED.labels(_rule.table)
for _outcome in ("done", "failed"):
    ROUNDS.labels(_outcome)


class Cleanup:
    """The duty: ``run(held)`` while this controller holds the ``cleanup`` lease."""

    def __init__(self, store: Store, policy: CleanupPolicy, rules: tuple[ExpiryRule, ...] = RULES) -> None:
        self.store = store
        self.policy = policy
        self.rules = rules

    async def run(self, held: Held) -> None:
        while True:
            await self.round(held)
            await asyncio.sleep(self.policy.interval)

    def _batch(self, rule: ExpiryRule, held: Held) -> int:
        with self.store.session() as s:
            now = db_now(s)
            return rule.remove(s, self.policy, now, fence(held.name, held.token, now), BATCH)

    async def round(self, held: Held) -> dict[str, int] | None:
        """One round over every rule: rows removed per table, or None when the database failed (logged; what was
        removed so far stays removed, the rest waits for the next round)."""
        removed: dict[str, int] = {}
        try:
            for rule in self.rules:
                removed[rule.table] = 0
                while True:
                    count = await self.store.call(self._batch, rule, held)
                    removed[rule.table] += count
                    REMOVED.labels(rule.table).inc(count)
                    if count < BATCH:
                        break
        except FleetError as exc:
            ROUNDS.labels("failed").inc()
            log.warning("cleanup round stopped: %s; removed so far: %s; the rest in %.0fs", exc.message,
                        self._said(removed), self.policy.interval)
            return None
        ROUNDS.labels("done").inc()
        log.info("cleanup round: removed %s", self._said(removed))
        return removed

    def _said(self, removed: dict[str, int]) -> str:
        rules = {rule.table: rule for rule in self.rules}
        return ", ".join(f"{count} {table} ({rules[table].what(self.policy)})" for table, count in removed.items()) \
            or "nothing"
