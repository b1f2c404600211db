"""Time-bound claims in the database, judged by the database's clock (issue 17: several controllers).

Controllers on different hosts disagree about the time; the database is the one clock they share. ``db_now``
reads it (PostgreSQL's ``clock_timestamp()``, the real time even inside a long transaction); SQLite serves one
controller on one host (controller/sqlite_lock.py refuses a second), whose clock is the database's — there the
caller's clock is used, which lets tests drive time by hand.

``holder_id()`` names this process as a holder: ``host:pid:nonce`` (the nonce tells apart a restarted process
that got the same pid).

Tables (this module owns them; their rules live with their users):

* ``agent_sessions`` — per node, the lease of its agent's session with the controller that hears it; the
  registry (controller/registry.py) renews it with its heartbeat batches and judges liveness by it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
import uuid
from collections.abc import Callable

from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from fleetctl.controller.store.models import Base


def holder_id() -> str:
    """This process as a lease holder: ``host:pid:nonce``."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def db_now(session: Session, local_clock: Callable[[], float] = time.time) -> dt.datetime:
    """The database's time now (aware, UTC); on SQLite ``local_clock``'s, the one host's."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        now = session.scalar(select(func.clock_timestamp()))
        assert isinstance(now, dt.datetime)
        return now.astimezone(dt.UTC)
    return dt.datetime.fromtimestamp(local_clock(), dt.UTC)


class AgentSession(Base):
    """The lease of a node's agent session: which controller hears the node's agent, and until when.

    The controller the agent talks to renews it with its batched heartbeat writes; ``expires_at`` is on the
    database's clock. A node is alive while its lease has not expired: any controller may turn a node whose
    lease expired offline, none turns offline a node another controller holds (controller/registry.py)."""

    __tablename__ = "agent_sessions"

    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    controller_id: Mapped[str] = mapped_column(String(128))  # ``holder_id()`` of the controller holding it
    session_id: Mapped[str] = mapped_column(String(32))  # new when a controller starts hearing the agent
    started_at: Mapped[dt.datetime]  # when this session began (database clock)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)  # database clock
