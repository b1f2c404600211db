"""Dashboard login sessions: rows in ``dashboard_sessions``, so that a login made through one controller holds on
every controller of the database, and a logout ends it on all of them (issue 17; docs/ha.md, docs/security.md).

A login makes a random secret (256 bits) that the browser keeps in the ``fleet_session`` cookie; the row holds
only its sha256 — as for API tokens (controller/api_tokens.py), a random secret has no dictionary to try, so a
copy of the database or of a backup yields no session. Each row names its user, when it was made and last used,
and its two ends (``SessionPolicy``):

- ``expires_at``: ``lifetime`` after the login, however busy it is (``dashboard_session_seconds``, 8 h);
- ``idle_expires_at``: ``idle`` after its last use (``dashboard_session_idle_seconds``, 1 h), never past
  ``expires_at``. A use moves it forward, written at most once per ``touch_every`` (a minute, or a quarter of a
  shorter idle window): a page view is a read, an open dashboard (its event stream checks the session every
  5 s) writes its row once a minute, and the idle end is exact to within that.

A session also ends at logout (its row deleted), when its user is deleted (the foreign key cascades), disabled,
or given a new password (``end_user_sessions``, called by ``web.auth.add_user``). Every controller reads the same
row on every request, so each end holds everywhere at once. Rows past an end are deleted at each login
(``purge_expired``). Times are the controller's clock (``store.utcnow``), as for API tokens: seconds of skew
between controllers against windows of an hour.

The session's CSRF token is derived from its secret (``csrf_token``, an HMAC keyed by it): one per session, the
same on every controller, no key to share — and the token a page shows gives the secret away to nobody.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace
from enum import StrEnum

from sqlalchemy import ForeignKey, Integer, String, delete, func, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from fleetctl.controller.store.models import Base
from fleetctl.controller.users import User
from fleetctl.fleet.errors import UsageError

SESSION_COOKIE = "fleet_session"
DEFAULT_LIFETIME_SECONDS = 8 * 3600
DEFAULT_IDLE_SECONDS = 3600
TOUCH_EVERY = dt.timedelta(minutes=1)
SECRET_BYTES = 32
MAX_COOKIE_CHARS = 128  # a secret is 43 characters: anything much longer is not one, and is not hashed
_CSRF_LABEL = b"fleet-dashboard-csrf"


# ---- the rules (pure) ------------------------------------------------------------------------------------------

class SessionState(StrEnum):
    ACTIVE = "active"
    IDLE = "idle"  # unused for longer than the idle window
    EXPIRED = "expired"  # past its lifetime


@dataclass(frozen=True)
class SessionPolicy:
    """How long a session lasts: ``lifetime`` from its login, ``idle`` from its last use."""

    lifetime: dt.timedelta
    idle: dt.timedelta

    def __post_init__(self) -> None:
        if self.lifetime <= dt.timedelta(0) or self.idle <= dt.timedelta(0):
            raise UsageError(f"dashboard session lifetime {self.lifetime} and idle window {self.idle} must be positive",
                             hint="set dashboard_session_seconds and dashboard_session_idle_seconds to whole "
                                  "seconds of at least 1")

    @classmethod
    def of_seconds(cls, lifetime: int = DEFAULT_LIFETIME_SECONDS, idle: int = DEFAULT_IDLE_SECONDS) -> SessionPolicy:
        return cls(dt.timedelta(seconds=lifetime), dt.timedelta(seconds=idle))

    @property
    def touch_every(self) -> dt.timedelta:
        """How stale ``last_seen_at`` may get before a use writes it (bounds the writes, and the idle end's error)."""
        return min(TOUCH_EVERY, self.idle / 4)


@dataclass(frozen=True)
class SessionTimes:
    created_at: dt.datetime
    last_seen_at: dt.datetime
    idle_expires_at: dt.datetime
    expires_at: dt.datetime


def opened(policy: SessionPolicy, now: dt.datetime) -> SessionTimes:
    """The times of a session logged in at ``now``."""
    expires_at = now + policy.lifetime
    return SessionTimes(created_at=now, last_seen_at=now, idle_expires_at=min(now + policy.idle, expires_at),
                        expires_at=expires_at)


def state_at(times: SessionTimes, now: dt.datetime) -> SessionState:
    if now >= times.expires_at:
        return SessionState.EXPIRED
    if now >= times.idle_expires_at:
        return SessionState.IDLE
    return SessionState.ACTIVE


def touched(times: SessionTimes, policy: SessionPolicy, now: dt.datetime) -> SessionTimes | None:
    """The times after a use at ``now``, when they are due to be written; None when the stored ones will do."""
    if now - times.last_seen_at < policy.touch_every:
        return None
    return replace(times, last_seen_at=now, idle_expires_at=min(now + policy.idle, times.expires_at))


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_token(secret: str) -> str:
    """The CSRF token of the session whose cookie holds ``secret``."""
    return hmac.new(secret.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()[:32]


# ---- the table -------------------------------------------------------------------------------------------------

class DashboardSession(Base):
    """One dashboard login (migration ``web_0006``). Only the secret's sha256 is stored."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    idle_expires_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]

    @property
    def times(self) -> SessionTimes:
        return SessionTimes(self.created_at, self.last_seen_at, self.idle_expires_at, self.expires_at)


# ---- the records -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WebUser:
    """The logged-in user of one dashboard request."""

    id: int
    name: str
    role: str
    csrf: str

    @property
    def can_act(self) -> bool:
        return self.role in ("operator", "admin")


def open_session(s: Session, user: User, policy: SessionPolicy, now: dt.datetime) -> str:
    """A new session for ``user`` (who just proved their password): the secret for the cookie. Rows of ended
    sessions are deleted on the way."""
    purge_expired(s, now)
    secret = new_secret()
    times = opened(policy, now)
    s.add(DashboardSession(token_hash=secret_hash(secret), user_id=user.id, created_at=times.created_at,
                           last_seen_at=times.last_seen_at, idle_expires_at=times.idle_expires_at,
                           expires_at=times.expires_at))
    return secret


def resolve(s: Session, secret: str | None, policy: SessionPolicy, now: dt.datetime) -> WebUser | None:
    """Who the cookie ``secret`` logs in, counting this request as a use; None when it is no live session (unknown,
    logged out, idle too long, expired, or its user disabled)."""
    if not secret or len(secret) > MAX_COOKIE_CHARS:
        return None
    found = s.execute(select(DashboardSession, User).join(User, User.id == DashboardSession.user_id)
                      .where(DashboardSession.token_hash == secret_hash(secret))).first()
    if found is None:
        return None
    row, user = found
    if state_at(row.times, now) is not SessionState.ACTIVE or user.disabled:
        return None
    later = touched(row.times, policy, now)
    if later is not None:
        # a statement, not the ORM's flush: a logout on another controller may delete the row meanwhile, and then
        # this matches nothing instead of failing the request
        s.execute(update(DashboardSession).where(DashboardSession.id == row.id)
                  .values(last_seen_at=later.last_seen_at, idle_expires_at=later.idle_expires_at)
                  .execution_options(synchronize_session=False))
    return WebUser(id=user.id, name=user.name, role=user.role, csrf=csrf_token(secret))


def close_session(s: Session, secret: str) -> None:
    """Logout: the session ends on every controller."""
    s.execute(delete(DashboardSession).where(DashboardSession.token_hash == secret_hash(secret)))


def end_user_sessions(s: Session, user_id: int) -> int:
    """End every session of a user (a new password); how many there were."""
    result = s.execute(delete(DashboardSession).where(DashboardSession.user_id == user_id))
    return int(getattr(result, "rowcount", 0) or 0)


def purge_expired(s: Session, now: dt.datetime) -> int:
    """Delete the rows of sessions past either end; how many."""
    ended = or_(DashboardSession.expires_at <= now, DashboardSession.idle_expires_at <= now)
    result = s.execute(delete(DashboardSession).where(ended))
    return int(getattr(result, "rowcount", 0) or 0)


# ---- read views ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UserSessions:
    """A user's live sessions: how many, and the latest use of any (to the minute: ``TOUCH_EVERY``)."""

    count: int
    last_seen_at: dt.datetime


def live_sessions_by_user(s: Session, now: dt.datetime) -> dict[int, UserSessions]:
    """Live sessions per user id (users without one are absent)."""
    rows = s.execute(select(DashboardSession.user_id, func.count(), func.max(DashboardSession.last_seen_at))
                     .where(DashboardSession.expires_at > now, DashboardSession.idle_expires_at > now)
                     .group_by(DashboardSession.user_id))
    return {user_id: UserSessions(count, last) for user_id, count, last in rows}
