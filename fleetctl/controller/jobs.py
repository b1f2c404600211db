"""In-process job dispatcher: persist jobs, push them to agents, record events and results.

A job is one unit of work for one node's agent (a playbook run, a verification); its spec, outcome
and statuses are ``fleet.jobs`` (shared with the agent). The dispatcher is the only writer of the
``jobs`` and ``job_events`` tables. Life of a job::

    pending ──(sent on the agent's Jobs stream)──► dispatched ──(first event)──► running
       └───────────────► successful | failed | timeout | canceled ◄──────────────┘
                                         ▲                                  │
                                         └──(agent restarted without it)────┘  "interrupted"

API for controller code (rollouts, verification, scheduler)::

    jobs: JobDispatcher = ctx.jobs                      # one per controller process
    job_id = await jobs.submit_job("node-1", "install-wheel", {"wheel_sha256": ...}, timeout=1800)
    spec = jobs.insert_job(session, "node-1", "verify", {})   # or: in the caller's own transaction (a rollout
    jobs.offer("node-1", spec)                         #   step records it with its state), offered once committed
    outcome = await jobs.wait(job_id)                  # JobOutcome(status, rc, result, error)
    jobs.add_done_callback(job_id, lambda o: ...)      # or a callback (called in the loop)
    jobs.add_event_listener(lambda ev: ...)            # every JobEventRecord, e.g. for live views
    jobs.cancel(job_id)                                # pending/dispatched/running → canceled
    jobs.get(job_id)                                   # the job as a JSON-ready dict (with events)

A job submitted for a node whose agent is not connected waits (``pending``) and is sent when
the agent opens its ``Jobs`` stream. A job still not finished ``timeout`` seconds after it
was dispatched (plus ``GRACE_SECONDS``) is marked ``timeout`` by the watchdog
(``run_watchdog``, started by the controller). The agent side (controller/server.py) calls
``stream_for``, ``record_events`` and ``complete``.

Interrupted jobs. An agent opening its ``Jobs`` stream says which job ids its process still
holds (``held``: jobs it received and has not reported back yet — the playbook is running, or
its result is not delivered yet; agent/client.py keeps them in memory only). Every job of that
node in ``running`` that the agent does not hold belongs to an agent process that is gone (it
was killed, restarted, the machine rebooted): its result can never come. ``stream_for`` finishes
it at once as ``failed`` with ``interrupted: …`` (``INTERRUPTED_ERROR``) and a controller-side
job event ``fleet_job_interrupted``, through ``_finish`` like any result (waiters, done callbacks
— the rollout engine — and the registry hook fire), instead of leaving it to the watchdog (a
build's deadline is hours). ``dispatched`` jobs are not touched: no event of theirs arrived, so
the agent may never have received them, and they are re-sent on the new stream as before
(playbooks are idempotent). An agent that merely reconnects (same process) holds its running
jobs, so they are left alone; one that says nothing (``held=None``: agents that predate the
field) changes nothing either. A late result for a job already finished is ignored (``_finish``). The jobs an agent
holds are re-attached to the controller its stream opens on — it may be another than the one that dispatched them
(agent fail-over, docs/ha.md): that controller's watchdog adopts their deadlines, and it records their remaining
events and result like its own (idempotent: below).

Several controllers on one database (docs/ha.md). A job may be submitted through any controller; its agent is
connected to one. Every watchdog tick (1 s) each controller claims the ``pending`` jobs of the agents connected to
it (``claim_pending``: ``FOR UPDATE SKIP LOCKED`` and a conditional ``pending → dispatched``, so exactly one
controller claims a job) and puts them on their streams; and it resolves its waiters and done callbacks of jobs
another controller finished (``finished_elsewhere``) — that controller received the result and recorded it, once,
and ran the finished-job hook. Polling, not ``LISTEN/NOTIFY``: it needs no connection held open per controller,
survives a dropped connection or a PostgreSQL restart without losing a wake-up, works on SQLite too, and its cost
is two indexed queries a second per controller; the price is up to a second of dispatch latency for a job
submitted through another controller (a job for an agent of this controller is still pushed at once).

All methods must be called from the controller's event loop thread. The agent-facing ones
(``stream_for``, ``record_events_async``, ``complete_async``, ``submit_job``) and the watchdog do their
database work on the store's thread pool (``Store.call``), so that a slow or locked database delays
those calls only, never the event loop; writes are retried on transient failures (``Store.write``)
and idempotent: events by (job, counter), a result by the job's status (only an unfinished job takes one).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import Job, JobEvent, Node
from fleetctl.fleet.errors import ConflictError, InputError, NotFoundError
from fleetctl.fleet.jobs import FINISHED, JobOutcome, JobSpec, JobStatus

log = logging.getLogger(__name__)

# sent to no agent process yet that reported on it: re-sent when the node's agent (re)opens its stream
_UNSENT = (JobStatus.PENDING, JobStatus.DISPATCHED)
GRACE_SECONDS = 30
INTERRUPTED_EVENT = "fleet_job_interrupted"
INTERRUPTED_ERROR = ("interrupted: the agent on {node} restarted before reporting this job's result, and its new "
                     "process does not have the job, so none will come (the playbook ended with the old process "
                     "or is no longer watched). Not retried by itself: a rollout fails the step within its failure "
                     "budget (`fleetctl rollout resume ID --retry-failed` reruns it). Events: `fleetctl job {job_id}`")
MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_EVENT_DATA_CHARS = 64 * 1024


@dataclass(frozen=True)
class JobEventRecord:
    job_id: str
    counter: int
    event: str
    data: Mapping[str, Any]
    created: dt.datetime


DoneCallback = Callable[[JobOutcome], None]
EventListener = Callable[[JobEventRecord], None]
#: a check run first in the transaction that finishes a job (a leader's lease: controller/leases.py ``hold_lease``);
#: it raises to refuse, and nothing is written
Fence = Callable[[Session], None]


def status_counts(session: Session) -> dict[str, int]:
    """How many jobs are in each status (pending and dispatched: the queue)."""
    return {str(status): int(n) for status, n in session.execute(select(Job.status, func.count())
                                                                  .group_by(Job.status))}


def run_spans(session: Session) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """(kind, started, finished) of every job that ran to an end."""
    rows = session.execute(select(Job.kind, Job.started_at, Job.finished_at).where(Job.finished_at.is_not(None),
                                                                                 Job.started_at.is_not(None)))
    return [(kind, started, finished) for kind, started, finished in rows
            if started is not None and finished is not None]  # (the query's filter, for the type checker)


def job_to_json(row: Job, events: Iterable[JobEvent] = ()) -> dict[str, Any]:
    def iso(t: dt.datetime | None) -> str | None:
        return t.isoformat() if t else None

    return {
        "id": row.id, "node": row.node, "kind": row.kind, "vars": row.vars, "status": row.status,
        "timeout_seconds": row.timeout_seconds, "created_at": iso(row.created_at),
        "dispatched_at": iso(row.dispatched_at), "started_at": iso(row.started_at),
        "finished_at": iso(row.finished_at), "rc": row.rc, "result": row.result, "error": row.error,
        "events": [{"counter": e.counter, "event": e.event, "data": e.data, "created": e.created.isoformat()}
                   for e in events],
    }


class JobDispatcher:
    """Jobs in the store plus the live ``Jobs`` streams of connected agents."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._streams: dict[str, asyncio.Queue[JobSpec | None]] = {}
        self._futures: dict[str, asyncio.Future[JobOutcome]] = {}
        self._callbacks: dict[str, list[DoneCallback]] = {}
        self._listeners: list[EventListener] = []
        self._deadlines: dict[str, dt.datetime] = {}
        self.on_job_finished: Callable[[str, JobOutcome], None] | None = None  # (node, outcome); registry hook

    # ---- submitting and waiting ------------------------------------------------------------

    async def submit_job(self, node: str, kind: str, vars: Mapping[str, Any] | None = None,
                         timeout: int = 3600) -> str:
        """Persist a job for ``node`` and push it to the node's agent if connected. Returns the job id."""
        job_id = uuid.uuid4().hex
        spec = await self.store.call(self.store.write, lambda s: self.insert_job(s, node, kind, vars, timeout,
                                                                                 job_id=job_id),
                                     what=f"job {job_id} submit")
        self.offer(node, spec)
        return job_id

    def insert_job(self, s: Session, node: str, kind: str, vars: Mapping[str, Any] | None = None,
                   timeout: int = 3600, *, job_id: str | None = None) -> JobSpec:
        """A ``pending`` job for ``node`` in the caller's transaction (blocking): it exists once that commits, and
        is then sent to the node's agent by ``offer``, or within a watchdog tick by whichever controller holds the
        agent (``claim_pending``). ``job_id``: the id to use, so that a retry after a commit whose answer was lost
        inserts nothing twice."""
        if not kind or len(kind) > 64:
            raise InputError(f"bad job kind {kind!r}", hint="use a playbook name such as install-wheel")
        if not 1 <= timeout <= MAX_TIMEOUT_SECONDS:
            raise InputError(f"job timeout {timeout}s out of range", hint=f"use 1..{MAX_TIMEOUT_SECONDS} seconds")
        if s.scalar(select(Node.id).where(Node.hostname == node)) is None:
            raise NotFoundError(f"no node named {node!r}", hint="see `fleetctl nodes` for registered nodes")
        job_id = job_id or uuid.uuid4().hex
        if s.get(Job, job_id) is None:
            s.add(Job(id=job_id, node=node, kind=kind, vars=dict(vars or {}), timeout_seconds=timeout,
                      status=JobStatus.PENDING, created_at=utcnow()))
        return JobSpec(job_id, kind, dict(vars or {}), timeout)

    def offer(self, node: str, spec: JobSpec) -> None:
        """A committed job (``insert_job``) to its node's agent at once, when the agent is connected here."""
        log.info("job %s (%s) submitted for %s", spec.job_id, spec.kind, node)
        queue = self._streams.get(node)
        if queue is not None:
            queue.put_nowait(spec)

    def _future(self, job_id: str) -> asyncio.Future[JobOutcome]:
        fut = self._futures.get(job_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._futures[job_id] = fut
        return fut

    async def wait(self, job_id: str, timeout: float | None = None) -> JobOutcome:
        """Wait for the job to finish and return its outcome (``asyncio.TimeoutError`` after ``timeout``).

        The look in the store runs on the store's pool (a locked database must not stall the loop); the
        future is registered *before* it, so a finish that lands while we look still wakes this waiter."""
        fut = self._future(job_id)  # left registered if the look fails: the job's finish resolves it
        outcome = await self.store.call(self.outcome, job_id)
        if outcome is not None:
            # finished before we looked (another process, or before a restart): wake any other waiter too
            if self._futures.get(job_id) is fut:
                self._futures.pop(job_id, None)
            if not fut.done():
                fut.set_result(outcome)
            return outcome
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    def add_done_callback(self, job_id: str, callback: DoneCallback) -> None:
        """Call ``callback(outcome)`` when the job finishes (at once if it already has)."""
        outcome = self.outcome(job_id)
        if outcome is not None:
            callback(outcome)
        else:
            self._callbacks.setdefault(job_id, []).append(callback)

    def add_event_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every job event recorded (all jobs)."""
        self._listeners.append(listener)

    def outcome(self, job_id: str) -> JobOutcome | None:
        """The outcome if the job has finished, else None; ``NotFoundError`` for an unknown job."""
        with self.store.session() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id!r}", hint="check the job id")
            if row.status not in FINISHED:
                return None
            return JobOutcome(row.id, JobStatus(row.status), row.rc, row.result or {}, row.error)

    def get(self, job_id: str, *, events: bool = True) -> dict[str, Any]:
        """The job (and its events) as a JSON-ready dict."""
        with self.store.session() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id!r}", hint="check the job id (`fleetctl job ID`)")
            evs: list[JobEvent] = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                                  .order_by(JobEvent.counter))) if events else []
            return job_to_json(row, evs)

    def list_jobs(self, node: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self.store.session() as s:
            q = select(Job).order_by(Job.created_at.desc()).limit(limit)
            if node:
                q = q.where(Job.node == node)
            return [job_to_json(r) for r in s.scalars(q)]

    def cancel(self, job_id: str, reason: str = "canceled by operator") -> JobOutcome:
        """Mark an unfinished job canceled (the agent is not interrupted yet; its late result is ignored)."""
        outcome = JobOutcome(job_id, JobStatus.CANCELED, None, {}, reason)
        self._finish(job_id, outcome, node=None)
        return outcome

    async def cancel_async(self, job_id: str, reason: str = "canceled by operator", *,
                           fence: Fence | None = None) -> JobOutcome:
        """``cancel`` with the database work on the store's thread pool (``ConflictError`` if already finished).
        ``fence``: run first in the cancel's transaction; what it raises propagates, and the job is left as it was."""
        outcome = JobOutcome(job_id, JobStatus.CANCELED, None, {}, reason)
        await self.finish_async(job_id, outcome, node=None, fence=fence)
        return outcome

    # ---- agent side ----------------------------------------------------------------------

    def connected(self, node: str) -> bool:
        return node in self._streams

    async def stream_for(self, node: str, held: Collection[str] | None = None) -> AsyncGenerator[JobSpec, None]:
        """Jobs for ``node``'s agent: unfinished ones first (re-delivery), then new ones as submitted.

        ``held``: the job ids the agent process still holds (see the module docstring); when given,
        the node's ``running`` jobs not among them are failed as interrupted before anything is sent.
        None (an agent that does not say) leaves them to the watchdog. A newer stream for the same
        node ends the older one. Agents deduplicate by job id.
        """
        old = self._streams.get(node)
        if old is not None:
            old.put_nowait(None)
        queue: asyncio.Queue[JobSpec | None] = asyncio.Queue()
        self._streams[node] = queue
        try:
            if held is not None:
                await self.interrupt_unheld_async(node, held)
            if held:
                # re-attached (the agent moved here from another controller, or this controller restarted): this
                # controller's watchdog now times them out too, at the deadline their dispatch set
                for job_id, due in (await self.store.call(self._held_deadlines, node, held)).items():
                    self._deadlines.setdefault(job_id, due)
            backlog = await self.store.call(self._backlog, node)
            for pending in backlog:
                queue.put_nowait(pending)
            sent: set[str] = set()
            while True:
                spec = await queue.get()
                if spec is None:
                    return
                if spec.job_id in sent:
                    continue
                deadline = await self.store.call(self._dispatch_db, spec)
                if deadline is None:
                    continue
                self._deadlines[spec.job_id] = deadline
                log.info("job %s dispatched to %s", spec.job_id, node)
                sent.add(spec.job_id)
                yield spec
        finally:
            if self._streams.get(node) is queue:
                del self._streams[node]

    def _held_deadlines(self, node: str, held: Collection[str]) -> dict[str, dt.datetime]:
        """The deadlines of ``node``'s unfinished jobs among ``held`` (thread-safe)."""
        with self.store.session() as s:
            rows = s.scalars(select(Job).where(Job.node == node, Job.id.in_(list(held)),
                                               Job.status.in_((JobStatus.DISPATCHED, JobStatus.RUNNING))))
            return {r.id: (r.dispatched_at or r.created_at) + dt.timedelta(seconds=r.timeout_seconds + GRACE_SECONDS)
                    for r in rows}

    def _backlog(self, node: str) -> list[JobSpec]:
        with self.store.session() as s:
            rows = s.scalars(select(Job).where(Job.node == node, Job.status.in_(_UNSENT))
                             .order_by(Job.created_at)).all()
            return [JobSpec(r.id, r.kind, r.vars, r.timeout_seconds) for r in rows]

    async def interrupt_unheld_async(self, node: str, held: Collection[str]) -> list[str]:
        """``interrupt_unheld`` with the database work on the store's thread pool."""
        keep = set(held)
        lost = await self.store.call(self._running_ids, node)
        interrupted: list[str] = []
        for job_id in lost:
            if job_id in keep:
                continue
            error = INTERRUPTED_ERROR.format(node=node, job_id=job_id)
            event = await self.store.call(self._controller_event_db, job_id, INTERRUPTED_EVENT, {
                "node": node, "reason": "the agent's new process does not hold this job",
                "held_job_ids": sorted(keep)[:50]})
            if event is None:  # finished meanwhile
                continue
            self._notify([event])
            log.warning("job %s on %s interrupted: the agent restarted without it", job_id, node)
            await self.finish_async(job_id, JobOutcome(job_id, JobStatus.FAILED, None, {"interrupted": True}, error),
                                    node=node)
            interrupted.append(job_id)
        return interrupted

    def _running_ids(self, node: str) -> list[str]:
        with self.store.session() as s:
            return list(s.scalars(select(Job.id).where(Job.node == node, Job.status == JobStatus.RUNNING)
                                  .order_by(Job.created_at)))

    def interrupt_unheld(self, node: str, held: Collection[str]) -> list[str]:
        """Fail ``node``'s ``running`` jobs that its (re)started agent does not hold; returns their ids."""
        keep = set(held)
        with self.store.session() as s:
            lost = [r.id for r in s.scalars(select(Job).where(Job.node == node, Job.status == JobStatus.RUNNING)
                                            .order_by(Job.created_at)) if r.id not in keep]
        interrupted: list[str] = []
        for job_id in lost:
            error = INTERRUPTED_ERROR.format(node=node, job_id=job_id)
            event = self._controller_event(job_id, INTERRUPTED_EVENT, {
                "node": node, "reason": "the agent's new process does not hold this job",
                "held_job_ids": sorted(keep)[:50]})
            if event is None:  # finished meanwhile
                continue
            log.warning("job %s on %s interrupted: the agent restarted without it", job_id, node)
            self._finish(job_id, JobOutcome(job_id, JobStatus.FAILED, None, {"interrupted": True}, error), node=node)
            interrupted.append(job_id)
        return interrupted

    def _controller_event(self, job_id: str, name: str, data: Mapping[str, Any]) -> JobEventRecord | None:
        """Record an event the controller itself writes (after the agent's, by counter) if the job is unfinished."""
        ev = self._controller_event_db(job_id, name, data)
        if ev is not None:
            self._notify([ev])
        return ev

    def _controller_event_db(self, job_id: str, name: str, data: Mapping[str, Any]) -> JobEventRecord | None:
        with self.store.session() as s:
            row = s.get(Job, job_id)
            if row is None or row.status in FINISHED:
                return None
            last = s.scalar(select(func.max(JobEvent.counter)).where(JobEvent.job_id == job_id)) or 0
            ev = JobEventRecord(job_id, int(last) + 1, name, dict(data), utcnow())
            s.add(JobEvent(job_id=job_id, counter=ev.counter, event=name, data=dict(data), created=ev.created))
        return ev

    def _notify(self, events: Iterable[JobEventRecord]) -> None:
        for ev in events:
            for listener in self._listeners:
                try:
                    listener(ev)
                except Exception:
                    log.exception("job event listener failed")

    def _dispatch_db(self, spec: JobSpec) -> dt.datetime | None:
        """Mark the job dispatched (thread-safe); its deadline, or None when it has finished meanwhile."""
        def mark(s: Any) -> dt.datetime | None:
            now = utcnow()
            # one conditional statement (a job is dispatched once per job; reading the row first was a second): a
            # result or a cancel stored meanwhile by another worker thread is not overwritten
            timeout = s.scalar(update(Job).where(Job.id == spec.job_id, Job.status.not_in(tuple(FINISHED)))
                               .values(dispatched_at=now,
                                       status=case((Job.status == JobStatus.PENDING, JobStatus.DISPATCHED),
                                                   else_=Job.status))
                               .returning(Job.timeout_seconds).execution_options(synchronize_session=False))
            return None if timeout is None else now + dt.timedelta(seconds=timeout + GRACE_SECONDS)

        return self.store.write(mark, what=f"job {spec.job_id} dispatch")

    def record_events(self, node: str, events: Iterable[JobEventRecord]) -> int:
        """Store events reported by ``node``'s agent; returns how many were new (duplicates skipped)."""
        stored = self.store.write(lambda s: self._record_events_db(s, node, list(events)),
                                  what=f"events of {node}")
        self._notify(stored)
        return len(stored)

    async def record_events_async(self, node: str, events: Iterable[JobEventRecord]) -> int:
        """``record_events`` with the database work (retried; duplicates skipped) on the store's thread pool."""
        batch = list(events)
        stored = await self.store.call(self.store.write, lambda s: self._record_events_db(s, node, batch),
                                       what=f"events of {node}")
        self._notify(stored)
        return len(stored)

    def _record_events_db(self, s: Any, node: str, events: list[JobEventRecord]) -> list[JobEventRecord]:
        stored: list[JobEventRecord] = []
        if not events:
            return stored
        jobs: dict[str, Job] = {}
        started: set[str] = set()
        for job_id in dict.fromkeys(ev.job_id for ev in events):
            job = s.get(Job, job_id)
            if job is None or job.node != node:
                raise NotFoundError(f"job {job_id!r} is not a job of {node}",
                                    hint="the agent reported events for a job it was not given")
            jobs[job_id] = job
        # the events already stored (a retry, an agent re-sending after a lost answer), in one query for the batch
        # rather than one per event
        counters = sorted({ev.counter for ev in events})
        seen: set[tuple[str, int]] = {(job_id, counter) for job_id, counter in s.execute(
            select(JobEvent.job_id, JobEvent.counter).where(JobEvent.job_id.in_(list(jobs)),
                                                            JobEvent.counter.in_(counters)))}
        for ev in events:
            if (ev.job_id, ev.counter) in seen:
                continue
            seen.add((ev.job_id, ev.counter))
            job = jobs[ev.job_id]
            s.add(JobEvent(job_id=ev.job_id, counter=ev.counter, event=ev.event[:64], data=dict(ev.data),
                           created=ev.created))
            if job.status in _UNSENT and job.id not in started:
                started.add(job.id)
                # conditional, not an ORM assignment: a result stored meanwhile by another worker thread wins
                s.execute(update(Job).where(Job.id == job.id, Job.status.in_(_UNSENT))
                          .values(status=JobStatus.RUNNING, started_at=func.coalesce(Job.started_at, utcnow()))
                          .execution_options(synchronize_session=False))
            stored.append(ev)
        return stored

    def complete(self, node: str, outcome: JobOutcome) -> None:
        """Record the result reported by ``node``'s agent."""
        if outcome.status not in FINISHED:
            raise InputError(f"job status {str(outcome.status)!r} is not a final status",
                             hint=f"use one of {', '.join(sorted(FINISHED))}")
        self._finish(outcome.job_id, outcome, node=node)

    async def complete_async(self, node: str, outcome: JobOutcome) -> None:
        """``complete`` with the database work (retried, idempotent) on the store's thread pool."""
        if outcome.status not in FINISHED:
            raise InputError(f"job status {str(outcome.status)!r} is not a final status",
                             hint=f"use one of {', '.join(sorted(FINISHED))}")
        await self.finish_async(outcome.job_id, outcome, node=node)

    async def finish_async(self, job_id: str, outcome: JobOutcome, node: str | None, *,
                           fence: Fence | None = None) -> None:
        ours = job_id in self._deadlines

        def finish(s: Session) -> str | None:
            if fence is not None:
                fence(s)
            return self._finish_db(s, job_id, outcome, node, ours)

        job_node = await self.store.call(self.store.write, finish, what=f"job {job_id} result")
        if job_node is not None:
            self._finished(job_id, outcome, job_node)

    def _finish(self, job_id: str, outcome: JobOutcome, node: str | None) -> None:
        ours = job_id in self._deadlines
        job_node = self.store.write(lambda s: self._finish_db(s, job_id, outcome, node, ours),
                                    what=f"job {job_id} result")
        if job_node is not None:
            self._finished(job_id, outcome, job_node)

    def _finish_db(self, s: Any, job_id: str, outcome: JobOutcome, node: str | None, ours: bool) -> str | None:
        """Store the outcome if the job is unfinished (thread-safe, retry-safe); the job's node, or None for a
        late result. ``ours``: this process dispatched the job and has not seen it finish, so a final row
        with this very status is our own earlier attempt whose commit answer was lost (a dropped
        connection): the outcome counts, once."""
        row = s.get(Job, job_id)
        if row is None or (node is not None and row.node != node):
            raise NotFoundError(f"job {job_id!r} is not a job of {node or 'this controller'}",
                                hint="check the job id")
        if row.status in FINISHED:
            if ours and row.status == outcome.status and row.error == outcome.error:
                return str(row.node)
            if node is None:
                raise ConflictError(f"job {job_id} already finished ({row.status})", hint="nothing to do")
            log.warning("job %s: late result %s ignored (already %s)", job_id, outcome.status, row.status)
            return None
        # conditional on the row still being unfinished: two finishes racing (a result and the watchdog,
        # or a retry) cannot both win, on PostgreSQL as on SQLite
        res = s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(tuple(FINISHED)))
                        .values(status=outcome.status, rc=outcome.rc, result=dict(outcome.result),
                                error=outcome.error, finished_at=utcnow())
                        .execution_options(synchronize_session=False))
        if getattr(res, "rowcount", 1) != 1:
            log.warning("job %s: result %s lost a race with another finish", job_id, outcome.status)
            return None
        return str(row.node)

    def _finished(self, job_id: str, outcome: JobOutcome, job_node: str) -> None:
        """The in-memory half of finishing a job (event loop thread): waiters, callbacks, the registry hook."""
        self._deadlines.pop(job_id, None)
        log.info("job %s on %s finished: %s", job_id, job_node, outcome.status)
        fut = self._futures.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
        for cb in self._callbacks.pop(job_id, []):
            try:
                cb(outcome)
            except Exception:
                log.exception("job done callback failed")
        if self.on_job_finished is not None:
            self.on_job_finished(job_node, outcome)

    # ---- watchdog ----------------------------------------------------------------------

    def expire(self, now: dt.datetime | None = None) -> list[str]:
        """Mark dispatched/running jobs past their deadline as ``timeout``; returns their ids."""
        now = now or utcnow()
        expired = [j for j, deadline in self._deadlines.items() if deadline <= now]
        for job_id in expired:
            try:
                self._finish(job_id, JobOutcome(job_id, JobStatus.TIMEOUT, None, {},
                                                "no result from the agent before the job's timeout"), node=None)
            except (NotFoundError, ConflictError):
                self._deadlines.pop(job_id, None)
        return expired

    def load_deadlines(self) -> None:
        """After a restart: re-arm deadlines of jobs that were dispatched or running."""
        with self.store.session() as s:
            for row in s.scalars(select(Job).where(Job.status.in_((JobStatus.DISPATCHED, JobStatus.RUNNING)))):
                start = row.dispatched_at or row.created_at
                self._deadlines[row.id] = start + dt.timedelta(seconds=row.timeout_seconds + GRACE_SECONDS)

    async def expire_async(self, now: dt.datetime | None = None) -> list[str]:
        """``expire`` with the database work on the store's thread pool."""
        now = now or utcnow()
        expired = [j for j, deadline in self._deadlines.items() if deadline <= now]
        for job_id in expired:
            try:
                await self.finish_async(job_id, JobOutcome(job_id, JobStatus.TIMEOUT, None, {},
                                                           "no result from the agent before the job's timeout"),
                                        node=None)
            except (NotFoundError, ConflictError):
                self._deadlines.pop(job_id, None)
        return expired

    async def run_watchdog(self, period: float = 1.0) -> None:
        await self.store.call(self.load_deadlines)
        while True:
            await asyncio.sleep(period)
            try:
                await self.expire_async()
                await self.poll_shared()
            except Exception:
                # a database fault ends this tick only; the deadlines stay armed for the next one
                log.exception("job watchdog failed")

    # ---- several controllers ---------------------------------------------------------------

    async def poll_shared(self) -> None:
        """Send the jobs other controllers submitted for agents connected here, and wake the waiters of jobs that
        other controllers finished (see the module docstring)."""
        if self._streams:
            for node, spec in await self.store.call(self.claim_pending, set(self._streams)):
                queue = self._streams.get(node)
                if queue is not None:  # gone meanwhile: the job is re-sent when its agent opens a stream again
                    log.info("job %s (%s) for %s claimed from the jobs table", spec.job_id, spec.kind, node)
                    queue.put_nowait(spec)
        waited = sorted(set(self._futures) | set(self._callbacks))
        if waited:
            for outcome in await self.store.call(self.finished_elsewhere, waited):
                fut = self._futures.pop(outcome.job_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(outcome)
                for cb in self._callbacks.pop(outcome.job_id, []):
                    try:
                        cb(outcome)
                    except Exception:
                        log.exception("job done callback failed")

    def claim_pending(self, nodes: Collection[str]) -> list[tuple[str, JobSpec]]:
        """Claim the ``pending`` jobs of ``nodes`` (thread-safe): rows locked with SKIP LOCKED and moved to
        ``dispatched`` only if still ``pending``, so that of two controllers exactly one claims each job."""
        def claim(s: Session) -> list[tuple[str, JobSpec]]:
            rows = s.execute(select(Job.id, Job.node, Job.kind, Job.vars, Job.timeout_seconds)
                             .where(Job.status == JobStatus.PENDING, Job.node.in_(list(nodes)))
                             .order_by(Job.created_at).with_for_update(skip_locked=True)).all()
            claimed: list[tuple[str, JobSpec]] = []
            for job_id, node, kind, vars_, timeout in rows:
                res = s.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.PENDING)
                                .values(status=JobStatus.DISPATCHED).execution_options(synchronize_session=False))
                if getattr(res, "rowcount", 1) == 1:
                    claimed.append((node, JobSpec(job_id, kind, dict(vars_ or {}), timeout)))
            return claimed

        return self.store.write(claim, what="claim pending jobs")

    def finished_elsewhere(self, job_ids: Collection[str]) -> list[JobOutcome]:
        """The outcomes of those of ``job_ids`` that have finished (thread-safe)."""
        with self.store.session() as s:
            rows = s.scalars(select(Job).where(Job.id.in_(list(job_ids)), Job.status.in_(tuple(FINISHED))))
            return [JobOutcome(r.id, JobStatus(r.status), r.rc, r.result or {}, r.error) for r in rows]
