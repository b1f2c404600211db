"""The audit log: security-relevant actions and refusals, in the store and in the log.

``audit(store, actor, action, target, **detail)``; actors are "admin", "agent:<id>",
"peer:<address>"; actions are dotted ("enroll", "enroll.refused", "token.create", ...).
"""

from __future__ import annotations

import logging
from typing import Any

from controller.store import Store, utcnow
from controller.store.models import AuditLog

log = logging.getLogger("fleet.audit")


def audit(store: Store, actor: str, action: str, target: str = "", *, level: int = logging.INFO,
          **detail: Any) -> None:
    log.log(level, "%s %s %s %s", actor, action, target, detail or "")
    with store.session() as s:
        s.add(AuditLog(at=utcnow(), actor=actor[:253], action=action[:64], target=target[:253], detail=detail))
