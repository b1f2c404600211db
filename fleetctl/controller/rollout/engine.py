"""The rollout engine: an asyncio loop inside the controller that drives rollouts step by step.

Leadership (issue 17, docs/ha.md): one engine drives a rollout, the holder of its lease ``rollout:<id>`` in the
``leases`` table (controller/leases.py), taken and renewed every tick on the database's clock; its fencing token
grows by one at each takeover. Every unit of work the engine runs for a rollout opens with ``hold_lease``: a
conditional UPDATE of that lease row that counts one row (this engine still holds it, with the token it drives
under, unexpired) or raises ``LeaseLost``, having written nothing; the row stays locked until the unit commits, so
a takeover lands before a unit or after it, never inside one. A step's job is inserted by such a unit, with its id
on the node. The engine stops acting on a rollout at once (its node tasks cancelled; no unit and no job for it
afterwards) when a renewal is refused, fails or answers after the lease would have expired (``leases.next_term``;
a timer ends the term at its end by the engine's own clock when no renewal has come back), and when a unit finds
the lease gone. A unit already running in a worker thread then is fenced by the same check.

Crash safety (``kill -9`` at any moment):

* every state change is written (``rollout_nodes`` + ``rollout_transitions``) *before* the step it
  announces is acted on; a step's job is inserted only after its state is committed, in one
  transaction with its id on the node;
* another engine (a restarted controller, a second controller on PostgreSQL) takes a rollout over
  when its lease expired, or at once when its holder's process is dead on this host
  (``leases.holder_gone``);
* on takeover a step already submitted is re-attached (its job id, or the job of that node/kind
  created for this rollout after the step started), never resubmitted; a finished job's outcome
  is read back from the jobs table, so no finished step is redone;
* a step gets ``step_deadline``; past it the job is canceled and the node fails (agent vanished).

Off the event loop (docs/security.md, "Availability and faults"): every database unit of the engine
(``_claim``, ``_drive_db``, ``_prepare``, ``_submit``, ``_finish_step``, ...) is a plain blocking function
run whole on the store's bounded pool through ``_db``, one at a time: a database locked from outside delays
the engine (statements wait up to the store's lock timeout, then fail and the step is picked up again), never
the loop that serves heartbeats and ``/live``. The units keep the single-threaded semantics they were written
for: ``_db`` runs one unit at a time, and none reads the loop's own state (``_tasks``) other than a snapshot.

The decisions (which node starts, when a batch is complete, budget, canary) come from the pure
``controller.rollout.core.next_actions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from fleetctl.controller.artifacts import VOUCHED, provenance_of, trusted_for
from fleetctl.controller.audit import audit
from fleetctl.controller.audit import record as audit_record
from fleetctl.controller.diagnose import diagnose
from fleetctl.controller.jobs import JobDispatcher, JobEventRecord
from fleetctl.controller.leases import (
    Held,
    Lease,
    LeaseLost,
    Term,
    acquire,
    hold_lease,
    holder_gone,
    holder_id,
    next_term,
    release,
)
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.provisioning import DIST_NAMES, NodeNeeds, Provisioner, describe_artifact, describe_failure
from fleetctl.controller.registry import read_facts
from fleetctl.controller.rollout.core import (
    ACTIVE_ROLLOUT,
    STATE_TO_JOB,
    TERMINAL,
    BuildSnapshot,
    BuildStatus,
    Maintenance,
    NodePlan,
    NodeSnapshot,
    RolloutStatus,
    Snapshot,
    State,
    check_transition,
    next_actions,
    next_state,
    notification_event,
    notification_payload,
    parse_budget,
    pick_previous_wheel,
    progress,
)
from fleetctl.controller.rollout.expectation import EXPECTED_KEY, record_after_rollback
from fleetctl.controller.rollout.jobvars import NODE_VAR_PATTERNS, build_target_vars, checked_job_vars
from fleetctl.controller.rollout.models import Build, Rollout, RolloutNode, RolloutTransition
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import Artifact, Job, Node
from fleetctl.controller.telemetry import ROLLOUT_STEP_SECONDS
from fleetctl.controller.verify_store.views import degraded_among
from fleetctl.fleet.errors import ConflictError, FleetError, NotFoundError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.verification import expect_for_variant, judge_job
from fleetctl.fleet.workload import DISTURBING_KINDS, POLICY_VAR, skipped_busy, wait_allowance_s

log = logging.getLogger(__name__)

T = TypeVar("T")
#: hands a notification (webhook URLs, schema-1 payload) to the controller's background sender; never blocks
Notify = Callable[[Sequence[str], Mapping[str, Any]], None]

# finished rollouts whose failed nodes may come back: their vanished-agent failures are reconciled too
# (`partial` ones can then be retried with `fleetctl rollout resume ID --retry-failed`)
RECONCILED_AFTER_END = (RolloutStatus.PARTIAL, RolloutStatus.ABORTED)
# how often finished rollouts are looked at: a node coming back is not urgent, and the query spans history
FINISHED_RECONCILE_S = 10.0
DEFAULT_TIMEOUTS: Mapping[str, int] = {"apt-keyring-fix": 600, "cuda-toolkit": 1800, "install-wheel": 900,
                                       "verify": 900, "rollback": 900, "build-from-source": 4 * 3600}
DEFAULT_MIN_FREE_BYTES = 1024**3  # room a source-built wheel needs in the artifact store


def plan_from_json(obj: Mapping[str, Any]) -> NodePlan:
    return NodePlan(hostname=obj["hostname"], variant=obj["variant"], steps=tuple(obj["steps"]),
                    gpu=obj.get("gpu", ""), version=obj.get("version"), build_key=obj.get("build_key"),
                    artifact=obj.get("artifact"), build_minutes=float(obj.get("build_minutes", 0)),
                    reasons=tuple(obj.get("reasons", ())))


def rollout_lease(rollout_id: str) -> str:
    """The name of rollout ``rollout_id``'s lease in the ``leases`` table: the engine holding it drives the rollout."""
    return f"rollout:{rollout_id}"


def record(s: Session, rollout_id: str, node: RolloutNode, new: State, cause: str, *, job_id: str | None = None,
           actor: str = "engine") -> None:
    """Persist one transition of ``node`` (checked against the state machine)."""
    old = State(node.state)
    check_transition(old, new)
    now = utcnow()
    s.add(RolloutTransition(rollout_id=rollout_id, hostname=node.hostname, from_state=str(old), to_state=str(new),
                            at=now, cause=cause[:4000], job_id=job_id, actor=actor[:128]))
    if node.step and node.step_started_at is not None:  # a step ends here, however it went
        ROLLOUT_STEP_SECONDS.labels(node.step).observe(max(0.0, (now - node.step_started_at).total_seconds()))
    node.state = str(new)
    node.cause = cause[:4000]
    node.updated_at = now
    node.step = STATE_TO_JOB.get(new)
    node.job_id = None
    node.step_started_at = None
    node.step_deadline = None


def diagnose_text(text: str) -> list[dict[str, Any]]:
    if not text:
        return []
    return [d.to_json() for d in diagnose(text)[:3]]


def verification_verdict(result: Mapping[str, Any]) -> tuple[bool, str]:
    """Pass/fail of a successful ``verify`` job, from ``fleet.verification.judge_job`` (the one judge)."""
    verdict = judge_job(JobStatus.SUCCESSFUL, result)
    why = "; ".join(r for r in verdict.reasons if r) or (
        "flash-attn imports, is correct and fast" if verdict.passed else verdict.status)
    nested = result.get("verification")
    payload: Mapping[str, Any] = nested if isinstance(nested, Mapping) else result
    return verdict.passed, why + (" (simulated GPU model)" if payload.get("simulated") is True else "")


