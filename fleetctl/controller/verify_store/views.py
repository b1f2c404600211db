"""Typed read views of the stored verification results: what the dashboard, /metrics and the node summary show.

Every reader of ``verifications`` outside ``controller.verify_store`` goes through these functions; the
verdict in each row is the one ``store.record`` stored (``fleet.verification.judge``), never re-decided.

Ordering is by the controller's clock (``recorded_at``) and the row id the controller assigned; the agent's
clock (``measured_at``) is shown with the skew between the two, and never used to order or to filter.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from fleetctl.controller.store import utcnow
from fleetctl.controller.verify_store.models import NodeVerifyState, Verification, VerifySchedule, VerifyScheduleRun
from fleetctl.controller.verify_store.schedules import next_due

# an agent clock this far from the controller's is flagged on the node page (results still count: the
# controller's clock orders them)
SKEW_FLAG_SECONDS = 300.0


@dataclass(frozen=True)
class VerificationView:
    """One stored verification result, as the dashboard shows it."""

    id: int
    job_id: str | None
    hostname: str
    gpu_model: str
    status: str  # the stored verdict: pass | fail | regression | timeout | error | no-gpu | no-torch | a job state
    passed: bool
    simulated: bool
    recorded_at: dt.datetime  # the controller's clock: orders results
    measured_at: dt.datetime | None  # the agent's clock: when the run finished on the node
    tflops: float | None
    sdpa_tflops: float | None
    peak_mem_mib: float | None
    detail: str
    gpus: tuple[int, ...] = ()  # the GPU indices measured; empty: not reported (older agents: GPU 0)

    @property
    def at(self) -> dt.datetime:
        """When the result happened, on the controller's clock (what every page shows as "when")."""
        return self.recorded_at

    @property
    def clock_skew_s(self) -> float | None:
        """The agent's clock minus the controller's at this result (positive: the agent runs ahead)."""
        if self.measured_at is None:
            return None
        return (_aware(self.measured_at) - _aware(self.recorded_at)).total_seconds()

    @property
    def skew_flagged(self) -> bool:
        skew = self.clock_skew_s
        return skew is not None and abs(skew) > SKEW_FLAG_SECONDS

    @property
    def result(self) -> str:
        """passed | failed: the node table's verification column."""
        return "passed" if self.passed else "failed"

    @property
    def memory(self) -> str:
        return f"{self.peak_mem_mib:.0f} MiB" if self.peak_mem_mib is not None else ""


@dataclass(frozen=True)
class MedianPoint:
    """The fleet median FlashAttention TFLOP/s of one GPU model on one day (by the controller's clock)."""

    at: dt.datetime
    tflops: float
    nodes: int


@dataclass(frozen=True)
class GpuVerificationCounts:
    """Per GPU model: nodes whose latest verification passed / did not, and the median TFLOP/s of those."""

    gpu: str
    passed: int
    failed: int
    tflops_median: float | None


@dataclass(frozen=True)
class NodeHealthView:
    """A degraded node's verification health, as ``store.apply_health`` decided it: why, the diagnoses of the
    failure (``controller.diagnose``, red herrings included) and the resolver's re-plan on its facts."""

    since: dt.datetime | None
    reason: str
    diagnosis: tuple[dict[str, Any], ...]
    replan: dict[str, Any] | None


@dataclass(frozen=True)
class ScheduleRunResult:
    """What the verify jobs of a schedule's last run came to (from the verifications they produced)."""

    nodes: int
    passed: int
    failed: int
    failed_hosts: tuple[str, ...]  # the first ten
    pending: int  # jobs with no stored verification yet
    error: str | None  # why the run submitted nothing, if so


@dataclass(frozen=True)
class ScheduleView:
    """One re-verification schedule with its next run and its last run's result."""

    id: int
    cron: str
    selector: str
    mode: str
    enabled: bool
    created_by: str
    next_run: dt.datetime | None  # None: disabled, or a cron that never fires
    last_run: dt.datetime | None
    last_result: ScheduleRunResult | None

    @property
    def name(self) -> str:
        return f"#{self.id}"


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _view(row: Verification) -> VerificationView:
    return VerificationView(id=row.id, job_id=row.job_id, hostname=row.hostname, gpu_model=row.gpu_model,
                            status=row.status, passed=row.passed, simulated=row.simulated,
                            recorded_at=_aware(row.recorded_at),
                            measured_at=_aware(row.measured_at) if row.measured_at is not None else None,
                            tflops=row.tflops, sdpa_tflops=row.sdpa_tflops, peak_mem_mib=row.peak_mem_mib,
                            detail=row.detail, gpus=tuple(row.gpus or ()))


def _newest_ids(hostnames: Sequence[str] | None = None, after_id: int | None = None) -> Select[Any]:
    newest = select(func.max(Verification.id))
    if hostnames is not None:
        newest = newest.where(Verification.hostname.in_(list(hostnames)))
    if after_id is not None:
        newest = newest.where(Verification.id > after_id)
    return newest.group_by(Verification.hostname)


def latest_by_node(session: Session, hostnames: Sequence[str]) -> dict[str, VerificationView]:
    """Each of these nodes' latest result (the last one the controller stored), by hostname."""
    out: dict[str, VerificationView] = {}
    for start in range(0, len(hostnames), 500):
        chunk = hostnames[start:start + 500]
        rows = session.scalars(select(Verification).where(Verification.id.in_(_newest_ids(chunk))))
        out.update((row.hostname, _view(row)) for row in rows)
    return out


