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
* ``leases`` — leader leases of background duties (``acquire``, ``release``): one holder per name until
  ``expires_at``, and a fencing token that grows by one each time the lease changes hands. A write guarded by
  ``fence(name, token, now)`` does nothing once another controller holds the lease, so a holder that stalled past
  its expiry cannot overwrite its successor's work. A row is made by its first ``acquire`` with a token from the
  database's clock (milliseconds), not 0: the cleanup duty removes rows nobody renewed for a day
  (controller/cleanup.py), and a row made again must not hand out a token an old holder of it had (it would, unless
  the lease changed hands more than once a millisecond on average). ``LeaderDuty`` runs a duty only while its
  controller holds the lease and cancels it the moment a renewal fails (the composition root, controller/app.py,
  runs it as a part like every other loop).

A leader whose work is more than one write (the rollout engine: every rollout its own lease ``rollout:<id>``,
docs/ha.md) opens each unit of work with ``hold_lease(session, held)``: a conditional UPDATE of its lease row that
counts one row or raises ``LeaseLost``, and keeps the row locked until the unit commits, so a takeover lands
before the unit or after it, never inside. ``next_term`` is the one rule of how long a holder may act on what an
``acquire`` told it (``LeaderDuty`` and the engine both follow it); ``holder_gone`` lets a lease whose holder died
on this host be taken at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, ForeignKey, String, Table, case, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from fleetctl.controller.store import Store
from fleetctl.controller.store.models import Base
from fleetctl.fleet.errors import FleetError

log = logging.getLogger(__name__)