_NO_VERIFY_RE = re.compile(r"unknown job kind '?verify|cannot run '?verify|no executor")
_GPG_ERROR_RE = re.compile(r"GPG error: (\S+)\s+(?:\S+\s+)?(?:In)?Release:?.*?(?:NO_PUBKEY|EXPKEYSIG) ([0-9A-Fa-f]+)")


def apt_keyring_vars(errors: list[str]) -> dict[str, Any]:
    """apt-keyring-fix variables from the node's ``apt-get update`` errors: the failing source and, for
    NVIDIA's CUDA repository, where its key lives (``<repo>/<keyid>.pub``, NVIDIA's convention). The lines are the
    node's text: a source is taken only when its URI is a plain URL (``NODE_VAR_PATTERNS["repo_uri"]``), NVIDIA's
    only when that is its host; ``checked_job_vars`` checks the result again with everything else."""
    out: dict[str, Any] = {"apt_errors": errors}
    for line in errors:
        m = _GPG_ERROR_RE.search(line)
        if m is None or not NODE_VAR_PATTERNS["repo_uri"].fullmatch(m.group(1)):
            continue
        uri, key = m.group(1).rstrip("/"), m.group(2).lower()
        out.update(repo_uri=uri, key_id=key.upper())
        host = uri.split("//", 1)[-1].split("/", 1)[0].lower()
        if host == "developer.download.nvidia.com":
            out.update(keyring_name="cuda-archive-keyring", key_url=f"{uri}/{key[-8:]}.pub")
        else:
            out["keyring_name"] = re.sub(r"[^a-z0-9-]+", "-", host).strip("-")[:64] or "apt-source"
        break
    return out


@dataclass
class StepRun:
    rollout_id: str
    hostname: str
    state: State
    kind: str
    vars: dict[str, Any]
    timeout: int
    job_id: str | None
    started_at: dt.datetime
    deadline: dt.datetime
    provision: Provision | None = None  # inputs to get into the artifact store before the job is submitted


@dataclass(frozen=True)
class Drive:
    """What ``_drive_db`` decided for a rollout: the nodes to start now, or that it ended (its lease released)."""

    start: tuple[str, ...] = ()
    ended: bool = False


@dataclass(frozen=True)
class Provision:
    """What a real node's step needs from the artifact store (controller/provisioning.py)."""

    needs: NodeNeeds
    build_key: str | None  # BUILD: its build fails with the node
    built_sha256: str | None  # INSTALL after a build: the built wheel


def real_executor(plan: Mapping[str, Any]) -> bool:
    """The node runs playbooks for real (``--executor ansible``): its steps need real artifacts."""
    executor = plan.get("executor")
    if isinstance(executor, str):
        return executor == "ansible"
    return not plan.get("simulated", True)