def latest_stored_after(session: Session, after_id: int | None) -> list[VerificationView]:
    """Each node's latest result among those stored after row ``after_id`` (all nodes' latest for None), in
    the order they were stored. A cache of each node's latest result follows the store with this (the ids
    are the controller's, so no clock decides what is new)."""
    rows = session.scalars(select(Verification).where(Verification.id.in_(_newest_ids(after_id=after_id)))
                           .order_by(Verification.id))
    return [_view(row) for row in rows]


def history(session: Session, hostname: str, limit: int = 200) -> list[VerificationView]:
    """A node's newest ``limit`` results, oldest first (the node page's table and chart)."""
    rows = list(session.scalars(select(Verification).where(Verification.hostname == hostname)
                                .order_by(Verification.recorded_at.desc(), Verification.id.desc()).limit(limit)))
    return [_view(row) for row in reversed(rows)]


def last_recorded_at(session: Session, hostname: str) -> dt.datetime | None:
    """When the controller stored the node's newest result (what makes its page refresh)."""
    found: dt.datetime | None = session.scalar(select(func.max(Verification.recorded_at))
                                               .where(Verification.hostname == hostname))
    return found


def fleet_median(session: Session, gpu_model: str, *, simulated: bool | None = None, days: int = 30,
                 max_rows: int = 20_000) -> list[MedianPoint]:
    """Median FlashAttention TFLOP/s per day over every node with this GPU model (real and simulated results
    are never mixed when ``simulated`` is given)."""
    stmt = select(Verification.recorded_at, Verification.tflops).where(
        Verification.gpu_model == gpu_model, Verification.tflops.is_not(None),
        Verification.recorded_at >= utcnow() - dt.timedelta(days=days))
    if simulated is not None:
        stmt = stmt.where(Verification.simulated.is_(simulated))
    per_day: dict[dt.date, list[float]] = {}
    for at, tflops in session.execute(stmt.order_by(Verification.recorded_at.desc()).limit(max_rows)):
        if tflops is not None:
            per_day.setdefault(at.date(), []).append(float(tflops))
    return [MedianPoint(dt.datetime.combine(day, dt.time(12), dt.UTC), float(statistics.median(v)), len(v))
            for day, v in sorted(per_day.items())]


def fleet_counts(session: Session) -> list[GpuVerificationCounts]:
    """Per GPU model ("none" without one): each node's latest result, passed or not, and the median TFLOP/s of
    those latest results (the ``fleet_verifications*`` series of /metrics)."""
    passed: dict[str, int] = {}
    failed: dict[str, int] = {}
    speeds: dict[str, list[float]] = {}
    rows = session.execute(select(Verification.gpu_model, Verification.passed, Verification.tflops)
                           .where(Verification.id.in_(_newest_ids())))
    for gpu_model, ok, tflops in rows:
        gpu = gpu_model or "none"
        (passed if ok else failed)[gpu] = (passed if ok else failed).get(gpu, 0) + 1
        if tflops is not None:
            speeds.setdefault(gpu, []).append(float(tflops))
    return [GpuVerificationCounts(gpu, passed.get(gpu, 0), failed.get(gpu, 0),
                                  float(statistics.median(speeds[gpu])) if speeds.get(gpu) else None)
            for gpu in sorted(set(passed) | set(failed))]


def degraded_health(session: Session, hostname: str) -> NodeHealthView | None:
    """The node's verification health when it is degraded; None when it is not (or was never verified)."""
    row = session.get(NodeVerifyState, hostname)
    if row is None or not row.degraded:
        return None
    return NodeHealthView(since=_aware(row.since) if row.since is not None else None, reason=row.reason,
                          diagnosis=tuple(row.diagnosis or ()), replan=row.replan)


def degraded_among(session: Session, hostnames: Sequence[str]) -> frozenset[str]:
    """Which of ``hostnames`` are degraded by their verification health (rollout --max-unavailable counts them)."""
    if not hostnames:
        return frozenset()
    return frozenset(session.scalars(select(NodeVerifyState.hostname).where(
        NodeVerifyState.hostname.in_(hostnames), NodeVerifyState.degraded.is_(True))))


def schedule_overview(session: Session, now: dt.datetime | None = None) -> list[ScheduleView]:
    """Every re-verification schedule, oldest first, with its next run and the result of its last run."""
    now = now or utcnow()
    out = []
    for row in session.scalars(select(VerifySchedule).order_by(VerifySchedule.id)):
        last = session.scalars(select(VerifyScheduleRun).where(VerifyScheduleRun.schedule_id == row.id)
                               .order_by(VerifyScheduleRun.due_at.desc()).limit(1)).first()
        next_run = None
        if row.enabled:
            try:
                next_run = next_due(row.cron, max(now, _aware(last.due_at) if last else now))
            except ValueError:  # croniter's errors: a cron saved by an older version that cannot fire
                next_run = None
        out.append(ScheduleView(id=row.id, cron=row.cron, selector=row.selector, mode=row.mode,
                                enabled=row.enabled, created_by=row.created_by, next_run=next_run,
                                last_run=_aware(last.due_at) if last else None,
                                last_result=_run_result(session, last) if last else None))
    return out


def _run_result(session: Session, run: VerifyScheduleRun) -> ScheduleRunResult:
    jobs: dict[str, str] = dict(run.jobs or {})
    rows = session.execute(select(Verification.job_id, Verification.passed)
                           .where(Verification.job_id.in_(list(jobs.values())))) if jobs else ()
    verdicts = {job_id: passed for job_id, passed in rows}
    failed = sorted(h for h, j in jobs.items() if verdicts.get(j) is False)
    return ScheduleRunResult(nodes=len(jobs), passed=sum(1 for j in jobs.values() if verdicts.get(j) is True),
                             failed=len(failed), failed_hosts=tuple(failed[:10]),
                             pending=sum(1 for j in jobs.values() if j not in verdicts), error=run.error)
