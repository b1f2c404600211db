"""Rows for the cleanup duty's tests (controller/cleanup.py), on SQLite or PostgreSQL: of each rule, rows just past
their expiry and rows short of it, dated from the database's now; and ``Left``, what a test reads back."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import select, text

from fleetctl.controller.audit import audit
from fleetctl.controller.dashboard_sessions import DashboardSession
from fleetctl.controller.leases import AgentSession, Lease, db_now
from fleetctl.controller.store import Store
from fleetctl.controller.store.models import AuditLog, EnrollmentToken, Identity, Job, JobEvent, Node
from fleetctl.controller.users import User
from fleetctl.controller.verify_store.models import Verification

DAY = dt.timedelta(days=1)
#: with the default policy (tokens 7 days, job events 30 days; stale leases after a day)
REMOVED = {"enrollment_tokens": 2, "agent_sessions": 1, "leases": 2, "job_events": 3, "dashboard_sessions": 2}
TOKENS_KEPT = {"tok-exp-6d", "tok-active", "tok-waiting", "tok-uses-left"}
LEASES_KEPT = {"rollout:expired-1h", "released-1h"}
EVENTS_KEPT = {"job-done-29d": 2, "job-running-40d": 2}
DASHBOARD_SESSIONS_KEPT = {"live"}
ORPHAN_NODE_ID = 987654


def _token(prefix: str, now: dt.datetime, expires: dt.timedelta, *, uses: int = 0, max_uses: int = 1,
           used: dt.timedelta | None = None) -> EnrollmentToken:
    return EnrollmentToken(token_hash=prefix.ljust(64, "0"), prefix=prefix, created_at=now - 40 * DAY,
                           expires_at=now + expires, used_at=now + used if used is not None else None, revoked=False,
                           max_uses=max_uses, uses=uses)


def _identity(agent_id: str, now: dt.datetime, token_id: int, state: str) -> Identity:
    return Identity(id=agent_id, hostname=agent_id, cert_serial="1", cert_fingerprint="f" * 64, created_at=now,
                    revoked=False, token_id=token_id, state=state)


def _job(job_id: str, now: dt.datetime, status: str, finished: dt.timedelta | None, events: int) -> list[object]:
    job = Job(id=job_id, node="n-live", kind="verify", vars={}, status=status, created_at=now - 40 * DAY,
              finished_at=now + finished if finished is not None else None, result={"ok": True} if finished else None)
    return [job, *(JobEvent(job_id=job_id, counter=i, event="runner_on_ok", data={}, created=now - 40 * DAY)
                   for i in range(events))]


def _dashboard_session(name: str, user_id: int, now: dt.datetime, *, idle_end: dt.timedelta,
                       end: dt.timedelta) -> DashboardSession:
    return DashboardSession(token_hash=name.ljust(64, "0"), user_id=user_id, created_at=now - DAY,
                            last_seen_at=now - DAY, idle_expires_at=now + idle_end, expires_at=now + end)


def seed(store: Store) -> None:
    """Rows of every rule; what the default policy removes is ``REMOVED``."""
    with store.session() as s:
        now = db_now(s)
        s.add_all([_token("tok-exp-8d", now, -8 * DAY), _token("tok-exp-6d", now, -6 * DAY),
                   _token("tok-used-8d", now, 30 * DAY, uses=1, used=-8 * DAY), _token("tok-active", now, DAY),
                   _token("tok-waiting", now, -8 * DAY),
                   _token("tok-uses-left", now, DAY, uses=2, max_uses=5, used=-8 * DAY)])
        s.flush()
        ids = {t.prefix: t.id for t in s.scalars(select(EnrollmentToken))}
        s.add_all([_identity("agent-used", now, ids["tok-used-8d"], "active"),
                   _identity("agent-waiting", now, ids["tok-waiting"], "pending")])
        s.add(Node(hostname="n-live", status="online", facts={}, extra={}, simulated=True, registered_at=now,
                   facts_updated_at=now, last_seen=now))
        s.flush()
        node_id = s.scalars(select(Node.id).where(Node.hostname == "n-live")).one()
        s.add(AgentSession(node_id=node_id, controller_id="ctl", session_id="s1", started_at=now,
                           expires_at=now + DAY))
        s.add_all([Lease(name="rollout:expired-2d", holder="ctl-gone", token=7, acquired_at=now - 3 * DAY,
                         expires_at=now - 2 * DAY),
                   Lease(name="rollout:expired-1h", holder="ctl-gone", token=7, acquired_at=now - DAY,
                         expires_at=now - dt.timedelta(hours=1)),
                   Lease(name="released-2d", holder=None, token=3, acquired_at=now - 2 * DAY, expires_at=None),
                   Lease(name="released-1h", holder=None, token=3, acquired_at=now - dt.timedelta(hours=1),
                         expires_at=None)])
        for rows in (_job("job-done-31d", now, "successful", -31 * DAY, 3),
                     _job("job-done-29d", now, "failed", -29 * DAY, 2),
                     _job("job-running-40d", now, "running", None, 2)):
            s.add_all(rows)
        user = User(name="ops", password_hash="-", role="viewer", created_at=now - 40 * DAY, last_login_at=None)
        s.add(user)
        s.flush()
        hour = dt.timedelta(hours=1)
        s.add_all([_dashboard_session("live", user.id, now, idle_end=hour, end=hour),
                   _dashboard_session("idle-ended", user.id, now, idle_end=-hour, end=hour),
                   _dashboard_session("ended", user.id, now, idle_end=hour, end=-hour)])
        s.add(Verification(job_id="job-done-31d", hostname="n-live", recorded_at=now - 31 * DAY, passed=True,
                           status="pass"))
    audit(store, "admin", "token.create", "tok-exp-8d")
    _orphan_session(store)


def _orphan_session(store: Store) -> None:
    """A session lease whose node is gone, as a removal without the foreign key's cascade leaves it."""
    with store.engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if not postgres:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # outside a transaction, or it does nothing
            conn.commit()
        try:
            with conn.begin():
                if postgres:
                    conn.execute(text("SET LOCAL session_replication_role = replica"))  # no foreign key triggers
                conn.execute(text("INSERT INTO agent_sessions (node_id, controller_id, session_id, started_at, "
                                  "expires_at) VALUES (:id, 'ctl', 's0', :at, :at)"),
                             {"id": ORPHAN_NODE_ID, "at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})
        finally:
            if not postgres:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


@dataclass(frozen=True)
class Left:
    """What the database holds after a round."""

    tokens: set[str]
    identity_tokens: dict[str, int | None]  # agent id → token id
    session_nodes: set[int]
    leases: set[str]
    events: dict[str, int]  # job id → events
    jobs: dict[str, str]  # job id → status
    verifications: int
    dashboard_sessions: set[str]  # the names the token hashes were made of
    audited: bool  # the audit row ``seed`` wrote is there

    @classmethod
    def read(cls, store: Store) -> Left:
        with store.session() as s:
            return cls(tokens=set(s.scalars(select(EnrollmentToken.prefix))),
                       identity_tokens={i.id: i.token_id for i in s.scalars(select(Identity))},
                       session_nodes=set(s.scalars(select(AgentSession.node_id))),
                       leases=set(s.scalars(select(Lease.name))),
                       events=dict(Counter(s.scalars(select(JobEvent.job_id)))),
                       jobs={j.id: j.status for j in s.scalars(select(Job))},
                       verifications=len(s.scalars(select(Verification.id)).all()),
                       dashboard_sessions={h.rstrip("0") for h in s.scalars(select(DashboardSession.token_hash))},
                       audited=s.scalar(select(AuditLog.id).where(AuditLog.action == "token.create",
                                                                  AuditLog.target == "tok-exp-8d")) is not None)


def check_removed_exactly_the_expired(left: Left, duty_leases: set[str]) -> None:
    """``left`` is what ``seed`` leaves after one round of the default policy (``duty_leases``: the leases the
    controllers hold meanwhile, kept)."""
    assert left.tokens == TOKENS_KEPT
    assert left.identity_tokens["agent-used"] is None  # its token removed; the agent's identity kept
    assert left.identity_tokens["agent-waiting"] is not None
    assert ORPHAN_NODE_ID not in left.session_nodes and len(left.session_nodes) == 1
    assert left.leases == LEASES_KEPT | duty_leases
    assert left.events == EVENTS_KEPT
    assert left.jobs == {"job-done-31d": "successful", "job-done-29d": "failed", "job-running-40d": "running"}
    assert left.verifications == 1 and left.audited
    assert left.dashboard_sessions == DASHBOARD_SESSIONS_KEPT