class RolloutEngine:
    """Drives every active rollout of the store. One per controller process; ``await run()``."""

    def __init__(self, store: Store, jobs: JobDispatcher, *, artifacts_dir: Path | None = None,
                 artifacts: Any = None, owner: str | None = None, lease_ttl: float = 15.0,
                 tick: float = 0.5, provisioner: Provisioner | None = None, notify: Notify | None = None,
                 notify_urls: Sequence[str] = ()) -> None:
        self.store = store
        self.jobs = jobs
        self.artifacts = artifacts
        # real nodes' build and install inputs (sdist, wheel, dependency closure): store first, then upstream
        self.provisioner = provisioner
        # rollout notifications: the sender (controller/webhooks.py, run by controller/app.py) and the
        # controller-wide webhooks (settings.notify_webhooks), besides each rollout's own --notify-webhook
        self.notify = notify
        self.notify_urls = tuple(notify_urls)
        self.artifacts_dir = artifacts_dir
        self.owner = owner or holder_id()
        self.lease_ttl = lease_ttl
        self.tick = tick
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        # rollout id → this engine's term as its leader (leases.next_term), and the timer that ends the term
        self._terms: dict[str, Term] = {}
        self._term_ends: dict[str, asyncio.TimerHandle] = {}
        # one database unit of the engine at a time (``_db``); waiters queue here, on the loop, not in the pool
        self._db_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.finished_reconcile_s = FINISHED_RECONCILE_S
        self._finished_reconciled_at = 0.0
        jobs.add_event_listener(self._on_job_event)  # a step waiting for busy GPUs says so in its node's cause

    # ---- loop ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Run a tick soon; safe from any thread (HTTP handlers run in a worker thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        log.info("rollout engine %s started", self.owner)
        try:
            while not self._stopping:
                try:
                    await self.tick_once()
                except FleetError as exc:
                    log.warning("rollout engine: %s", exc)
                except Exception:
                    log.exception("rollout engine tick failed")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.tick)
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._tasks.clear()
        held = [term.held for term in self._terms.values()]
        for rid in list(self._terms):
            self._end_term(rid)
        if held:  # a clean stop: another controller takes the rollouts over at its next tick, not after the TTL
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._db(self._release, held), 2.0)

    def _release(self, held: Sequence[Held]) -> None:
        with self.store.session() as s:
            for lease in held:
                release(s, lease)

    async def _db(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run the engine's blocking database unit ``fn(*args)`` on the store's bounded pool, one at a time.

        Off the loop: a locked database delays the engine, never heartbeats or ``/live``. One at a time: the
        units were written for one thread (the loop used to serialise them) and share rows — a rollout and
        its nodes, builds across nodes and rollouts — so ``_drive_db``, ``_prepare`` and ``_finish_step`` must
        not interleave. Waiters queue on the loop, not in the pool's threads (the gRPC servicer shares them).
        The lock is released when the thread's work ends, not when the awaiting task is cancelled: a
        cancelled wait (``stop``) never lets a second unit overlap one still running in its thread."""
        lock = self._db_lock
        await lock.acquire()
        loop = asyncio.get_running_loop()
        try:
            work: Future[T] = self.store.executor.submit(fn, *args)
        except BaseException:
            lock.release()
            raise

        def unlock(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown): nobody waits any more
                loop.call_soon_threadsafe(lock.release)

        work.add_done_callback(unlock)
        return await asyncio.wrap_future(work)

    async def tick_once(self) -> None:
        """One pass: take or renew the lease of every active rollout, drive each one this engine leads, now and then
        look at finished ones."""
        await self._renew()
        for rid in list(self._terms):
            await self._drive(rid)
        if time.monotonic() - self._finished_reconciled_at >= self.finished_reconcile_s:
            self._finished_reconciled_at = time.monotonic()
            await self._db(self._reconcile_finished)

    async def _renew(self) -> None:
        """``_claim``, and what follows from its answer (``leases.next_term``): a term begins for each rollout newly
        taken and goes on for each renewed in time; it ends at once, the rollout's node tasks cancelled, for each
        whose renewal was refused or came too late, for all of them when the claim failed, and (quietly) for a
        rollout no longer active."""
        loop = asyncio.get_running_loop()
        asked = loop.time()  # before the wait for ``_db``'s lock: the term may only end sooner for it
        try:
            claimed = await self._db(self._claim)
        except Exception as exc:
            for rid in list(self._terms):
                self._stop_rollout(rid, f"its lease could not be renewed ({getattr(exc, 'message', exc)})")
            raise
        answered = loop.time()
        for rid in [rid for rid in self._terms if rid not in claimed]:
            self._end_term(rid)  # no longer active: it ended, and its lease was released with its final status
        for rid, held in claimed.items():
            term = self._terms.get(rid)
            renewed = next_term(term, held, asked, answered, self.lease_ttl)
            if renewed is not None:
                if term is None:
                    log.info("rollout %s: this controller drives it (lease token %d)", rid, renewed.held.token)
                self._begin_term(rid, renewed)
            elif term is not None:
                self._stop_rollout(rid, "another controller holds its lease" if held is None else
                                   f"its lease changed hands in between (token {held.token})"
                                   if held.token != term.held.token else
                                   "its renewal came back after the lease would have expired")

    def _claim(self) -> dict[str, Held | None]:
        """Take or renew the lease of every active rollout (blocking: through ``_db``): each one's lease as this
        engine holds it now, or None while another engine's runs. A lease whose holder is a dead process of this
        host is taken at once (``leases.holder_gone``). In the rollouts' order, so that two engines claiming at
        once lock the lease rows in one order (PostgreSQL)."""
        with self.store.session() as s:
            ids = list(s.scalars(select(Rollout.id).where(Rollout.status.in_(ACTIVE_ROLLOUT)).order_by(Rollout.id)))
            names = {rid: rollout_lease(rid) for rid in ids}
            holders = {name: holder for name, holder in s.execute(
                select(Lease.name, Lease.holder).where(Lease.name.in_(list(names.values()))))} if ids else {}
            claimed: dict[str, Held | None] = {}
            for rid, name in names.items():
                holder = holders.get(name)
                gone = holder if holder and holder != self.owner and holder_gone(holder) else None
                claimed[rid] = acquire(s, name, self.owner, self.lease_ttl, gone=gone)
                if gone is not None and claimed[rid] is not None:
                    log.info("rollout %s: taken over from %s, a process of this host that is gone", rid, gone)
        return claimed

    def _begin_term(self, rid: str, term: Term) -> None:
        """``term`` is this engine's term on ``rid`` from now (a first one, or one renewed); it ends by itself at its
        end by this engine's clock (``_term_over``) unless a renewal comes back before."""
        self._terms[rid] = term
        timer = self._term_ends.pop(rid, None)
        if timer is not None:
            timer.cancel()
        self._term_ends[rid] = asyncio.get_running_loop().call_at(term.valid_until, self._term_over, rid, term)

    def _term_over(self, rid: str, term: Term) -> None:
        if self._terms.get(rid) is term:
            self._stop_rollout(rid, "its lease ran out before a renewal came back")

    def _end_term(self, rid: str) -> Term | None:
        """Forget this engine's term on ``rid`` and cancel the rollout's node tasks: they stop at their next await,
        and a unit of theirs still in a worker thread is fenced by the lease (``hold_lease``)."""
        term = self._terms.pop(rid, None)
        timer = self._term_ends.pop(rid, None)
        if timer is not None:
            timer.cancel()
        current = asyncio.current_task()
        for (task_rid, _), task in self._tasks.items():
            if task_rid == rid and task is not current:
                task.cancel()
        return term

    def _stop_rollout(self, rid: str, why: str) -> None:
        term = self._end_term(rid)
        if term is not None:
            log.warning("rollout %s: %s (lease token %d): this controller stopped acting on it at once", rid, why,
                        term.held.token)

    def _lost(self, rid: str, held: Held) -> None:
        """A unit found lease ``held`` gone (``LeaseLost``): the rollout stops here, unless this engine's term on it
        is already another one (the lease came back to it with another token since)."""
        term = self._terms.get(rid)
        if term is not None and term.held.token == held.token:
            self._stop_rollout(rid, "a write found its lease gone")

    def _leads(self, rid: str, held: Held) -> bool:
        term = self._terms.get(rid)
        return term is not None and term.held.token == held.token

    # ---- one rollout ---------------------------------------------------------------------------

    async def _drive(self, rid: str) -> None:
        """Decide for one rollout this engine leads (one fenced unit on the pool) and start the node tasks it says
        to, on the loop, unless the term ended meanwhile."""
        term = self._terms.get(rid)
        if term is None:
            return
        held = term.held
        try:
            drive = await self._db(self._drive_db, rid, held, frozenset(self._tasks))
        except LeaseLost:
            self._lost(rid, held)
            return
        if drive.ended:
            self._end_term(rid)
            return
        if not self._leads(rid, held):
            return
        for host in drive.start:
            task_key = (rid, host)
            if task_key not in self._tasks:
                self._tasks[task_key] = asyncio.create_task(self._node_task(rid, host, held),
                                                            name=f"rollout-{rid}-{host}")

    def _drive_db(self, rid: str, held: Held, running: Collection[tuple[str, str]]) -> Drive:
        """The database half of ``_drive`` (blocking; through ``_db``; fenced by ``held``): the nodes to start.
        ``running`` is a snapshot of ``_tasks`` taken on the loop; only ``_drive`` adds to it, after this returns,
        so a node is never missing from it — at most a task that just ended is still counted busy for one tick."""
        now = utcnow()
        start: tuple[str, ...] = ()
        notice: tuple[tuple[str, ...], dict[str, Any]] | None = None
        with self.store.session() as s:
            hold_lease(s, held)
            r = s.get(Rollout, rid)
            if r is None:
                return Drive(ended=True)
            nodes = list(s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == rid)))
            if r.status == RolloutStatus.RUNNING:
                self._reconcile(s, rid, [n for n in nodes if n.state == State.FAILED])
            keys = {n.build_key for n in nodes if n.build_key}
            builds = {b.build_key: b for b in s.scalars(select(Build).where(Build.build_key.in_(keys)))} if keys \
                else {}
            opts = r.options or {}
            maintenance = Maintenance.from_options(opts)
            health = self._health(s, nodes) if maintenance.max_unavailable is not None else {}
            snap = Snapshot(
                status=RolloutStatus(r.status),
                nodes=[NodeSnapshot(n.hostname, State(n.state), n.batch, n.build_key,
                                    busy=(rid, n.hostname) in running,
                                    builder=bool(n.build_key and builds.get(n.build_key)
                                                 and builds[n.build_key].builder == n.hostname),
                                    after=(n.plan.get("shared_env") or {}).get("installer"),
                                    health=health.get(n.hostname, NodeStatus.ONLINE))
                       for n in nodes],
                builds={k: BuildSnapshot(k, BuildStatus(b.status), b.builder) for k, b in builds.items()},
                failures=sum(1 for n in nodes if n.state == State.FAILED),
                total=sum(1 for n in nodes if n.state != State.SKIPPED or n.step is not None),
                budget=parse_budget(opts.get("max_failures")),
                max_parallel=int(opts.get("max_parallel", 0)) or 10_000,
                canary_batch=bool(opts.get("canary_batch", False)),
                canary_ack=r.canary_ack,
                maintenance=maintenance,
                now=now,
                approved=r.approved_by is not None,
                batch_finished_at=self._previous_batch_finished(s, rid, nodes) if maintenance.bake_seconds else {},
            )
            acts = next_actions(snap)
            by_host = {n.hostname: n for n in nodes}
            for host, key in acts.fail_waiting:
                b = builds[key]
                record(s, rid, by_host[host], State.FAILED,
                       f"build of {key} on {b.builder or '?'} failed: {b.error or 'see the builder node'}")
            if r.status == RolloutStatus.ABORTING:
                for n in nodes:
                    if State(n.state) not in TERMINAL and (rid, n.hostname) not in running and n.job_id is None:
                        record(s, rid, n, State.SKIPPED, "rollout aborted before this step started")
                if all(State(n.state) in TERMINAL for n in nodes):
                    self._set_status(s, r, RolloutStatus.ABORTED, r.reason or "aborted by operator")
            # each audit row in the transaction of the change it records: both fenced, both or neither
            if acts.pause:
                self._set_status(s, r, RolloutStatus.PAUSED, acts.pause)
                audit_record(s, "engine", "rollout.pause", rid, {"reason": acts.pause})
            elif acts.await_approval:
                self._set_status(s, r, RolloutStatus.AWAITING_APPROVAL, acts.await_approval)
                audit_record(s, "engine", "rollout.awaiting-approval", rid, {"reason": acts.await_approval})
            elif acts.finish:
                self._set_status(s, r, acts.finish, self._rollback_failures(nodes) if acts.finish ==
                                 RolloutStatus.ROLLBACK_FAILED else self._summary(nodes))
                # in the same transaction as the status: a controller killed at the commit leaves both or neither
                audit_record(s, "engine", "rollout.finish", rid, {"status": str(acts.finish), "summary": r.reason})
            else:
                start = acts.start
            if acts.current_batch is not None:
                r.current_batch = acts.current_batch
            hold = acts.hold.to_json() if acts.hold is not None and r.status == RolloutStatus.RUNNING else None
            if r.hold != hold:  # written when it changes, not every tick
                r.hold = hold
            notice = self._notice(r, nodes, now)
            ended = RolloutStatus(r.status) not in ACTIVE_ROLLOUT
            if ended:  # in the transaction of the final status: the next rollout's engine need not wait the TTL
                release(s, held)
        if notice is not None and self.notify is not None:  # queued only: the sender posts in the background
            self.notify(*notice)
        return Drive(start, ended)

    def _notice(self, r: Rollout, nodes: list[RolloutNode], now: dt.datetime) -> tuple[tuple[str, ...],
                                                                                        dict[str, Any]] | None:
        """The webhook notification of the status ``r`` has entered since the last one (once per change; the
        status is remembered in ``notified_status``), or None: no change, a status that notifies nothing, or no
        webhook configured. Operator pauses are seen here too, at the engine's next tick."""
        status = RolloutStatus(r.status)
        if r.notified_status == status:
            return None
        r.notified_status = str(status)
        event = notification_event(status)
        urls = tuple(dict.fromkeys((*self.notify_urls, *((r.options or {}).get("notify_webhooks") or ()))))
        if event is None or not urls:
            return None
        counts: dict[str, int] = {}
        for n in nodes:
            counts[n.state] = counts.get(n.state, 0) + 1
        return urls, notification_payload(event, rollout_id=r.id, status=status, reason=r.reason, version=r.version,
                                          progress=progress(counts), at=now,
                                          failed=[(n.hostname, n.cause) for n in nodes if n.state == State.FAILED])

    @staticmethod
    def _health(s: Session, nodes: list[RolloutNode]) -> dict[str, NodeStatus]:
        """Each node's liveness (``nodes.status``, kept by the registry), degraded also when its verification
        health says so (verify_store); a node no longer registered counts as offline."""
        hosts = [n.hostname for n in nodes]
        out = {h: NodeStatus.OFFLINE for h in hosts}
        out.update({h: NodeStatus(st) for h, st in s.execute(select(Node.hostname, Node.status)
                                                              .where(Node.hostname.in_(hosts)))})
        for h in degraded_among(s, hosts):
            if out[h] != NodeStatus.OFFLINE:
                out[h] = NodeStatus.DEGRADED
        return out

    @staticmethod
    def _previous_batch_finished(s: Session, rid: str, nodes: list[RolloutNode]) -> dict[int, dt.datetime]:
        """When the batch before the current one finished (its last node's last transition to a final state):
        ``--bake-time`` counts from there."""
        open_batches = [n.batch for n in nodes if State(n.state) not in TERMINAL]
        if not open_batches or min(open_batches) <= 0:
            return {}
        previous = min(open_batches) - 1
        hosts = [n.hostname for n in nodes if n.batch == previous]
        at = s.scalar(select(func.max(RolloutTransition.at)).where(
            RolloutTransition.rollout_id == rid, RolloutTransition.hostname.in_(hosts),
            RolloutTransition.to_state.in_([str(t) for t in TERMINAL]))) if hosts else None
        if at is None:
            return {}
        return {previous: at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)}

    def _reconcile_finished(self) -> None:
        """Failed nodes of finished rollouts (``RECONCILED_AFTER_END``) whose agent vanished and is back online:
        their cause says what the node has now and how to retry it (``_reconcile`` with ``finished``). A node
        that a later rollout took on is that rollout's business and left alone."""
        returned: list[tuple[str, str, str]] = []
        with self.store.session() as s:
            rows = s.execute(
                select(RolloutNode, Rollout.status, Rollout.created_at)
                .join(Rollout, Rollout.id == RolloutNode.rollout_id)
                .join(Node, Node.hostname == RolloutNode.hostname)
                .where(RolloutNode.state == str(State.FAILED), Rollout.status.in_(RECONCILED_AFTER_END),
                       Node.status == NodeStatus.ONLINE, Node.last_seen > RolloutNode.updated_at)).all()
            for n, status, created in rows:
                if (n.result or {}).get("reconciled") == n.attempt:
                    continue
                newer = s.scalar(select(Rollout.id).join(RolloutNode, RolloutNode.rollout_id == Rollout.id)
                                 .where(RolloutNode.hostname == n.hostname, Rollout.created_at > created).limit(1))
                if newer is not None:
                    continue
                if self._reconcile(s, n.rollout_id, [n], finished=status):
                    returned.append((n.rollout_id, n.hostname, n.cause))
        for rid, host, cause in returned:  # after the commit: the audit log has its own unit of work
            audit(self.store, "engine", "rollout.node-returned", rid, hostname=host, cause=cause[-500:])

    def _reconcile(self, s: Session, rid: str, failed: list[RolloutNode], *, finished: str | None = None) -> bool:
        """A node failed because its agent vanished mid-step and is back: if its facts now show the target
        flash-attn, verify it (failed → verify); otherwise say how to retry it. Once per attempt.

        ``finished`` (the status of a rollout that has ended): nothing drives its nodes any more, so the node
        stays failed and its cause says what it has now — the target (installed, not verified) or not — and how
        to retry it. True when some node was reconciled."""
        done = False
        for n in failed:
            res = n.result or {}
            if not any(isinstance(v, Mapping) and v.get("vanished") for v in res.values()) \
                    or res.get("reconciled") == n.attempt:
                continue
            node = s.scalar(select(Node).where(Node.hostname == n.hostname))
            if (node is None or node.status != NodeStatus.ONLINE or node.last_seen is None
                    or node.last_seen <= n.updated_at):
                continue
            facts, unreadable = read_facts(node.facts)
            installed = facts.flash_attn.version if facts is not None and facts.flash_attn else None
            target = (n.plan or {}).get("version")
            have = installed or ("absent" if facts is not None else f"unknown ({unreadable})")
            n.result = {**res, "reconciled": n.attempt}
            done = True
            if finished is not None:
                # the cause a node had when its agent vanished is stale now: say what it has and what to do
                n.result["returned"] = {"flash_attn": installed, "target": target,
                                        "at": node.last_seen.isoformat()}
                retry = (f"`fleetctl rollout resume {rid} --retry-failed` retries it"
                         if finished == RolloutStatus.PARTIAL else "roll out again to finish it")
                now_has = (f"flash-attn {target} (the target) installed but not verified" if target and
                           have == target else f"flash-attn {have}, not the target {target}")
                n.cause = (f"{n.cause[:2000]} — back online after the rollout ended ({finished}) with {now_has}: "
                           f"{retry}")
                n.updated_at = utcnow()
            elif target and have == target:
                record(s, rid, n, State.VERIFY, f"reconciled: {n.hostname} is back with flash-attn {target}; "
                                                f"verifying it")
            else:
                n.cause = (f"{n.cause} — {n.hostname} is back online (flash-attn {have}): "
                           f"`fleetctl rollout resume {rid} --retry-failed` after a pause, or roll out again")
        return done

    @staticmethod
    def _rollback_failures(nodes: list[RolloutNode]) -> str:
        """The reason of a ``rollback-failed`` rollout: each failed node's own error, and what to do."""
        failed = [n for n in nodes if n.state == State.FAILED]
        head = "; ".join(f"{n.hostname}: {n.cause[:300]}" for n in failed[:3]) + (
            f"; … and {len(failed) - 3} more" if len(failed) > 3 else "")
        return (f"rollback failed on {len(failed)} node(s) — {head} — fix the cause, then "
                f"`fleetctl rollout rollback ID` again (it retries the failed nodes only)")

    @staticmethod
    def _summary(nodes: list[RolloutNode]) -> str:
        counts: dict[str, int] = {}
        for n in nodes:
            counts[n.state] = counts.get(n.state, 0) + 1
        return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))

    @staticmethod
    def _set_status(s: Session, r: Rollout, status: RolloutStatus, reason: str) -> None:
        log.info("rollout %s: %s → %s (%s)", r.id, r.status, status, reason)
        r.status = status
        r.reason = reason
        r.updated_at = utcnow()
        if status not in ACTIVE_ROLLOUT:
            r.finished_at = r.updated_at

    # ---- one node ----------------------------------------------------------------------------

    async def _node_task(self, rid: str, host: str, held: Held) -> None:
        """Run ``host``'s steps in rollout ``rid`` while the node has one to run now, every unit fenced by ``held``:
        once the lease is gone, the first unit finds out (``LeaseLost``) and the whole rollout stops here."""
        try:
            while not self._stopping:
                step = await self._db(self._prepare, rid, host, held)  # committed before the job is submitted
                if step is None:
                    break
                if step.job_id is None and step.provision is not None and not await self._provide(step, held):
                    continue  # failed, saying why; the next _prepare finds the node failed and stops
                outcome = await self._execute(step, held)
                if outcome is None:
                    continue  # the node left the step before its job was submitted: look at it again
                await self._db(self._finish_step, step, outcome, held)
        except asyncio.CancelledError:
            raise
        except LeaseLost:
            self._lost(rid, held)
        except Exception:  # a database error too (a lock held past the timeout): the next tick restarts the node,
            log.exception("rollout %s: node %s task failed", rid, host)  # re-attaching to its job
        finally:
            self._tasks.pop((rid, host), None)
            self.wake()

    def _is_builder(self, s: Session, n: RolloutNode) -> bool:
        if not n.build_key:
            return False
        b = s.get(Build, n.build_key)
        return b is not None and b.builder == n.hostname and b.status in (BuildStatus.PENDING, BuildStatus.BUILDING)

    def _prepare(self, rid: str, host: str, held: Held) -> StepRun | None:
        """Advance the node through bookkeeping states and return the step to run (or None); fenced by ``held``."""
        now = utcnow()
        with self.store.session() as s:
            hold_lease(s, held)
            r = s.get(Rollout, rid)
            n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == rid, RolloutNode.hostname == host))
            if r is None or n is None:
                return None
            plan = plan_from_json(n.plan)
            opts = r.options or {}
            for _ in range(4):  # bookkeeping moves: planned → first step, waiting → build/install
                state = State(n.state)
                if state in TERMINAL:
                    return None
                if state == State.PLANNED:
                    if r.status != RolloutStatus.RUNNING:
                        return None
                    unshared = self._shared_env_problem(s, n)
                    if unshared:
                        record(s, rid, n, State.FAILED, unshared)
                        return None
                    nxt = next_state(plan, self._is_builder(s, n), State.PLANNED)
                    nxt = self._skip_wait(s, n, nxt)
                    record(s, rid, n, nxt, f"batch {n.batch} started" + (" (canary)" if n.canary else ""))
                    if nxt == State.DONE:
                        return None
                    continue
                if state == State.WAITING:
                    b = s.get(Build, n.build_key) if n.build_key else None
                    if b is None or b.status == BuildStatus.FAILED:
                        record(s, rid, n, State.FAILED, f"build of {n.build_key} failed: "
                               f"{(b.error if b else None) or 'no build record'}")
                        return None
                    if b.status == BuildStatus.SUCCEEDED:
                        record(s, rid, n, State.INSTALL, f"wheel {b.artifact_filename} built on {b.builder}")
                        continue
                    if b.builder == host and r.status == RolloutStatus.RUNNING:
                        record(s, rid, n, State.BUILD, "this node builds the wheel for its build key")
                        continue
                    return None
                break
            state = State(n.state)
            kind = STATE_TO_JOB.get(state)
            if kind is None:
                return None
            if n.job_id is None and n.step_started_at is None:
                if r.status != (RolloutStatus.ROLLING_BACK if state == State.ROLLING_BACK else RolloutStatus.RUNNING):
                    return None  # queued: paused or aborting
                if state == State.BUILD:
                    problem = self._artifact_space_problem(int(opts.get("min_free_bytes", DEFAULT_MIN_FREE_BYTES)))
                    b = s.get(Build, n.build_key) if n.build_key else None
                    if problem:
                        if b is not None:
                            b.status, b.error, b.finished_at = BuildStatus.FAILED, problem, now
                        record(s, rid, n, State.FAILED, problem)
                        return None
                    if b is not None:
                        b.status, b.builder, b.attempts, b.rollout_id = BuildStatus.BUILDING, host, b.attempts + 1, rid
            explicit = (opts.get("step_timeouts") or {}).get(kind)
            timeout = int(explicit or self._default_timeout(kind, plan))
            if not explicit:  # the agent may wait for idle GPUs first (a --step-timeout is the step's whole time)
                timeout += wait_allowance_s(opts.get("busy_policy"), kind)
            if n.step_started_at is None:
                n.step_started_at = now
                n.step_deadline = now + dt.timedelta(seconds=timeout)
            started = n.step_started_at
            deadline = n.step_deadline or started + dt.timedelta(seconds=timeout)
            job_vars = self._job_vars(s, r, n, plan, state)
            if kind in DISTURBING_KINDS and opts.get("busy_policy"):
                job_vars[POLICY_VAR] = opts["busy_policy"]  # the agent's busy-GPU check takes it (agent/busy_guard.py)
            return StepRun(rid, host, state, kind, job_vars, timeout, n.job_id, started, deadline,
                           self._provision(s, n, state))
        # the session commits here: the step's state and start time are durable before the job is submitted

    def _provision(self, s: Session, n: RolloutNode, state: State) -> Provision | None:
        """A real node's build or install: what to get into the store first (None: nothing, or simulated)."""
        if self.provisioner is None or state not in (State.BUILD, State.INSTALL) or not real_executor(n.plan):
            return None
        try:
            needs = NodeNeeds.from_plan(n.plan)
        except FleetError:
            return None  # planned by an older controller: the job vars say what it has
        built = None
        if state == State.INSTALL and n.build_key:
            b = s.get(Build, n.build_key)
            built = b.artifact_sha256 if b is not None and b.status == BuildStatus.SUCCEEDED else None
        return Provision(needs, n.build_key if state == State.BUILD else None, built)

    async def _provide(self, step: StepRun, held: Held) -> bool:
        """Get the step's inputs into the artifact store (fetching from upstream if need be) and add them to its
        job vars. Visible while it runs (the node's cause) and after (``result.artifacts``); a failure fails the
        node — and its build, so nodes waiting on it fail too — with what went wrong and what to do."""
        assert step.provision is not None and self.provisioner is not None
        prov, provisioner = step.provision, self.provisioner
        where = provisioner.upstream.config.describe()
        await self._db(self._note, step, held, f"{step.kind}: getting its artifacts into the store ({where})")
        started = time.monotonic()
        try:
            if step.state == State.BUILD:
                sdist = await asyncio.to_thread(provisioner.sdist, prov.needs)
                extra: dict[str, Any] = {"sdist_sha256": sdist.sha256}
                got = [describe_artifact(sdist)]
            else:
                def install_set() -> Any:  # the artifact store's lookup reads the database: off the loop too
                    built = self.artifacts.get(prov.built_sha256) if prov.built_sha256 and self.artifacts else None
                    return provisioner.install_set(prov.needs, built)

                chosen = await asyncio.to_thread(install_set)
                extra, got = chosen.job_vars(), chosen.describe()
        except FleetError as exc:
            await self._db(self._provision_failed, step, held, exc)
            return False
        except Exception as exc:  # a bug: fail the node saying so, never re-run the step in a loop (the task restarts)
            log.exception("rollout %s: getting %s's artifacts failed", step.rollout_id, step.hostname)
            await self._db(self._provision_failed, step, held, FleetError(
                f"internal error while getting the artifacts: {type(exc).__name__}: {exc}",
                hint="see the controller's log; report it"))
            return False
        step.vars.update(extra)
        await self._db(self._provided, step, held, got, round(time.monotonic() - started, 3))
        return True

    def _provided(self, step: StepRun, held: Held, got: list[dict[str, Any]], seconds: float) -> None:
        with self.store.session() as s:
            hold_lease(s, held)
            n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == step.rollout_id,
                                                   RolloutNode.hostname == step.hostname))
            if n is not None and n.state == str(step.state):
                n.result = {**(n.result or {}), "artifacts": {"step": str(step.state), "files": got,
                                                              "seconds": seconds}}
                n.cause = f"{step.kind}: {len(got)} artifact(s) ready in the store"

    def _on_job_event(self, ev: JobEventRecord) -> None:
        """A step's agent waits for busy GPUs (``fleet_gpu_busy``, agent/busy_guard.py) or has them after waiting
        (``fleet_gpu_idle``): the node's cause says so, for `fleetctl rollout status` and the rollout page. Written
        on the store's pool (the caller may be the event loop), and only while the node is in that job's step.

        Not a leader's write, so not fenced: the events reach the controller the node's agent talks to, which need not
        be the one driving the rollout; the note changes no state, and the job id matches nothing once the node has
        left that step (whoever drives the rollout now)."""
        data = ev.data if isinstance(ev.data, Mapping) else {}
        if ev.event == "fleet_gpu_busy" and data.get("action") == "waiting":
            text = str(data.get("reason") or "waiting for busy GPUs")
        elif ev.event == "fleet_gpu_idle" and float(data.get("waited_s") or 0) > 0:
            text = f"GPUs idle after waiting {data.get('waited_s')}s; the step runs"
        else:
            return
        self.store.executor.submit(self._note_job, ev.job_id, text)

    def _note_job(self, job_id: str, text: str) -> None:
        with self.store.session() as s:  # a node that left the step has no job id any more: nothing matches
            s.execute(update(RolloutNode).where(RolloutNode.job_id == job_id).values(cause=text[:4000])
                      .execution_options(synchronize_session=False))

    def _note(self, step: StepRun, held: Held, text: str) -> None:
        with self.store.session() as s:
            hold_lease(s, held)
            n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == step.rollout_id,
                                                   RolloutNode.hostname == step.hostname))
            if n is not None and n.state == str(step.state):
                n.cause = text[:4000]

    def _provision_failed(self, step: StepRun, held: Held, exc: FleetError) -> None:
        cause = f"{step.kind} not started: {describe_failure(exc)}; then `fleetctl rollout resume " \
                f"{step.rollout_id} --retry-failed`"
        with self.store.session() as s:
            hold_lease(s, held)
            n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == step.rollout_id,
                                                   RolloutNode.hostname == step.hostname))
            if n is None or n.state != str(step.state):
                return
            n.diagnosis = {"diagnoses": [], "error": cause[:2000]}
            if step.provision is not None and step.provision.build_key:
                b = s.get(Build, step.provision.build_key)
                if b is not None:
                    b.status, b.error, b.finished_at = BuildStatus.FAILED, cause, utcnow()
            record(s, step.rollout_id, n, State.FAILED, cause)

    def _skip_wait(self, s: Session, n: RolloutNode, nxt: State) -> State:
        if nxt == State.WAITING and n.build_key:
            b = s.get(Build, n.build_key)
            if b is not None and b.status == BuildStatus.SUCCEEDED:
                return State.INSTALL
        return nxt

    @staticmethod
    def _default_timeout(kind: str, plan: NodePlan) -> int:
        if kind == "build-from-source" and plan.build_minutes:
            return int(min(24 * 3600, max(3600, plan.build_minutes * 60 * 3)))
        return int(DEFAULT_TIMEOUTS.get(kind, 900))

    def _artifact_space_problem(self, min_free: int) -> str | None:
        root = self.artifacts_dir
        if root is None:
            return None
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError as exc:
            return f"artifact store {root} unusable: {exc.strerror or exc}"
        if free < min_free:
            return (f"artifact store {root} is full: {free // 2**20} MiB free, a built wheel needs up to "
                    f"{min_free // 2**20} MiB — free space there (or move --state-dir), then "
                    f"`fleetctl rollout resume ID --retry-failed`")
        return None

    def _job_vars(self, s: Session, r: Rollout, n: RolloutNode, plan: NodePlan, state: State) -> dict[str, Any]:
        """The job's variables: what its playbook reads (docs/playbooks.md), plus rollout bookkeeping."""
        decision = n.plan.get("decision") or {}
        out: dict[str, Any] = {"rollout_id": r.id, "flash_attn_version": plan.version, "variant": plan.variant,
                               "python": n.plan.get("python"), "attempt": n.attempt}
        if plan.variant in DIST_NAMES:
            out["dist_name"] = DIST_NAMES[plan.variant]
        if state == State.KEYRING:
            out.update(apt_keyring_vars(n.plan.get("apt_errors") or []))
        elif state == State.TOOLKIT:
            out.update(cuda_version=decision.get("toolkit"), driver_cuda_max=n.plan.get("driver_cuda_max"))
        elif state == State.BUILD:
            build = decision.get("build") or {}
            out.update(build_key=plan.build_key, build=build, max_jobs=build.get("max_jobs"),
                       nvcc_threads=build.get("nvcc_threads"), **build_target_vars(build))
            if plan.variant == "fa3-source":
                out["sdist_subdir"] = "hopper"
            tk = n.plan.get("toolkit_path")
            if tk and not decision.get("toolkit") and str(tk).endswith("/bin/nvcc"):
                out["cuda_home"] = str(tk)[: -len("/bin/nvcc")]
            sdist = self._sdist(plan)
            if sdist is not None:
                out["sdist_sha256"] = sdist
            out["install"] = False  # the install step that follows installs it, with its dependencies
        elif state == State.INSTALL:
            b = s.get(Build, n.build_key) if n.build_key else None
            if b is not None and b.status == BuildStatus.SUCCEEDED:
                out.update(wheel_sha256=b.artifact_sha256, wheel_filename=b.artifact_filename)
            else:
                out.update(wheel_filename=plan.artifact, wheel_sha256=n.plan.get("artifact_sha256"),
                           wheel_url=n.plan.get("artifact_url"))
        elif state == State.ROLLING_BACK:
            return checked_job_vars(self._rollback_vars(s, r, n), n.hostname)
        elif state == State.VERIFY:
            # what the plan installs is what is verified (FA4 beside an FA2 is judged on FA4): the same rule as
            # `fleetctl verify`'s (verify_store/service.py _expectations)
            out["expect"] = expect_for_variant(plan.variant)
            if (r.options or {}).get("verify_mode"):
                out["mode"] = r.options["verify_mode"]  # agent/verify/job.py: quick | full
        return checked_job_vars(out, n.hostname)  # node-derived values fullmatch their patterns, or go as null

    def _rollback_vars(self, s: Session, r: Rollout, n: RolloutNode) -> dict[str, Any]:
        """rollback.yml's variables (docs/playbooks.md) and nothing else: the playbook restores what its own
        record on the node says was there before the install, and any other variable would become an Ansible
        extra var that beats the playbook's own facts (the bug where ``previous`` broke every real rollback).
        ``rollout_id`` and ``attempt`` are the engine's bookkeeping (``_find_job``); the playbook ignores them.
        When the node had a flash-attn before the rollout, the store's wheel of that exact version goes along
        (``wheel_sha256``; the agent fetches it into ``wheel_path``): the node needs it when fleetctl did not
        install that version (it keeps no wheel of it), and uses its own kept wheel otherwise."""
        out: dict[str, Any] = {"rollout_id": r.id, "attempt": n.attempt, "python": n.plan.get("python")}
        variant = str(n.plan.get("variant"))
        if variant in DIST_NAMES:
            out["dist_name"] = DIST_NAMES[variant]
        version = (n.previous or {}).get("version")
        if version:
            sha = self._previous_wheel(s, n.hostname, str(out.get("dist_name", "flash-attn")), str(version))
            if sha is not None:
                out["wheel_sha256"] = sha
        return out

    def _previous_wheel(self, s: Session, hostname: str, dist: str, version: str) -> str | None:
        """sha256 of a stored wheel of ``dist`` ``version`` that runs on the node (core.pick_previous_wheel)."""
        if self.artifacts is None:
            return None
        prefix = f"{dist.replace('-', '_')}-{version.partition('+')[0]}"
        rows = s.execute(select(Artifact.filename, Artifact.sha256).where(
            Artifact.kind == "wheel", Artifact.filename.startswith(prefix, autoescape=True))).all()
        # only trusted files: vouched for, or the wheel of a build that succeeded (controller/artifacts.py)
        built = set(s.scalars(select(Build.artifact_sha256).where(Build.status == BuildStatus.SUCCEEDED)))
        prov = provenance_of(s, [h for _, h in rows])
        trusted = [(f, h) for f, h in rows if h in built or trusted_for(prov.get(h, ()))]
        facts, _ = read_facts(s.scalar(select(Node.facts).where(Node.hostname == hostname)))
        py = facts.python.version if facts is not None else ""  # unreadable facts: any python, any arch
        tag = "cp" + "".join(py.split(".")[:2]) if py.count(".") >= 1 else None
        return pick_previous_wheel(trusted, dist, version, tag, facts.os.arch if facts is not None else None)

    def _sdist(self, plan: NodePlan) -> str | None:
        """sha256 of the flash-attn sdist in the artifact store (air-gapped nodes build from it). Only a
        vouched-for one (an operator's, the controller's own fetch, a bundle's): never one of unknown origin."""
        if self.artifacts is None or not plan.version:
            return None
        for name in (f"flash_attn-{plan.version}.tar.gz", f"flash-attn-{plan.version}.tar.gz",
                     f"flash_attn_3-{plan.version}.tar.gz"):
            found = self.artifacts.find(name, sources=VOUCHED)
            if found:
                return str(found[0].sha256)
        return None

    async def _execute(self, step: StepRun, held: Held) -> JobOutcome | None:
        """The step's job (submitted by ``_submit``, or the one it already has) and its outcome; None when the node
        left the step before a job was submitted."""
        job_id = step.job_id
        spec: JobSpec | None = None
        if job_id is None:
            submitted = await self._db(self._submit, step, held)
            if submitted is None:
                return None
            job_id, spec = submitted
        if spec is not None:
            self.jobs.offer(step.hostname, spec)  # committed: to the agent now (else the watchdog's claim sends it)
        else:
            log.info("rollout %s: %s re-attached to job %s (%s)", step.rollout_id, step.hostname, job_id, step.kind)
        step.job_id = job_id
        remaining = (step.deadline - utcnow()).total_seconds()
        try:
            return await self.jobs.wait(job_id, timeout=max(0.0, remaining))
        except TimeoutError:
            try:
                await self.jobs.cancel_async(job_id, f"rollout step deadline ({step.timeout}s) passed",
                                             fence=lambda s: hold_lease(s, held))
            except ConflictError:
                finished = await self.store.call(self.jobs.outcome, job_id)
                if finished is not None:
                    return finished
            return JobOutcome(job_id, JobStatus.TIMEOUT, None, {"vanished": True},
                              f"no result for {step.kind} within {step.timeout}s: the node's agent is gone or stuck "
                              f"(`fleetctl node {step.hostname}` shows when it was last seen)")

    def _submit(self, step: StepRun, held: Held) -> tuple[str, JobSpec | None] | None:
        """The step's job and its id on the node (and on its build), in one transaction fenced by ``held``: a job
        that already exists for this step, else a new one (its ``JobSpec``: to offer once this has committed). None
        when the node is no longer in this step. A kill -9 leaves both the job and its id, or neither."""
        with self.store.session() as s:
            hold_lease(s, held)
            n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == step.rollout_id,
                                                   RolloutNode.hostname == step.hostname))
            if n is None or n.state != str(step.state):
                return None
            if n.job_id is not None:
                return n.job_id, None
            spec = None
            job_id = self._find_job(s, step)
            if job_id is None:
                spec = self.jobs.insert_job(s, step.hostname, step.kind, step.vars, step.timeout)
                job_id = spec.job_id
            n.job_id = job_id
            if step.state == State.BUILD and n.build_key:
                b = s.get(Build, n.build_key)
                if b is not None:
                    b.job_id = job_id
            return job_id, spec

    @staticmethod
    def _find_job(s: Session, step: StepRun) -> str | None:
        """A job of this step whose id the node does not have: one submitted by a controller older than ``_submit``,
        killed between submitting it and recording its id."""
        rows = s.scalars(select(Job).where(Job.node == step.hostname, Job.kind == step.kind,
                                           Job.created_at >= step.started_at).order_by(Job.created_at))
        for row in rows:
            v = row.vars or {}
            if v.get("rollout_id") == step.rollout_id and v.get("attempt") == step.vars.get("attempt"):
                return row.id
        return None

    def _finish_step(self, step: StepRun, outcome: JobOutcome, held: Held) -> None:
        with self.store.session() as s:
            hold_lease(s, held)
            n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == step.rollout_id,
                                                   RolloutNode.hostname == step.hostname))
            if n is None or n.state != str(step.state) or n.job_id not in (None, step.job_id):
                return
            r = s.get(Rollout, step.rollout_id)
            plan = plan_from_json(n.plan)
            result = dict(n.result or {})
            result[str(step.state)] = {"job_id": outcome.job_id, "status": outcome.status,
                                       **{k: v for k, v in (outcome.result or {}).items()
                                          if k in ("built_wheel", "stats", "verification", "passed", "summary",
                                                   "vanished", "reasons", "rollback", "busy", "busy_wait_s",
                                                   "gpus")}}
            n.result = result
            job = outcome.job_id
            if not outcome.ok and step.state == State.VERIFY and _NO_VERIFY_RE.search(outcome.error or ""):
                floor = self._metadata_floor(s, n, plan)
                if floor is not None:
                    record(s, step.rollout_id, n, State.DONE, floor, job_id=job)
                    return
            if skipped_busy(outcome.result) and step.state != State.ROLLING_BACK:  # a rollback is never skipped
                self._skip_busy(s, n, step, outcome)
                return
            if not outcome.ok:
                self._fail(s, n, step, outcome)
                return
            if step.state == State.ROLLING_BACK:
                # what the node must have from now on (no flash-attn after a removal: not degraded)
                record_after_rollback(result, outcome.result, n.previous)
                n.result = result
                expected = result[EXPECTED_KEY]["flash_attn"]
                action = ((outcome.result or {}).get("rollback") or {}).get("action")
                record(s, step.rollout_id, n, State.ROLLED_BACK,
                       "nothing to roll back: no install by fleetctl is recorded on the node" if action == "none"
                       else f"previous flash-attn {expected} restored" if expected else
                       "flash-attn removed (the node had none before the rollout)", job_id=job)
                return
            if step.state == State.VERIFY:
                passed, why = verification_verdict(outcome.result or {})
                if passed:
                    record(s, step.rollout_id, n, State.DONE, f"verification passed{': ' + why if why else ''}",
                           job_id=job)
                else:
                    n.diagnosis = {"diagnoses": diagnose_text(why)}
                    record(s, step.rollout_id, n, State.FAILED, f"verification failed: {why}", job_id=job)
                return
            if step.state == State.BUILD:
                problem = self._record_build(s, n, outcome)
                if problem:
                    record(s, step.rollout_id, n, State.FAILED, problem, job_id=job)
                    return
            builder = step.state == State.BUILD
            nxt = self._skip_wait(s, n, next_state(plan, builder, step.state))
            cause = f"{step.kind} succeeded"
            if nxt == State.WAITING and self._is_builder(s, n) and r is not None:
                nxt = State.BUILD
            record(s, step.rollout_id, n, nxt, cause, job_id=job)

    @staticmethod
    def _metadata_floor(s: Session, n: RolloutNode, plan: NodePlan) -> str | None:
        """The agent cannot run ``verify`` jobs (no verification runner there yet): pass when the node's
        fresh facts report the target flash-attn installed — a metadata check, and said so."""
        facts, _ = read_facts(s.scalar(select(Node.facts).where(Node.hostname == n.hostname)))
        fa = facts.flash_attn if facts is not None else None  # unreadable facts vouch for nothing
        if plan.version and fa is not None and any(f.version == plan.version for f in fa.installed):
            return (f"verified by the floor only: this agent cannot run verify jobs; the node reports flash-attn "
                    f"{plan.version} installed (package metadata)")
        return None

    def _record_build(self, s: Session, n: RolloutNode, outcome: JobOutcome) -> str | None:
        b = s.get(Build, n.build_key) if n.build_key else None
        wheel = (outcome.result or {}).get("built_wheel") or {}
        sha = wheel.get("sha256") if isinstance(wheel, Mapping) else None
        problem = None
        if not sha:
            problem = "build finished but reported no built wheel (built_wheel.sha256 missing)"
        elif self.artifacts is not None:
            try:
                info = self.artifacts.get(sha)
            except NotFoundError:
                problem = (f"built wheel {sha[:12]}… never reached the artifact store (upload failed: disk full or "
                           f"size limit?) — check the controller's state dir, then `fleetctl rollout resume ID "
                           f"--retry-failed`")
            else:
                # the build's wheel is what a job of this build key uploaded (controller/build_uploads.py), or
                # bytes an operator/upstream vouched for; never a file of another origin the node points at
                if not trusted_for(info.sources, n.build_key):
                    problem = (f"build reported wheel {sha[:12]}… ({info.filename}), but the artifact store has it "
                               f"from {info.provenance.describe()}, not from a build job of this build key — "
                               f"refused; `fleetctl rollout resume ID --retry-failed` builds again")
        if b is not None:
            b.finished_at = utcnow()
            if problem:
                b.status, b.error = BuildStatus.FAILED, problem
            else:
                b.status, b.artifact_sha256 = BuildStatus.SUCCEEDED, sha
                b.artifact_filename = str(wheel.get("filename") or "")
        return problem

    def _fail(self, s: Session, n: RolloutNode, step: StepRun, outcome: JobOutcome) -> None:
        text = "\n".join(str(x) for x in (outcome.error, (outcome.result or {}).get("stderr"),
                                          (outcome.result or {}).get("log")) if x)
        findings = diagnose_text(text)
        n.diagnosis = {"diagnoses": findings, "error": (outcome.error or "")[:2000]}
        cause = f"{step.kind} {outcome.status}: {(outcome.error or 'no error text').splitlines()[0][:500]}"
        if findings:
            cause += f" — diagnosis: {findings[0].get('cause', '')}"
        if step.state == State.BUILD and n.build_key:
            b = s.get(Build, n.build_key)
            if b is not None and b.status != BuildStatus.FAILED:
                b.status, b.error, b.finished_at = BuildStatus.FAILED, cause, utcnow()
        elif n.build_key and self._is_builder(s, n):
            self._reelect(s, n)
        record(s, step.rollout_id, n, State.FAILED, cause, job_id=outcome.job_id)

    def _skip_busy(self, s: Session, n: RolloutNode, step: StepRun, outcome: JobOutcome) -> None:
        """``--when-busy skip`` and the node's GPUs were busy: nothing ran there. The node is ``skipped-busy`` (still
        to do: ``resume --retry-failed``, never counted failed); a builder hands its build to another node of its
        key."""
        record(s, step.rollout_id, n, State.SKIPPED_BUSY, outcome.error or "skipped: GPUs busy", job_id=outcome.job_id)
        if step.state == State.BUILD and n.build_key:
            b = s.get(Build, n.build_key)
            if b is not None and b.status == BuildStatus.BUILDING:
                b.status = BuildStatus.PENDING
                self._reelect(s, n)

    @staticmethod
    def _shared_env_problem(s: Session, n: RolloutNode) -> str | None:
        """A node that only verifies a shared target env (``plan.shared_env``, core.shared_env_installers) starts once
        its installer has finished: why it cannot go on when the installer did not get to ``done``, else None."""
        installer = (n.plan.get("shared_env") or {}).get("installer")
        if not installer:
            return None
        lead = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == n.rollout_id,
                                                  RolloutNode.hostname == installer))
        if lead is not None and lead.state == State.DONE:
            return None
        where = f"{lead.state}: {lead.cause[:300]}" if lead is not None else "not in this rollout"
        return (f"shared env not installed: {installer}, which installs it for this node, is {where} — fix that "
                f"node, then `fleetctl rollout resume {n.rollout_id} --retry-failed`")

    def _reelect(self, s: Session, failed: RolloutNode) -> None:
        """The builder failed before building: hand the build to another node of the same key."""
        b = s.get(Build, failed.build_key)
        if b is None:
            return
        others = [o for o in s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == failed.rollout_id,
                                                                  RolloutNode.build_key == failed.build_key))
                  if o.hostname != failed.hostname and State(o.state) not in TERMINAL]
        others.sort(key=lambda o: (o.batch, o.hostname))
        if others:
            b.builder = others[0].hostname
            log.info("build %s: builder %s failed before building; %s builds instead", b.build_key,
                     failed.hostname, b.builder)
        else:
            b.status, b.error = BuildStatus.FAILED, f"builder {failed.hostname} failed and no node is left"
            b.finished_at = utcnow()