def holder_id() -> str:
    """This process as a lease holder: ``host:pid:nonce``."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_gone(holder: str) -> bool:
    """True when ``holder`` (a ``holder_id()``) names a process of this host that no longer exists: its lease may be
    taken at once (``acquire``'s ``gone``), a controller restarted on the same host need not wait out the TTL. A
    holder on another host is never known to be gone: the expiry of its lease decides."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:64] or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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


class Lease(Base):
    """A leader lease: which controller runs the background duty ``name`` until ``expires_at`` (database clock)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # "verify-scheduler", "rollout:<id>", …
    holder: Mapped[str | None] = mapped_column(String(128))  # ``holder_id()``; None: released
    token: Mapped[int] = mapped_column(BigInteger, default=0)  # fencing token: +1 whenever a new holder takes it
    acquired_at: Mapped[dt.datetime | None]  # when the current holder took it (database clock)
    expires_at: Mapped[dt.datetime | None]  # database clock


@dataclass(frozen=True)
class Held:
    """A lease as its holder got it: the fencing token its writes carry, and until when it holds."""

    name: str
    holder: str
    token: int
    expires_at: dt.datetime


class LeaseLost(FleetError):
    """A leader's lease is no longer its own: another holder took it over, or it expired. The unit of work that
    found out wrote nothing (its transaction rolls back), and its leader stops acting under that lease."""

    code = "lease-lost"


@dataclass(frozen=True)
class Term:
    """How long a holder may act on a lease it got: ``held`` as ``acquire`` answered, until ``valid_until`` by the
    holder's own monotonic clock (``next_term``)."""

    held: Held
    valid_until: float


def next_term(term: Term | None, got: Held | None, asked_at: float, answered_at: float, ttl: float) -> Term | None:
    """The holder's term after an ``acquire`` asked at ``asked_at`` answered ``got`` at ``answered_at`` (the holder's
    monotonic clock; ``got`` None: refused, or the call failed or was given up). Pure.

    None — the holder must stop acting at once — when the lease was refused, when the answer came after the term
    it renews had run out or after the new one would, and when the token changed (another holder had the lease in
    between: whatever the old term started is not this term's). Otherwise a term — the same one renewed, or a first
    one — that ends ``ttl`` after the call was *asked*: the database set the expiry ``ttl`` after its own now, which
    came later, so the holder stops before the database lets anyone else in. A term that ended starts again at the
    next ``acquire`` that succeeds."""
    if got is None or answered_at >= asked_at + ttl:
        return None
    if term is not None and (got.token != term.held.token or answered_at >= term.valid_until):
        return None
    return Term(got, asked_at + ttl)


def _table() -> Table:
    table = Lease.__table__
    assert isinstance(table, Table)
    return table


def acquire(session: Session, name: str, holder: str, ttl: float,
            local_clock: Callable[[], float] = time.time, *, gone: str | None = None) -> Held | None:
    """Take lease ``name`` for ``ttl`` seconds, or renew it when ``holder`` has it; None while another holder's
    lease runs. Taking it from another holder (expired) or after a release bumps the fencing token; a renewal
    keeps it. One conditional UPDATE: of two controllers racing for an expired lease exactly one gets it.
    ``gone``: a holder the caller knows is dead (``holder_gone``), whose lease is taken without waiting for its
    expiry — only while that holder still has it."""
    now = db_now(session, local_clock)
    table = _table()
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    first_token = int(now.timestamp() * 1000)  # above any token of an earlier row of this name (module docstring)
    session.execute(insert(table).values(name=name, token=first_token)
                    .on_conflict_do_nothing(index_elements=[table.c.name]))
    mine = table.c.holder == holder
    expires = now + dt.timedelta(seconds=ttl)
    token = session.scalar(
        update(table)
        .where(table.c.name == name, or_(mine, table.c.holder.is_(None), table.c.expires_at <= now,
                                         *([table.c.holder == gone] if gone else [])))
        .values(holder=holder, expires_at=expires, token=case((mine, table.c.token), else_=table.c.token + 1),
                acquired_at=case((mine, table.c.acquired_at), else_=now))
        .returning(table.c.token))
    return None if token is None else Held(name, holder, int(token), expires)


def release(session: Session, held: Held) -> bool:
    """Give lease ``held`` up now (a clean stop: the next controller need not wait for the expiry); False when it
    had already passed to another holder."""
    table = _table()
    result = session.execute(update(table).where(table.c.name == held.name, table.c.holder == held.holder,
                                                 table.c.token == held.token)
                             .values(holder=None, expires_at=None))
    return bool(getattr(result, "rowcount", 0))


def hold_lease(session: Session, held: Held, local_clock: Callable[[], float] = time.time) -> None:
    """Fence the caller's transaction with lease ``held``; call it before the transaction's first write. One
    conditional UPDATE of the lease row, matching only while ``held``'s holder still has it with ``held``'s token,
    unexpired (database clock). 0 rows: ``LeaseLost`` — the transaction rolls back, nothing it meant to write is
    written. 1 row: the row stays locked until the transaction ends (PostgreSQL: the row's lock; SQLite: the
    database's write lock), so a takeover (an UPDATE of that row) commits after this transaction or before this
    check, never between the check and the writes it guards: the next holder reads them, and this holder's next
    transaction finds the lease gone."""
    now = db_now(session, local_clock)
    table = _table()
    result = session.execute(update(table).where(table.c.name == held.name, table.c.holder == held.holder,
                                                 table.c.token == held.token, table.c.expires_at > now)
                             .values(token=table.c.token))
    if getattr(result, "rowcount", 0) != 1:
        raise LeaseLost(f"lease {held.name} (token {held.token}) is no longer held by {held.holder}: another holder "
                        "took it over, or it expired", hint="nothing to do: whoever holds it now carries on")


def fence(name: str, token: int, now: dt.datetime) -> ColumnElement[bool]:
    """The condition a leader's write adds to its WHERE: lease ``name`` is still held with ``token`` and has not
    expired at ``now`` (``db_now``). After another controller took the lease over, the write matches nothing."""
    table = _table()
    return exists().where(table.c.name == name, table.c.token == token, table.c.expires_at > now)


class LeaderDuty:
    """Runs ``duty(held)`` only while this controller holds lease ``name``: tries to take it every third of
    ``ttl``, renews it as often while the duty runs, and cancels the duty at once when a renewal is refused
    (another holder), fails, or cannot finish before the lease would expire by this controller's own clock.
    Then it tries again, so a controller whose database came back takes its turn later. A duty that ends by
    itself ends ``run`` with it (the composition root treats a loop's end as a failure)."""

    def __init__(self, store: Store, name: str, duty: Callable[[Held], Coroutine[Any, Any, None]], *,
                 holder: str, ttl: float) -> None:
        self.store = store
        self.name = name
        self.duty = duty
        self.holder = holder
        self.ttl = ttl
        self.every = ttl / 3
        self.held: Held | None = None  # while the duty runs
        self.terms = 0  # how many times this controller took the lease
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def _acquire(self, within: float) -> Held | None:
        """``acquire`` off the event loop, given up after ``within`` seconds (None: not held, whatever the
        database later does with the abandoned call)."""
        def take() -> Held | None:
            with self.store.session() as s:
                return acquire(s, self.name, self.holder, self.ttl)

        try:
            return await asyncio.wait_for(asyncio.shield(self.store.call(take)), max(0.01, within))
        except TimeoutError:
            log.warning("lease %s: the database did not answer within %.1fs", self.name, within)
        except Exception as exc:
            log.warning("lease %s: %s", self.name, getattr(exc, "message", exc))
        return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            term = next_term(None, await self._acquire(self.every), started, loop.time(), self.ttl)
            if term is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), max(0.0, self.every - (loop.time() - started)))
                continue
            held = term.held
            self.held, self.terms = held, self.terms + 1
            log.info("lease %s taken (token %d): this controller runs it", self.name, held.token)
            task = self._task = asyncio.create_task(self.duty(held), name=f"{self.name} (leader, token {held.token})")
            try:
                while True:
                    await asyncio.wait({task}, timeout=max(0.0, min(self.every, term.valid_until - loop.time())))
                    if self._stopping.is_set():
                        return
                    if task.done():
                        return task.result()  # the duty ended by itself: so does this part (its error with it)
                    asked = loop.time()
                    renewed = next_term(term, await self._acquire(term.valid_until - asked), asked, loop.time(),
                                        self.ttl)
                    if renewed is None:
                        log.warning("lease %s lost (token %d): the duty stopped at once; another controller may "
                                    "take it over", self.name, held.token)
                        break
                    term = renewed
            finally:
                self.held, self._task = None, None
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def stop(self) -> None:
        """Stop the duty and release the lease (a clean stop: another controller need not wait for the expiry)."""
        self._stopping.set()
        held, task = self.held, self._task
        if task is not None:
            task.cancel()
        if held is None:
            return

        def give_up() -> bool:
            with self.store.session() as s:
                return release(s, held)

        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.call(give_up), 2.0)
