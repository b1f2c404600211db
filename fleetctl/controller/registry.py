"""The node registry: facts, facts history, liveness (heartbeats, offline detection).

Pure bookkeeping over the store; no gRPC here (controller/server.py calls it, and so do
tests directly). Heartbeats are cheap: they touch only memory (``last_seen`` per node)
and the housekeeping loop writes the batch to the database every few seconds, in a worker
thread. Status changes (``online`` ⇄ ``offline``, ``degraded`` set by other components) take
effect in memory at once (``status_of``, the API) and are written with their ``node_events``
rows in the same batches (``flush()`` writes everything pending now).

Liveness is shared through the database, so that several controllers on one database judge every node the
same way (docs/ha.md): the batch that writes a node's ``last_seen`` also renews the node's agent-session lease
(``agent_sessions``: this controller, its session with the agent, ``expires_at`` = the end of the offline
window on the database's clock). Offline is decided in the database, never from one controller's memory: a
liveness round (``sweep``; housekeeping runs it off the loop every flush interval) turns offline the nodes whose
lease has expired — by the database's clock — and takes every node's stored status into memory, so a node that
another controller hears is never turned offline here, and a status another controller wrote shows here too.

Invariants: the hostname of a node is the one bound to its agent's identity at
enrollment — facts claiming another hostname are refused; one hostname belongs to one live
identity; a refused report leaves the registry unchanged.

All methods are meant for the controller's event loop thread, except
``write_last_seen`` and ``write_transitions`` (safe in a worker thread).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import Table, bindparam, case, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from fleetctl.controller.audit import record as audit_record
from fleetctl.controller.enrollment import AgentIdentity
from fleetctl.controller.labels import LabelChanges, LabelSelector, check_label, parse_label_selector
from fleetctl.controller.leases import AgentSession, db_now, holder_id
from fleetctl.controller.node_status import NodeStatus, lease_expired, lease_expiry, liveness
from fleetctl.controller.rollout.core import NodeInfo
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import FactsHistory, Identity, Node, NodeEvent, NodeLabel
from fleetctl.fleet.errors import ConflictError, FactsError, FleetError, NotFoundError
from fleetctl.fleet.facts import NodeFacts, parse_node

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
DEFAULT_MISSED = 3


@dataclass(frozen=True)
class AgentInfo:
    """The agent identity a node is bound to (from enrollment)."""

    agent_id: str
    cert_serial: str
    cert_fingerprint: str
    enrolled_at: dt.datetime | None
    revoked: bool
    revoked_at: dt.datetime | None
    cert_not_after: dt.datetime | None = None  # None: issued before renewal existed (a year after enrolled_at)


@dataclass(frozen=True)
class NodeRecord:
    """A node as the registry hands it out: typed, its facts parsed once from the stored JSON.

    ``facts`` is None when the stored object does not parse (a row written by an older version, or
    corrupted); ``facts_error`` then says why, and ``facts_json`` still holds what is stored so that a page
    can show it. Consumers read ``facts`` attributes, never the JSON."""

    hostname: str
    status: NodeStatus
    last_seen: dt.datetime | None
    status_changed_at: dt.datetime | None
    simulated: bool
    registered_at: dt.datetime
    facts_updated_at: dt.datetime
    agent: AgentInfo | None
    facts: NodeFacts | None
    facts_error: str | None
    facts_json: Mapping[str, Any]
    extra: Mapping[str, Any]  # the agent's probe diagnostics (``NodeFacts.extra`` as reported)
    agent_version: str | None  # as its agent last reported it; None until an agent that reports one does
    labels: Mapping[str, str] = field(default_factory=dict)  # the user's (`fleetctl label`), by key


def read_facts(stored: Any) -> tuple[NodeFacts | None, str | None]:
    """Parse a ``nodes.facts`` value: (facts, None), or (None, what is wrong and what to do)."""
    if not stored:
        return None, "no facts stored for this node; they appear with the agent's next report"
    try:
        return parse_node(stored), None
    except FactsError as exc:
        where = f" at {exc.field}" if exc.field else ""
        return None, (f"stored facts unreadable{where}: {exc.message}; the node's next facts report replaces "
                      f"them (restart its agent to report now)")


def record_of(row: Node, *, status: NodeStatus | None = None, last_seen: dt.datetime | None = None) -> NodeRecord:
    """The typed record of one ``nodes`` row; ``status``/``last_seen`` override the row's (the registry's
    in-memory liveness is newer than the batched writes)."""
    facts, error = read_facts(row.facts)
    ident = row.identity
    agent = None if ident is None else AgentInfo(
        agent_id=ident.id, cert_serial=ident.cert_serial, cert_fingerprint=ident.cert_fingerprint,
        enrolled_at=ident.created_at, revoked=ident.revoked, revoked_at=ident.revoked_at,
        cert_not_after=ident.cert_not_after)
    return NodeRecord(
        hostname=row.hostname, status=status or NodeStatus(row.status), last_seen=last_seen or row.last_seen,
        status_changed_at=row.status_changed_at, simulated=row.simulated, registered_at=row.registered_at,
        facts_updated_at=row.facts_updated_at, agent=agent, facts=facts, facts_error=error,
        facts_json=row.facts or {}, extra=row.extra or {}, agent_version=row.agent_version,
        labels={label.key: label.value for label in row.labels})


@dataclass(frozen=True)
class AgentPulse:
    """What the per-node metrics need of a node's agent, for every node in one query (a scrape reads them all)."""

    last_seen: dt.datetime | None
    enrolled_at: dt.datetime | None  # its agent's identity (None: registered without one)
    agent_version: str | None
    cert_not_after: dt.datetime | None = None  # its agent's certificate (None: as enrolled_at + a year)


