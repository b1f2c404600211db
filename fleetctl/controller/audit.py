"""The audit log: security-relevant actions and refusals, in the store and in the log.

``audit(store, actor, action, target, **detail)``; actors are "admin", "agent:<id>",
"peer:<address>"; actions are dotted ("enroll", "enroll.refused", "token.create", ...).

Refusals of unauthenticated callers are coalesced (``AuditCoalescer``): a flood of refused enrollments
writes one row per source address per minute, carrying how many it stands for (``coalesced``), not one row
each. The log line's actor, target and detail are ``safe_text`` (no raw newlines or escapes from callers).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import AuditLog
from fleetctl.fleet.text import safe_text

log = logging.getLogger("fleet.audit")


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log, as every reader (API, rollout audit, dashboard) shows it."""

    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "actor": self.actor, "action": self.action, "target": self.target,
                "detail": self.detail}


def audit(store: Store, actor: str, action: str, target: str = "", *, level: int = logging.INFO,
          **detail: Any) -> None:
    """Record an action in its own transaction (and in the log)."""
    with store.session() as s:
        record(s, actor, action, target, detail, level=level)


def record(session: Session, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None, *,
           level: int = logging.INFO) -> None:
    """Record an action inside the caller's transaction: it lands with the change it describes, or not at all."""
    detail = detail or {}
    log.log(level, "%s %s %s %s", safe_text(actor, 260), action, safe_text(target, 260),
            safe_text(detail, 2000) if detail else "")
    session.add(AuditLog(at=utcnow(), actor=actor[:253], action=action[:64], target=target[:253], detail=detail))


def entries(session: Session, *, target: str | None = None, limit: int | None = None,
            newest_first: bool = False) -> list[AuditEntry]:
    """The audit log, all of it or one target's (a rollout id, a hostname), oldest first unless asked."""
    query = select(AuditLog)
    if target is not None:
        query = query.where(AuditLog.target == target)
    query = query.order_by(AuditLog.id.desc() if newest_first else AuditLog.id)
    if limit is not None:
        query = query.limit(limit)
    return [AuditEntry(r.at, r.actor, r.action, r.target, dict(r.detail or {})) for r in session.scalars(query)]


class AuditCoalescer:
    """At most one audit row per key (e.g. source address + action) per ``window`` seconds.

    ``admit(key)`` returns None to skip the row (counted), or the number of rows skipped for that key since
    the last one written (0 for the first): the row written then records it as ``coalesced``. Memory is
    bounded (``max_keys``; keys whose window passed are forgotten first)."""

    def __init__(self, window: float = 60.0, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._max_keys = max_keys
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()  # refusals are recorded from database worker threads

    def admit(self, key: str) -> int | None:
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self.window:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return None
            if len(self._last) >= self._max_keys:
                for k in [k for k, t in self._last.items() if now - t >= self.window]:
                    self._last.pop(k, None)
                    self._skipped.pop(k, None)
                if len(self._last) >= self._max_keys:
                    self._last.clear()
                    self._skipped.clear()
            self._last[key] = now
            return self._skipped.pop(key, 0)
