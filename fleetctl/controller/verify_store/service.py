"""The controller side of verification, wired into a running controller.

``VerificationService(ctx).attach()``:

* every finished ``verify`` job (whoever submitted it: ``fleetctl verify``, a schedule, drift, a
  rollout) is recorded (``store.record``: judged against the fleet baseline, with the facts snapshot)
  and the node's health updated: a failure marks the node ``degraded`` (status + diagnosis + re-plan),
  a later pass clears it;
* a facts change that matters (driver, torch version/CUDA, toolkit, flash-attn) is recorded as a pending
  re-verification of that node in the database (``drift``: a row, debounced — changes within ``drift_delay``
  seconds collapse into one), and ``run_drift_checks``, the ``drift-checks`` leader duty (one controller of
  those sharing the database), submits it when due — none while a verify job of the node is active or has
  finished since the change. A check outlives the controller that recorded it;
* ``submit`` starts verify jobs on nodes chosen by hostnames or a rollout-style selector;
* ``run_scheduler`` runs the schedules (controller.verify_store.schedules).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.leases import Held, db_now, fence
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.registry import NodeRecord, record_of, selection_info
from fleetctl.controller.rollout.core import parse_selector, select_nodes
from fleetctl.controller.rollout.expectation import expected_after_rollback
from fleetctl.controller.rollout.service import nodes_in_active_rollouts
from fleetctl.controller.store.models import Job, Node
from fleetctl.controller.verification import DEFAULT_POLICY, RegressionPolicy
from fleetctl.controller.verify_store import drift, schedules, store
from fleetctl.controller.verify_store.models import Verification
from fleetctl.fleet.errors import FleetError, StoreError, UsageError
from fleetctl.fleet.jobs import ACTIVE, RAN_TO_END, JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.verification import VerificationSchemaError, expect_for_variant
from fleetctl.fleet.workload import BusyPolicy, busy_refusal, wait_allowance_s

log = logging.getLogger(__name__)

T = TypeVar("T")

DRIFT_PATHS = ("driver", "torch", "toolkit", "flash_attn")  # any change below these paths
DRIFT_DELAY_SECONDS = 10.0  # ControllerSettings.drift_debounce
# the drift-checks leader looks for due checks at least this often: one recorded by another controller is submitted
# at most this late (one recorded by the leader itself wakes it at once)
DRIFT_POLL_SECONDS = 2.0
JOB_TIMEOUT = {"quick": 300, "full": 900}
RECORD_ATTEMPTS = 8  # ~1 minute of backoff: rides out a database restart or a failover
# Verification's units of work (a submission's read and its insert, a result's record) running on the store's threads
# at once; the others wait on the event loop, which costs nothing. Each is Python from end to end (SQLAlchemy, facts,
# parsing and judging a result) and holds the GIL for most of its time: with all 8 store threads on them (a burst of
# `fleetctl verify`, a schedule, more jobs offered than the controller completes) the event loop waited for the GIL
# behind them, and every heartbeat with it (benchmarks/ha_throughput.py, 1 controller, 30 verify jobs/s offered on
# 2 cores: heartbeat p99 0.6 s with 8 at once, 0.1-0.2 s with 2, for 21-23 jobs/s completed instead of 24-26).
VERIFY_UNITS_AT_ONCE = 2


def drift_relevant(changed: Sequence[str]) -> list[str]:
    """The changed facts paths that can break or slow flash-attn (``["*"]``, a first report, is none)."""
    out = []
    for path in changed:
        if path == "*":
            continue
        if any(path == p or path.startswith(p + ".") for p in DRIFT_PATHS):
            out.append(path)
    return out


@dataclass(frozen=True)
class Submitted:
    """What ``VerificationService.submit`` queued."""

    jobs: dict[str, str]  # hostname → verify job id (an unfinished one of the node's is reused)
    skipped: dict[str, str]  # hostname → why no job (its stored facts are unreadable)


@dataclass(frozen=True)
class _Prepared:
    """What ``VerificationService._prepare`` found for a submission."""

    jobs: dict[str, str]  # hostname → its unfinished verify job, reused
    expect: dict[str, str]  # hostname → what its new job's verification expects
    skipped: dict[str, str]  # hostname → why no job
    gpu_counts: dict[str, int]  # hostname → GPUs its facts report (a verification of all runs one bench each)


def _read_nodes(s: Session, hosts: Sequence[str]) -> list[NodeRecord]:
    # named hosts read only their rows: a job submitted per node (a schedule, `fleetctl verify HOST`) must not
    # cost a read of the whole fleet (benchmarks/ha_throughput.py found it a quarter of a job's CPU at 300 nodes)
    query = select(Node).where(Node.hostname.in_(hosts)) if hosts else select(Node)
    return [record_of(r) for r in s.scalars(query)]


def choose(records: Sequence[NodeRecord], hosts: Sequence[str], selector: str | None) -> list[str]:
    """The nodes to verify: ``hosts`` (all must be known; narrowed by ``selector`` when both are given), else those
    ``selector`` matches that are not offline (``UsageError`` when none is)."""
    infos = [selection_info(r) for r in records]
    if hosts:
        known = {i.hostname for i in infos}
        missing = [h for h in hosts if h not in known]
        if missing:
            raise UsageError(f"unknown node(s): {', '.join(missing)}", hint="see `fleetctl nodes`")
        chosen = list(dict.fromkeys(hosts))
        if selector:
            chosen = [n.hostname for n in select_nodes(parse_selector(selector),
                                                       [i for i in infos if i.hostname in chosen])]
        return chosen
    chosen = [n.hostname for n in select_nodes(parse_selector(selector), infos)
              if n.status is not NodeStatus.OFFLINE]
    if not chosen:
        raise UsageError(f"every node matching {selector or 'all'!r} is offline",
                         hint="name offline nodes explicitly to queue a verification for when they return")
    return chosen


def _active_verify_jobs(s: Session, hosts: Sequence[str]) -> dict[str, str]:
    """{hostname: id} of verify jobs not finished yet on these nodes (oldest per node)."""
    out: dict[str, str] = {}
    for start in range(0, len(hosts), 500):
        rows = s.execute(select(Job.node, Job.id).where(
            Job.kind == "verify", Job.status.in_(tuple(ACTIVE)),
            Job.node.in_(list(hosts[start:start + 500]))).order_by(Job.created_at.desc()))
        for node, job_id in rows:
            out[node] = job_id
    return out


class VerificationService:
    def __init__(self, ctx: Any, *, drift_delay: float = DRIFT_DELAY_SECONDS,
                 policy: RegressionPolicy = DEFAULT_POLICY) -> None:
        self.ctx = ctx
        self.drift_delay = drift_delay
        self.policy = policy
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drift_recorded = asyncio.Event()  # wakes this controller's drift-checks duty, if it leads
        self.drift_submitted: list[tuple[str, str]] = []  # (hostname, job id), for tests and logs
        self._attached = False
        # VERIFY_UNITS_AT_ONCE per event loop: the controller's, and one of its own for a job finished off the loop
        # (``_spawn``), whose waits could not be woken from the controller's
        self._units_of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
            weakref.WeakKeyDictionary()

    # ---- wiring -----------------------------------------------------------------------------------------

    def attach(self) -> VerificationService:
        if self._attached:
            return self
        self._attached = True
        previous = self.ctx.jobs.on_job_finished

        def finished(node: str, outcome: JobOutcome) -> None:
            if previous is not None:
                previous(node, outcome)
            self.job_finished(node, outcome)

        self.ctx.jobs.on_job_finished = finished
        hooks = getattr(self.ctx.registry, "on_facts_changed", None)
        if hooks is not None:
            hooks.append(self.facts_changed)
        return self

    def _spawn(self, coro: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called from a worker thread (e.g. a job finished outside the loop): run it here
            asyncio.run(coro)
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """One of verification's units of work on the store's threads, at most VERIFY_UNITS_AT_ONCE at a time."""
        loop = asyncio.get_running_loop()
        units = self._units_of.get(loop)
        if units is None:
            units = self._units_of[loop] = asyncio.Semaphore(VERIFY_UNITS_AT_ONCE)
        async with units:
            done: T = await self.ctx.store.call(fn, *args, **kwargs)
        return done

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until recording and drift work started so far is done (tests)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._tasks:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("verification service still busy")
            await asyncio.wait(set(self._tasks), timeout=left)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # ---- results -----------------------------------------------------------------------------------------

    def job_finished(self, node: str, outcome: JobOutcome) -> None:
        """Job hook (event loop thread): record a finished verify job, off the loop and retried."""
        if outcome.status == JobStatus.CANCELED:
            return
        self._spawn(self._record(node, outcome))

    async def _record(self, node: str, outcome: JobOutcome) -> None:
        """Record with retries: a database fault (a dropped connection, a lock, a full disk) must not lose the
        record. ``store.record`` is idempotent per job id, so a retry after a lost commit answer is harmless;
        what is still not recorded after the last attempt is found by ``recover`` at the next start. A job that did not
        run because the node's GPUs were busy measured nothing: no verification, the node's health stays as it is."""
        refused = busy_refusal(outcome.result)
        if refused is not None:
            log.info("verification of %s (job %s) not run: %s", node, outcome.job_id, refused.get("reason"))
            return
        delay = 0.5
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                recorded = await self._unit(self.record_outcome, node, outcome)
                break
            except FleetError as exc:
                if attempt == RECORD_ATTEMPTS:
                    log.error("verification of %s (job %s) not recorded after %d attempts: %s; it is recorded "
                              "when the controller next starts", node, outcome.job_id, attempt, exc.message)
                    return
                log.warning("verification of %s (job %s) not recorded yet (%s); retry %d in %.1fs", node,
                            outcome.job_id, exc.message, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if recorded is None:  # not a verify job
            return
        await self.apply_status(node, *recorded)
        if self.ctx.node_labels is not None:  # the node's Kubernetes labels follow the verdict just recorded
            await self.ctx.node_labels.published(node)

    def unrecorded(self, limit: int = 500) -> list[tuple[str, JobOutcome]]:
        """Finished verify jobs without a verification record (a fault outlasted ``_record``'s retries)."""
        with self.ctx.store.session() as s:
            rows = s.scalars(select(Job).where(
                Job.kind == "verify", Job.status.in_(sorted(RAN_TO_END)),
                ~select(Verification.id).where(Verification.job_id == Job.id).exists())
                .order_by(Job.finished_at).limit(limit))
            return [(r.node, JobOutcome(r.id, JobStatus(r.status), r.rc, r.result or {}, r.error)) for r in rows
                    if busy_refusal(r.result) is None]

    async def recover(self) -> int:
        """Record what earlier faults left unrecorded (started with the controller); returns how many."""
        try:
            missing = await self.ctx.store.call(self.unrecorded)
        except FleetError as exc:
            log.warning("unrecorded verifications not checked: %s", exc.message)
            return 0
        for node, outcome in missing:
            log.info("recording verification of %s (job %s) that an earlier fault left unrecorded", node,
                     outcome.job_id)
            self._spawn(self._record(node, outcome))
        return len(missing)

    def record_outcome(self, node: str, outcome: JobOutcome) -> tuple[store.HealthChange, str] | None:
        """Store one finished verify job; returns (health change, reason), or None when the job is not a verify
        job. Thread-safe: the result's parsing and judging run here, on the store's thread, not on the loop."""
        def write(s: Session) -> tuple[store.HealthChange, str] | None:
            job = s.get(Job, outcome.job_id)
            if job is None or job.kind != "verify":
                return None
            try:
                result = store.result_from_job(outcome.result)
            except VerificationSchemaError:  # judge_job names what is unreadable
                result = None
            vars_ = job.vars or {}
            trigger = str(vars_.get("trigger") or ("rollout" if vars_.get("rollout_id") else "job"))
            schedule_id = vars_.get("schedule_id") if isinstance(vars_.get("schedule_id"), int) else None
            row = store.record(s, node, result, job_id=outcome.job_id, job_status=outcome.status,
                               job_error=outcome.error, job_result=outcome.result, trigger=trigger,
                               schedule_id=schedule_id, policy=self.policy)
            # only a failure is re-planned: the catalog is not read for a pass
            change, state = store.apply_health(s, row, catalog=self._catalog(s) if store.is_failure(row) else None)
            log.info("verification of %s (%s, %s): %s", node, trigger, outcome.job_id, row.status)
            return change, state.reason

        # retried on a dropped connection or a lock timeout; idempotent per job id (verifications.job_id is unique)
        written: tuple[store.HealthChange, str] | None = self.ctx.store.write(
            write, what=f"verification of {node} (job {outcome.job_id})")
        return written

    def _catalog(self, s: Session) -> Any:
        """The rollout's catalog (``controller_catalog``), so a re-plan picks the wheels our builds stored."""
        try:
            return controller_catalog(s, self.ctx.settings.state_dir)
        except (FleetError, OSError):
            return None

    async def apply_status(self, node: str, change: store.HealthChange, reason: str) -> None:
        """Registry status from a health change (event loop thread; the status is written off the loop)."""
        try:
            if change is store.HealthChange.DEGRADED:
                await self.ctx.registry.set_status_async(node, NodeStatus.DEGRADED, reason[:500])
            elif change is store.HealthChange.CLEARED and self.ctx.registry.status_of(node) is NodeStatus.DEGRADED:
                await self.ctx.registry.set_status_async(node, NodeStatus.ONLINE, "verification passed")
        except FleetError as exc:
            log.warning("status of %s not changed: %s", node, exc.message)

    # ---- submitting --------------------------------------------------------------------------------------

    def select(self, hosts: Sequence[str] = (), selector: str | None = None) -> list[str]:
        """The nodes a submission of ``hosts`` and/or ``selector`` verifies (``choose``)."""
        with self.ctx.store.session() as s:
            return choose(_read_nodes(s, hosts), hosts, selector)

    def _prepare(self, hosts: Sequence[str], selector: str | None, trigger: str,
                 held: Collection[str]) -> _Prepared:
        """What a submission needs to know, in one unit of work on the nodes read once: the chosen nodes, less
        those ``held`` by active rollouts; their unfinished verify jobs (reused: no pile-up); what the others'
        verifications expect and their GPU counts. Before, each of these read and parsed the nodes again in a unit
        of work of its own (benchmarks/ha_throughput.py: a third of a job's controller CPU was the submission)."""
        with self.ctx.store.session() as s:
            records = _read_nodes(s, hosts)
            chosen = choose(records, hosts, selector)
            skipped_held = [h for h in chosen if h in held]
            if skipped_held:
                log.info("%s verification skips %s (in active rollouts)", trigger, ", ".join(skipped_held))
            chosen = [h for h in chosen if h not in held]
            jobs = _active_verify_jobs(s, chosen)
            by_host = {r.hostname: r for r in records}
            expect, skipped = self._expectations(s, [h for h in chosen if h not in jobs], by_host)
        gpus = {h: len(facts.gpus) for h in expect if (facts := by_host[h].facts) is not None}
        return _Prepared(jobs, expect, skipped, gpus)

    def _expectations(self, s: Session, hosts: Sequence[str],
                      records: Mapping[str, NodeRecord]) -> tuple[dict[str, str], dict[str, str]]:
        """What each node's verification expects (``fleet.verification.expect_for_variant``: ``fa3``/``fa4``
        for those, else ``flash_attn``) where FlashAttention is installed; where it is not, what
        a clean rollback recorded the node must have (``sdpa`` after one that removed flash-attn: that node is
        as intended, not degraded; controller/rollout/expectation.py), else what a rollout would install
        (``flash_attn``, ``fa3`` for ``fa3-source``, ``fa4``) and ``sdpa`` when nothing. The catalog is built
        once, and only when needed. Returns (expectations, {hostname: why skipped}): a node whose stored facts
        are unreadable expects nothing that can be known, so it is skipped until its agent reports again."""
        out: dict[str, str] = {}
        skipped: dict[str, str] = {}
        catalog: Any = None
        for host in hosts:
            node = records.get(host)
            if node is None or node.facts is None:
                skipped[host] = node.facts_error or "no facts" if node is not None else "no longer registered"
                continue
            facts = node.facts
            if facts.flash_attn is not None:
                out[host] = expect_for_variant(facts.flash_attn.variant)
                continue
            after_rollback = expected_after_rollback(s, host)
            if after_rollback is not None:
                out[host] = after_rollback.verify_expect
                continue
            if catalog is None:
                catalog = self._catalog(s)
            plan = store.replan(facts, catalog)
            out[host] = expect_for_variant(str(plan.get("variant") or ""))
        return out, skipped

    async def submit(self, hosts: Sequence[str] = (), selector: str | None = None, *, mode: str = "full",
                     trigger: str = "manual", schedule_id: int | None = None, model_path: str | None = None,
                     timeout: int | None = None, busy: BusyPolicy | None = None) -> Submitted:
        """Submit one verify job per chosen node; returns their jobs, and the nodes skipped with why. ``busy``: what
        the node's agent does when its GPUs are busy and which it measures (default: wait, one idle GPU); the job's
        timeout covers the wait and one bench per GPU measured."""
        if mode not in JOB_TIMEOUT:
            raise UsageError(f"unknown verification mode {mode!r}", hint="use quick or full")
        # a node an active rollout holds is verified by the rollout itself
        held = await self.ctx.store.call(self.held_by_rollouts) if trigger in ("schedule", "drift") else {}
        prepared = await self._unit(self._prepare, hosts, selector, trigger, held)
        for host, why in prepared.skipped.items():
            log.warning("%s verification skips %s: %s", trigger, host, why)
        new: dict[str, tuple[str, dict[str, Any], int]] = {}  # host → (job id, vars, timeout)
        for host, expected in prepared.expect.items():
            vars_: dict[str, Any] = {"mode": mode, "expect": expected, "trigger": trigger}
            if schedule_id is not None:
                vars_["schedule_id"] = schedule_id
            if model_path:
                vars_["model_path"] = model_path
            if busy is not None:
                vars_["busy_policy"] = busy.to_vars()
            benches = busy.gpus.most_measured(prepared.gpu_counts.get(host, 1)) if busy is not None else 1
            job_timeout = timeout or JOB_TIMEOUT[mode] * benches + wait_allowance_s(vars_.get("busy_policy"), "verify")
            new[host] = (uuid.uuid4().hex, vars_, job_timeout)

        def insert(s: Session) -> dict[str, JobSpec]:  # ids chosen before: a retry after a lost commit adds none
            return {host: self.ctx.jobs.insert_job(s, host, "verify", vars_, job_timeout, job_id=job_id)
                    for host, (job_id, vars_, job_timeout) in new.items()}

        jobs = dict(prepared.jobs)
        if new:  # one transaction for all of them, then each offered to its agent (JobDispatcher.submit_job's steps)
            specs = await self._unit(self.ctx.store.write, insert, what=f"verify jobs of {len(new)} node(s)")
            for host, spec in specs.items():
                self.ctx.jobs.offer(host, spec)
                jobs[host] = spec.job_id
        return Submitted(jobs, prepared.skipped)

    def held_by_rollouts(self) -> dict[str, str]:
        return nodes_in_active_rollouts(self.ctx.store)

    async def submit_for_schedule(self, selector: str, mode: str, schedule_id: int,
                                  run_id: int) -> tuple[dict[str, str], str | None]:
        done = await self.submit(selector=selector, mode=mode, trigger="schedule", schedule_id=schedule_id)
        note = "; ".join(f"{host} skipped: {why}" for host, why in done.skipped.items())
        return done.jobs, note or None

    async def run_scheduler(self, tick_seconds: float = schedules.TICK_SECONDS,
                            stop: asyncio.Event | None = None) -> None:
        await schedules.run_scheduler(self.ctx.store, self.submit_for_schedule, tick_seconds=tick_seconds, stop=stop)

    # ---- drift -------------------------------------------------------------------------------------------

    def facts_changed(self, hostname: str, changed: Sequence[str]) -> None:
        """Registry hook (event loop thread): record a pending re-verification after a relevant change."""
        relevant = drift_relevant(changed)
        if not relevant:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not on the event loop: the duty's wake-up event belongs to it
            return
        self._spawn(self._record_drift(hostname, relevant))

    def _write_drift(self, hostname: str, paths: Sequence[str], delay: float) -> drift.PendingDrift:
        def write(s: Session) -> drift.PendingDrift:
            return drift.record(s, hostname, paths, db_now(s), delay, self.ctx.registry.holder)

        pending: drift.PendingDrift = self.ctx.store.write(write, what=f"drift check of {hostname}")
        return pending

    async def _record_drift(self, hostname: str, paths: Sequence[str]) -> None:
        try:
            pending = await self.ctx.store.call(self._write_drift, hostname, paths, self.drift_delay)
        except FleetError as exc:
            log.error("node %s: %s changed, but the drift re-verification was not recorded: %s", hostname,
                      ", ".join(paths), exc.message)
            return
        log.info("node %s: %s changed; re-verifying in %.0fs (pending since %s: %s)", hostname, ", ".join(paths),
                 self.drift_delay, pending.first_changed_at.isoformat(timespec="seconds"), ", ".join(pending.paths))
        self._drift_recorded.set()

    def _due_drift_checks(self) -> tuple[list[drift.PendingDrift], float]:
        """The checks due now, and how long to sleep after them (database clock)."""
        with self.ctx.store.session() as s:
            now = db_now(s)
            return drift.due(s, now), drift.wait_seconds(drift.next_due(s), now, DRIFT_POLL_SECONDS)

    async def run_drift_checks(self, held: Held) -> None:
        """The ``drift-checks`` leader duty (controller/app.py runs it under its lease): submit each pending check
        when due, then remove it with a write fenced by the lease. A check is removed only after its job was
        submitted, so a leader killed in between leaves it for the next one, whose ``_verify_job_since`` finds the
        job and submits no second."""
        while True:
            self._drift_recorded.clear()
            try:
                checks, wait = await self.ctx.store.call(self._due_drift_checks)
            except FleetError as exc:
                log.warning("drift checks not read: %s; again in %.0fs", exc.message, DRIFT_POLL_SECONDS)
                checks, wait = [], DRIFT_POLL_SECONDS
            for check in checks:
                if not await self._drift(check, held):
                    wait = DRIFT_POLL_SECONDS  # kept for a retry: not at once, the database is failing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drift_recorded.wait(), wait)

    def _verify_job_since(self, hostname: str, since: dt.datetime) -> str | None:
        """A verify job of ``hostname`` unfinished or finished since ``since`` (it covers the drift), or None.
        ``since`` is on the database's clock, a job's ``finished_at`` on its recording controller's: on PostgreSQL
        the hosts' clock skew (NTP: milliseconds) blurs "since" by as much."""
        with self.ctx.store.session() as s:
            found: str | None = s.scalar(select(Job.id).where(
                Job.node == hostname, Job.kind == "verify",
                (Job.status.in_(tuple(ACTIVE))) | (Job.finished_at >= since)).limit(1))
            return found

    def _settle_drift(self, check: drift.PendingDrift, held: Held) -> bool:
        with self.ctx.store.session() as s:
            return drift.settle(s, check, fence(held.name, held.token, db_now(s)))

    async def _drift(self, check: drift.PendingDrift, held: Held) -> bool:
        """Handle one due check; False when it is kept for a retry (the database failed)."""
        hostname, paths = check.hostname, ", ".join(check.paths)
        try:  # on the store's pool: a locked database must not stall the loop (heartbeats, /live)
            busy = await self.ctx.store.call(self._verify_job_since, hostname, check.first_changed_at)
            if busy is not None:
                log.info("node %s: drift re-verification not needed (verify job %s covers it)", hostname, busy)
            else:
                jobs = (await self.submit([hostname], mode="quick", trigger="drift")).jobs
                if hostname in jobs:
                    log.info("node %s: drift (%s) → verify job %s", hostname, paths, jobs[hostname])
                    self.drift_submitted.append((hostname, jobs[hostname]))
            await self.ctx.store.call(self._settle_drift, check, held)
        except StoreError as exc:
            log.warning("drift re-verification of %s kept for a retry: %s", hostname, exc.message)
            return False
        except FleetError as exc:  # e.g. the node is no longer registered: nothing to verify, ever
            log.warning("drift re-verification of %s not submitted: %s", hostname, exc.message)
            with contextlib.suppress(FleetError):
                await self.ctx.store.call(self._settle_drift, check, held)
        return True