def agent_pulses(session: Session) -> dict[str, AgentPulse]:
    """Every node's last heartbeat as written (batched: up to a flush interval old), enrolment time and agent
    version, by hostname."""
    rows = session.execute(select(Node.hostname, Node.last_seen, Identity.created_at, Node.agent_version,
                                  Identity.cert_not_after).outerjoin(Identity, Identity.id == Node.identity_id))
    return {host: AgentPulse(seen, enrolled, version, expiry) for host, seen, enrolled, version, expiry in rows}


def selection_info(node: NodeRecord) -> NodeInfo:
    """What ``--nodes SELECTOR`` and ``-l LABELS`` match a node on (rollouts, verifications, schedules, the attention
    report): its first GPU's model (none when its facts are unreadable), its simulation profile, its status and its
    labels."""
    gpu = node.facts.gpus[0].name if node.facts is not None and node.facts.gpus else None
    profile = node.extra.get("profile")
    return NodeInfo(node.hostname, gpu, profile if isinstance(profile, str) else None, node.status, node.labels)


class HostnameMismatch(FleetError):
    """Facts claim a hostname other than the one enrolled for the reporting identity."""

    code = "hostname-mismatch"
    exit_code = 6


def diff_facts(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Changed fields between two facts objects as ``{dotted.path: (old, new)}``.

    Objects are compared key by key, lists of objects of equal length item by item
    (``gpus[0].name``); anything else (strings, numbers, lists of strings) as a whole.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in list(old.keys()) + [k for k in new if k not in old]:
            path = f"{prefix}.{key}" if prefix else str(key)
            changes.update(diff_facts(old.get(key), new.get(key), path))
    elif (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
          and all(isinstance(x, Mapping) for x in old + new)):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            changes.update(diff_facts(a, b, f"{prefix}[{i}]"))
    elif old != new:
        changes[prefix or "*"] = (old, new)
    return changes


@dataclass
class _Live:
    node_id: int
    identity_id: str | None
    status: NodeStatus
    last_seen: float  # unix time
    facts_requested: bool = False
    session_id: str | None = None  # this controller's session with the node's agent; None: not heard here
    changed: int = 0  # the registry's change count at this node's last status change made here


class Heard(NamedTuple):
    """A node heard since the last batch: what the batch writes (``last_seen``) and renews (its session lease)."""

    node_id: int
    last_seen: float  # unix time, this controller's clock
    session_id: str


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(frozen=True)
class _PendingTransition:
    node_id: int
    old: NodeStatus
    new: NodeStatus
    reason: str
    at: dt.datetime
    last_seen: float


@dataclass(frozen=True)
class Transition:
    hostname: str
    old: NodeStatus
    new: NodeStatus
    reason: str


class StoredNode(NamedTuple):
    """A node's liveness as stored: what a liveness round takes into memory."""

    node_id: int
    hostname: str
    identity_id: str | None
    status: str
    last_seen: dt.datetime | None
    holder: str | None  # the controller holding its agent's session lease (expired or not); None: no lease


@dataclass(frozen=True)
class LivenessView:
    """What a liveness round found in the database (``Registry.judge``): the nodes it turned offline, and every
    node as stored."""

    expired: list[Transition]
    stored: list[StoredNode]


def _silence(now: dt.datetime, last_seen: dt.datetime | None, holder: str | None, expires_at: dt.datetime | None,
             missed: int, interval: float) -> str:
    """Why a node is turned offline, in words: how long it has been silent and whose lease ran out."""
    silent = f"no heartbeat for {(now - last_seen).total_seconds():.1f}s" if last_seen else "never heard"
    if holder is None or expires_at is None:
        return f"{silent} (no agent session)"
    return (f"{silent} (session lease of controller {holder} expired {(now - expires_at).total_seconds():.1f}s "
            f"ago; {missed} × {interval:g}s interval)")


class Registry:
    def __init__(self, store: Store, *, heartbeat_interval: float = DEFAULT_INTERVAL,
                 missed_heartbeats: int = DEFAULT_MISSED, clock: Callable[[], float] = time.time,
                 holder: str | None = None, flush_interval: float = 0.0) -> None:
        self.store = store
        self.interval = heartbeat_interval
        self.missed = missed_heartbeats
        self.clock = clock
        # a lease is renewed by the batches, every flush interval on a housekeeping tick that may come up to one
        # interval late: it lasts that much past the offline window, or a node would expire between two batches
        self.lease_slack = 2 * flush_interval
        self.holder = holder or holder_id()  # this controller, as the holder of its agents' session leases
        self.heartbeats = 0
        self.db_writes = 0  # nodes written by heartbeat flushes, rows by transitions
        self._live: dict[str, _Live] = {}
        # nodes that heartbeated since the last take_dirty (hostname → its _Live): the flush touches only
        # these instead of scanning every node
        self._dirty: dict[str, _Live] = {}
        self._pending: list[_PendingTransition] = []
        self._status_writes = asyncio.Lock()  # set_status_async: its writes land in the order they were made
        self._changes = 0  # status changes made here so far (a liveness round keeps the ones made meanwhile)
        # when the controller started or last recovered from a stall of its own (``stalled``): it judges no node
        # before one full window has passed since, so that its own absence is not blamed on the nodes
        self._resumed_at = self.clock()
        self.on_transition: list[Callable[[Transition], None]] = []
        # (hostname, changed dotted paths) after a stored facts change; e.g. drift re-verification
        self.on_facts_changed: list[Callable[[str, list[str]], None]] = []
        self.load()

    @property
    def node_count(self) -> int:
        return len(self._live)

    @property
    def offline_after(self) -> float:
        return self.interval * self.missed

    def load(self) -> None:
        """(Re)load liveness state from the store (at start)."""
        now = self.clock()
        with self.store.session() as s:
            for row in s.scalars(select(Node)):
                seen = row.last_seen.timestamp() if row.last_seen else now
                self._live[row.hostname] = _Live(row.id, row.identity_id, NodeStatus(row.status), max(seen, now))

    # ---- facts ---------------------------------------------------------------------------

    def report_facts(self, ident: AgentIdentity, facts: NodeFacts, *, simulated: bool = False,
                     agent_version: str | None = None) -> list[str]:
        """Register or update the node of ``ident``; return the changed fields (``["*"]`` when new).

        Blocking (the database, in this thread); the gRPC servicer uses ``report_facts_async``."""
        self._check_hostname(ident, facts)
        stored = self.store_facts(ident, facts, self.take_transitions(), simulated=simulated,
                                  agent_version=agent_version, session_id=self._session_of(ident.hostname))
        return self.apply_facts(ident, *stored)

    async def report_facts_async(self, ident: AgentIdentity, facts: NodeFacts, *, simulated: bool = False,
                                 agent_version: str | None = None) -> list[str]:
        """``report_facts`` with the database work on the store's thread pool (the event loop never waits on it)."""
        self._check_hostname(ident, facts)
        transitions = self.take_transitions()
        try:
            stored = await self.store.call(self.store_facts, ident, facts, transitions, simulated=simulated,
                                           agent_version=agent_version, session_id=self._session_of(ident.hostname))
        except BaseException:
            self.requeue(transitions, [])
            raise
        return self.apply_facts(ident, *stored)

    @staticmethod
    def _check_hostname(ident: AgentIdentity, facts: NodeFacts) -> None:
        if facts.hostname != ident.hostname:
            raise HostnameMismatch(
                f"facts claim hostname {facts.hostname!r} but this agent enrolled as {ident.hostname!r}",
                hint="the enrolled hostname is authoritative; fix the agent's hostname or enroll it anew")

    def _session_of(self, hostname: str) -> str:
        """This controller's session with the agent of ``hostname``: the one it has, else a new one."""
        live = self._live.get(hostname)
        return live.session_id if live is not None and live.session_id else new_session_id()

    def store_facts(self, ident: AgentIdentity, facts: NodeFacts, transitions: list[_PendingTransition], *,
                    simulated: bool = False, agent_version: str | None = None, session_id: str | None = None
                    ) -> tuple[list[str], int, NodeStatus, float, str]:
        """The database half of ``report_facts`` (thread-safe): pending ``transitions`` first (a node's status
        history stays in order), then the node row and its agent-session lease (a report is contact). Returns
        (changed, node id, status, last_seen, session id)."""
        session_id = session_id or new_session_id()
        new_json = facts.to_json()
        extra = dict(facts.extra)
        self.write_transitions(transitions)
        now = utcnow()
        with self.store.session() as s:
            node = s.scalar(select(Node).where(Node.hostname == ident.hostname))
            if node is None:
                node = Node(hostname=ident.hostname, identity_id=ident.agent_id, status=NodeStatus.ONLINE,
                            status_changed_at=now, last_seen=now, facts=new_json, extra=extra,
                            simulated=simulated, registered_at=now, facts_updated_at=now,
                            agent_version=agent_version)
                s.add(node)
                s.flush()
                s.add(FactsHistory(node_id=node.id, at=now, changed=["*"], old={}, new={"*": new_json}))
                s.add(NodeEvent(node_id=node.id, at=now, old_status=None, new_status=NodeStatus.ONLINE,
                                reason="registered"))
                changed = ["*"]
                log.info("node %s registered (agent %s%s)", ident.hostname, ident.agent_id,
                         ", simulated" if simulated else "")
            else:
                if node.identity_id != ident.agent_id:
                    owner = s.get(Identity, node.identity_id) if node.identity_id else None
                    if owner is not None and not owner.revoked:
                        raise ConflictError(
                            f"hostname {ident.hostname} is registered to another agent ({owner.id[:12]})",
                            hint=f"revoke the old agent with `fleetctl agent revoke {ident.hostname}` first")
                    log.info("node %s rebound from agent %s to %s", ident.hostname, node.identity_id,
                             ident.agent_id)
                    node.identity_id = ident.agent_id
                diff = diff_facts(node.facts, new_json)
                changed = sorted(diff)
                if diff:
                    s.add(FactsHistory(node_id=node.id, at=now, changed=changed,
                                       old={k: v[0] for k, v in diff.items()},
                                       new={k: v[1] for k, v in diff.items()}))
                    node.facts = new_json
                    log.info("node %s facts changed: %s", ident.hostname, ", ".join(changed))
                # the facts are current as of now, changed or not: a report that confirms them after an install or
                # rollback that changed nothing (a failed one) makes them fresh (rollout/service.py
                # _refuse_stale_facts would otherwise refuse the node until its facts happen to change)
                node.facts_updated_at = now
                node.extra = extra
                node.simulated = simulated
                node.agent_version = agent_version
                node.last_seen = now
                old_status = NodeStatus(node.status)
                new_status = liveness(old_status, now.timestamp(), now.timestamp(), self.offline_after)
                if new_status != old_status:
                    s.add(NodeEvent(node_id=node.id, at=now, old_status=old_status, new_status=new_status,
                                    reason="facts reported"))
                    node.status = new_status
                    node.status_changed_at = now
            self._renew_sessions(s, [Heard(node.id, self.clock(), session_id)])
            return changed, node.id, NodeStatus(node.status), now.timestamp(), session_id

    def apply_facts(self, ident: AgentIdentity, changed: list[str], node_id: int, status: NodeStatus,
                    seen: float, session_id: str) -> list[str]:
        """The in-memory half of ``report_facts`` (event loop thread): liveness and the facts-change hooks."""
        live = self._live.get(ident.hostname)
        if live is None or live.node_id != node_id:
            self._live[ident.hostname] = _Live(node_id, ident.agent_id, status, seen, session_id=session_id,
                                               changed=self._changes)
        else:
            live.session_id = session_id
            # ``seen`` is when the write began: it may have waited on the database while heartbeats arrived,
            # so it never moves last_seen back (that would turn a heartbeating node offline)
            live.identity_id = ident.agent_id
            live.last_seen = max(live.last_seen, seen)
            if live.status is NodeStatus.OFFLINE:
                live.status = status
        self._dirty.pop(ident.hostname, None)  # last_seen was just written with the facts
        if changed != ["*"] and changed:
            for cb in self.on_facts_changed:
                try:
                    cb(ident.hostname, changed)
                except Exception:
                    log.exception("facts change callback failed")
        return changed

    # ---- liveness ------------------------------------------------------------------------

    def heartbeat(self, ident: AgentIdentity) -> tuple[float, bool]:
        """Record a heartbeat; returns (interval seconds, whether fresh facts are wanted)."""
        live = self._live.get(ident.hostname)
        if live is None or live.identity_id != ident.agent_id:
            raise NotFoundError(f"no node registered for agent {ident.agent_id} ({ident.hostname})",
                                hint="the agent must report its facts (ReportFacts) before heartbeating")
        self.heartbeats += 1
        live.last_seen = self.clock()
        if live.session_id is None:
            live.session_id = new_session_id()
        self._dirty[ident.hostname] = live
        status = liveness(live.status, live.last_seen, live.last_seen, self.offline_after)
        if status != live.status:
            self._transition(ident.hostname, live, status, "heartbeat received")
        wanted = live.facts_requested
        live.facts_requested = False
        return self.interval, wanted

    def request_facts(self, hostname: str) -> None:
        """Ask the node's agent for fresh facts on its next heartbeat (e.g. after a job)."""
        live = self._live.get(hostname)
        if live is not None:
            live.facts_requested = True

    def take_dirty(self) -> list[Heard]:
        """The nodes heartbeating since the last call; clears the marks."""
        dirty, self._dirty = self._dirty, {}
        return [Heard(live.node_id, live.last_seen, live.session_id or new_session_id()) for live in dirty.values()]

    def write_last_seen(self, batch: Sequence[Heard]) -> int:
        """Write a ``take_dirty`` batch — ``last_seen`` and the nodes' session leases, one statement each
        (executemany) in one transaction; thread-safe."""
        if not batch:
            return 0
        table = Node.__table__
        assert isinstance(table, Table)
        stmt = update(table).where(table.c.id == bindparam("b_id")).values(last_seen=bindparam("b_seen"))
        with self.store.session() as s:  # one executemany through Core: far less Python work than the ORM
            self._renew_sessions(s, batch)
            s.execute(stmt, [{"b_id": h.node_id, "b_seen": dt.datetime.fromtimestamp(h.last_seen, dt.UTC)}
                             for h in batch])
        self.db_writes += len(batch)
        return len(batch)

    def _renew_sessions(self, s: Session, batch: Sequence[Heard]) -> None:
        """Renew (or take) the session leases of ``batch``'s nodes to the end of their offline window, on the
        database's clock. A lease is only moved forward: when an agent has moved to another controller, this
        controller's older heartbeat does not take the node back."""
        now, local = db_now(s, self.clock), self.clock()
        table = AgentSession.__table__
        assert isinstance(table, Table)
        ins = (pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert)(table)
        stmt = ins.on_conflict_do_update(
            index_elements=[table.c.node_id],
            set_={"controller_id": ins.excluded.controller_id, "session_id": ins.excluded.session_id,
                  "started_at": case((table.c.session_id == ins.excluded.session_id, table.c.started_at),
                                     else_=ins.excluded.started_at),
                  "expires_at": ins.excluded.expires_at},
            where=ins.excluded.expires_at >= table.c.expires_at)
        window = self.offline_after + self.lease_slack
        s.execute(stmt, [{"node_id": h.node_id, "controller_id": self.holder, "session_id": h.session_id,
                          "started_at": now, "expires_at": lease_expiry(now, local - h.last_seen, window)}
                         for h in batch])

    def flush_last_seen(self) -> int:
        return self.write_last_seen(self.take_dirty())

    def sweep(self) -> list[Transition]:
        """One liveness round in this thread (housekeeping runs the same steps off the loop: controller/server.py):
        write what is pending, ``judge`` in the database, ``apply`` the outcome; returns the status changes."""
        since = self.changes
        self.write_transitions(self.take_transitions())
        self.flush_last_seen()
        return self.apply(self.judge(expire=self.may_expire(), hearing=self.hearing()), since)

    @property
    def changes(self) -> int:
        """Status changes made here so far: what a liveness round began at (``apply``)."""
        return self._changes

    def may_expire(self) -> bool:
        """Whether this controller may judge silent nodes now: a full window has passed since it started or
        recovered from a stall of its own (the heartbeats it missed meanwhile are its fault, not the nodes')."""
        return self.clock() - self._resumed_at >= self.offline_after

    def hearing(self) -> frozenset[int]:
        """The nodes this controller has heard within their offline window (event loop thread): it never turns
        them offline, even when their lease ran out because its renewal waited on the database."""
        since = self.clock() - self.offline_after
        return frozenset(live.node_id for live in self._live.values() if live.last_seen >= since)

    def judge(self, *, expire: bool, hearing: frozenset[int] = frozenset()) -> LivenessView:
        """The database half of a liveness round (thread-safe): with ``expire``, turn offline every node whose
        session lease has expired by the database's clock, except those this controller is ``hearing`` (rows
        locked with SKIP LOCKED: when two controllers judge at once, each node is turned offline by one of them,
        once), then read every node's stored status and lease holder."""
        expired: list[Transition] = []
        with self.store.session() as s:
            now = db_now(s, self.clock)
            if expire:
                rows = s.execute(
                    select(Node.id, Node.hostname, Node.status, Node.last_seen, AgentSession.controller_id,
                           AgentSession.expires_at)
                    .outerjoin(AgentSession, AgentSession.node_id == Node.id)
                    .where(Node.status != NodeStatus.OFFLINE,
                           or_(AgentSession.expires_at.is_(None), AgentSession.expires_at <= now))
                    .with_for_update(of=Node, skip_locked=True)).all()
                for node_id, hostname, status, last_seen, holder, expires_at in rows:
                    if not lease_expired(expires_at, now) or node_id in hearing:
                        continue
                    reason = _silence(now, last_seen, holder, expires_at, self.missed, self.interval)
                    at = utcnow()  # event times are the controllers' clock, like every other node_events row
                    s.execute(update(Node).where(Node.id == node_id)
                              .values(status=NodeStatus.OFFLINE, status_changed_at=at))
                    s.add(NodeEvent(node_id=node_id, at=at, old_status=status, new_status=NodeStatus.OFFLINE,
                                    reason=reason))
                    expired.append(Transition(hostname, NodeStatus(status), NodeStatus.OFFLINE, reason))
            stored = [StoredNode(*row) for row in s.execute(
                select(Node.id, Node.hostname, Node.identity_id, Node.status, Node.last_seen,
                       AgentSession.controller_id).outerjoin(AgentSession, AgentSession.node_id == Node.id))]
        self.db_writes += 2 * len(expired)
        return LivenessView(expired, stored)

    def apply(self, view: LivenessView, since: int) -> list[Transition]:
        """The in-memory half of a liveness round (event loop thread): every node's status as stored, except
        where this controller changed it after the round began (``since`` = ``changes`` then: that change is
        newer than what was read, and the next round writes it); nodes registered through another controller
        join; a node whose lease another controller holds has no session here any more. Returns the status
        changes, those this controller made first; the ``on_transition`` callbacks hear each."""
        made = list(view.expired)
        for tr in view.expired:
            log.warning("node %s: %s → %s (%s)", tr.hostname, tr.old, tr.new, tr.reason)
        mine = {tr.hostname for tr in view.expired}
        for node_id, hostname, identity_id, status, last_seen, holder in view.stored:
            live = self._live.get(hostname)
            if live is None:
                seen = last_seen.timestamp() if last_seen else self.clock()
                self._live[hostname] = _Live(node_id, identity_id, NodeStatus(status), seen, changed=since)
                continue
            if holder is not None and holder != self.holder:
                live.session_id = None
            if live.changed > since or live.status == status:
                continue
            old, live.status = live.status, NodeStatus(status)
            if hostname not in mine:
                log.info("node %s: %s → %s (as stored by another controller)", hostname, old, status)
                made.append(Transition(hostname, old, live.status, "as stored by another controller"))
        for tr in made:
            self._notify(tr)
        return made

    def _transition(self, hostname: str, live: _Live, new: NodeStatus, reason: str) -> Transition:
        """Change status in memory at once; the DB rows follow in the next ``flush`` (batched, so that a
        mass reconnect or a partition does not stall the event loop with thousands of commits)."""
        old = live.status
        live.status = new
        self._changes += 1
        live.changed = self._changes
        self._pending.append(_PendingTransition(live.node_id, old, new, reason, utcnow(), live.last_seen))
        tr = Transition(hostname, old, new, reason)
        log.log(logging.WARNING if new is NodeStatus.OFFLINE else logging.INFO, "node %s: %s → %s (%s)",
                hostname, old, new, reason)
        self._notify(tr)
        return tr

    def _notify(self, tr: Transition) -> None:
        for cb in self.on_transition:
            try:
                cb(tr)
            except Exception:
                log.exception("transition callback failed")

    def take_transitions(self) -> list[_PendingTransition]:
        batch, self._pending = self._pending, []
        return batch

    def requeue(self, transitions: list[_PendingTransition], batch: Sequence[Heard]) -> None:
        """Put back what a failed flush took (event loop thread): the next flush writes it again. Liveness in
        memory is untouched: a slow or failing database never turns a heartbeating node offline."""
        self._pending[:0] = transitions
        if batch:
            ids = {h.node_id for h in batch}
            for hostname, live in self._live.items():
                if live.node_id in ids:
                    self._dirty.setdefault(hostname, live)

    def stalled(self, seconds: float) -> None:
        """The controller itself could not receive heartbeats for ``seconds`` (its event loop was held up):
        like after a restart, every node gets one full window from now before the sweep may call it offline,
        so that the controller's stall is not blamed on the nodes."""
        self._resumed_at = self.clock()
        log.warning("controller stalled %.1fs: offline detection restarts its window", seconds)

    def write_transitions(self, batch: list[_PendingTransition]) -> int:
        """Write status changes and their ``node_events`` rows (thread-safe)."""
        if not batch:
            return 0
        with self.store.session() as s:
            s.execute(update(Node), [{"id": t.node_id, "status": t.new, "status_changed_at": t.at,
                                      "last_seen": dt.datetime.fromtimestamp(t.last_seen, dt.UTC)} for t in batch])
            s.add_all([NodeEvent(node_id=t.node_id, at=t.at, old_status=t.old, new_status=t.new, reason=t.reason)
                       for t in batch])
        self.db_writes += 2 * len(batch)
        return len(batch)

    def flush(self) -> int:
        """Write everything pending (transitions, then last_seen) now, in this thread."""
        return self.write_transitions(self.take_transitions()) + self.flush_last_seen()

    def set_status(self, hostname: str, status: NodeStatus, reason: str) -> Transition | None:
        """Set a node's status (e.g. ``degraded`` after a failed verification); None if unchanged. Blocking (the
        database, in this thread); on the event loop use ``set_status_async``."""
        tr = self._set_status(hostname, status, reason)
        if tr is not None:
            self.write_transitions(self.take_transitions())  # rare and deliberate: persist at once
        return tr

    async def set_status_async(self, hostname: str, status: NodeStatus, reason: str) -> Transition | None:
        """``set_status`` with the write on the store's thread pool: in memory at once, in the database when it
        returns, and the event loop — every heartbeat — never waits on the database meanwhile (a verification
        failing on each of 1,000 nodes wrote 1,000 times on the loop). A failed write is put back for the next
        flush, and raises."""
        tr = self._set_status(hostname, status, reason)
        if tr is None:
            return None
        async with self._status_writes:  # two changes of one node are not written in the wrong order
            transitions = self.take_transitions()
            try:
                await self.store.call(self.write_transitions, transitions)
            except BaseException:
                self.requeue(transitions, [])
                raise
        return tr

    def _set_status(self, hostname: str, status: NodeStatus, reason: str) -> Transition | None:
        live = self._live.get(hostname)
        if live is None:
            raise NotFoundError(f"no node named {hostname!r}", hint="see `fleetctl nodes`")
        if live.status == status:
            return None
        return self._transition(hostname, live, status, reason)

    def counts(self) -> dict[NodeStatus, int]:
        """How many nodes are in each status now (from memory: newer than the batched writes); every status
        is a key, zero included."""
        counts = dict.fromkeys(NodeStatus, 0)
        for live in self._live.values():
            counts[live.status] += 1
        return counts

    def status_of(self, hostname: str) -> NodeStatus | None:
        live = self._live.get(hostname)
        return live.status if live else None

    def forget_identity(self, agent_id: str) -> None:
        """After revocation: the node stays, but heartbeats from that identity stop matching."""
        for hostname, live in self._live.items():
            if live.identity_id == agent_id:
                live.identity_id = None
                if live.status is not NodeStatus.OFFLINE:
                    self._transition(hostname, live, NodeStatus.OFFLINE, f"agent identity {agent_id} revoked")

    # ---- reading -------------------------------------------------------------------------

    def _record(self, row: Node) -> NodeRecord:
        live = self._live.get(row.hostname)  # memory is newer than the batched writes
        if live is None:
            return record_of(row)
        seen = dt.datetime.fromtimestamp(live.last_seen, dt.UTC)
        if row.last_seen is not None and row.last_seen > seen:  # heard by another controller since
            seen = row.last_seen
        return record_of(row, status=live.status, last_seen=seen)

    def records(self) -> list[NodeRecord]:
        """Every node, by hostname."""
        with self.store.session() as s:
            return [self._record(r) for r in s.scalars(select(Node).order_by(Node.hostname))]

    def record(self, hostname: str) -> NodeRecord:
        with self.store.session() as s:
            row = s.scalar(select(Node).where(Node.hostname == hostname))
            if row is None:
                raise NotFoundError(f"no node named {hostname!r}", hint="see `fleetctl nodes` for registered nodes")
            return self._record(row)

    # ---- labels (the user's: `fleetctl label`, `-l SELECTOR`) -----------------------------------------------

    def select(self, selector: LabelSelector | str | None) -> list[NodeRecord]:
        """Every node whose labels the label selector (``-l``; controller/labels.py) matches, by hostname; an
        empty list when none does (listing is not an error; rollouts and verifications say so themselves)."""
        chosen = selector if isinstance(selector, LabelSelector) else parse_label_selector(selector)
        return [r for r in self.records() if chosen.matches(r.labels)]

    def labels_of(self, hostname: str) -> dict[str, str]:
        """The node's user labels (``NotFoundError`` for an unknown node)."""
        return dict(self.record(hostname).labels)

    def set_labels(self, hostname: str, changes: LabelChanges, actor: str) -> dict[str, str]:
        """Apply ``fleetctl label`` changes in one transaction with their audit row; returns the node's labels
        after them. Every label is checked first (a bad one changes nothing); removing a label the node does not
        have is no error, as in kubectl."""
        for key, value in changes.set.items():
            check_label(key, value)
        with self.store.session() as s:
            node = s.scalar(select(Node).where(Node.hostname == hostname))
            if node is None:
                raise NotFoundError(f"no node named {hostname!r}", hint="see `fleetctl nodes` for registered nodes")
            current = {label.key: label for label in node.labels}
            for key, value in changes.set.items():
                if key in current:
                    current[key].value = value
                else:
                    node.labels.append(NodeLabel(key=key, value=value))
            for key in changes.remove:
                if key in current:
                    node.labels.remove(current[key])
            audit_record(s, actor, "node.label", hostname, {"set": dict(changes.set), "removed": list(changes.remove)})
            s.flush()
            return {label.key: label.value for label in sorted(node.labels, key=lambda label: label.key)}

    def history(self, hostname: str, *, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        """The node's facts changes (``history``) and status transitions (``status_history``), newest first."""
        self.write_transitions(self.take_transitions())  # status history must include what memory knows
        with self.store.session() as s:
            node_id = s.scalar(select(Node.id).where(Node.hostname == hostname))
            if node_id is None:
                raise NotFoundError(f"no node named {hostname!r}", hint="see `fleetctl nodes` for registered nodes")
            hist = s.scalars(select(FactsHistory).where(FactsHistory.node_id == node_id)
                             .order_by(FactsHistory.at.desc(), FactsHistory.id.desc()).limit(limit))
            events = s.scalars(select(NodeEvent).where(NodeEvent.node_id == node_id)
                               .order_by(NodeEvent.at.desc(), NodeEvent.id.desc()).limit(limit))
            return {
                "history": [{"at": h.at.isoformat(), "changed": h.changed, "old": h.old, "new": h.new} for h in hist],
                "status_history": [{"at": e.at.isoformat(), "old": e.old_status, "new": e.new_status,
                                    "reason": e.reason} for e in events]}
