"""Storing verification results, fleet baselines from them, and a node's verification health.

``record(session, hostname, result, ...)`` judges a result (``controller.verification.judge``:
``evaluate`` plus the comparison with the fleet baseline of its GPU model, computed from each
other node's latest stored passing result) and stores it with the facts snapshot it ran on.
``apply_health`` turns a failure into the node's ``degraded`` state with the diagnosis of the
failure text (``controller.diagnose``) and the re-plan on its current facts
(``controller.resolver``); a later pass clears it. Pure store code: no event loop, no jobs.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.diagnose import diagnose
from fleetctl.controller.registry import read_facts
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.store import utcnow
from fleetctl.controller.store.models import Node
from fleetctl.controller.verification import (
    DEFAULT_POLICY,
    FleetBaselines,
    RegressionPolicy,
    check_regression,
    compute_baselines,
    gpu_model_key,
)
from fleetctl.controller.verify_store.models import NodeVerifyState, Verification
from fleetctl.fleet.errors import FactsError, FleetError, NotFoundError
from fleetctl.fleet.facts import NodeFacts, parse_node
from fleetctl.fleet.jobs import JobStatus
from fleetctl.fleet.verification import (
    DEGRADING_STATUSES,
    STATUS_PASS,
    STATUS_REGRESSION,
    FlashAttnStatus,
    VerificationResult,
    VerificationSchemaError,
    evaluate,
    judge,
    judge_job,
    parse_result,
)

log = logging.getLogger(__name__)

SDPA_BASELINE_IMPLS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
BASELINE_WINDOW = 5000  # newest results considered for a model's baseline


def result_from_job(result: Any) -> VerificationResult | None:
    """The ``fleet.verification`` result in a verify job's result (``{"verification": {...}}`` or the
    result itself); None when the job carries none; ``VerificationSchemaError`` when it is malformed."""
    if not isinstance(result, Mapping):
        return None
    payload = result.get("verification") if isinstance(result.get("verification"), Mapping) else (
        result if "schema_version" in result else None)
    return None if payload is None else parse_result(payload)


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


@dataclass(frozen=True)
class Summary:
    tflops: float | None
    sdpa_tflops: float | None
    peak_mem_mib: float | None


def summarize(result: VerificationResult) -> Summary:
    """What the dashboard charts: median fwd TFLOP/s of the verified FlashAttention (flash_attn, fa3 or fa4),
    the SDPA baseline, its peak memory."""
    fwd = [e for e in result.ok_speed() if e.direction == "fwd"]
    verified = result.flash_attn.impl
    fa = [e.tflops for e in fwd if e.impl == verified and e.tflops is not None]
    sdpa: list[float] = []
    for impl in SDPA_BASELINE_IMPLS:
        sdpa = [e.tflops for e in fwd if e.impl == impl and e.tflops is not None]
        if sdpa:
            break
    mem = [e.peak_mem_mib for e in fwd if e.impl == verified and e.peak_mem_mib is not None]
    return Summary(_median(fa), _median(sdpa), max(mem) if mem else None)


def gpu_name(facts: NodeFacts | None, result: VerificationResult | None) -> str:
    """The GPU model a result is filed under: the node's first GPU, else the device the result names."""
    if facts is not None and facts.gpus and facts.gpus[0].name:
        return facts.gpus[0].name[:128]
    if result is not None and result.device.name:
        return result.device.name.replace(" (simulated)", "")[:128]
    return ""


def latest_results(session: Session, *, gpu_model: str | None = None, simulated: bool | None = None,
                   exclude_host: str | None = None) -> list[VerificationResult]:
    """Each node's latest stored result that carries a full verification result."""
    newest = select(func.max(Verification.id)).where(Verification.result.is_not(None))
    if gpu_model is not None:
        newest = newest.where(Verification.gpu_model == gpu_model)
    if simulated is not None:
        newest = newest.where(Verification.simulated.is_(simulated))
    if exclude_host is not None:
        newest = newest.where(Verification.hostname != exclude_host)
    ids = list(session.scalars(newest.group_by(Verification.hostname)))
    out = []
    for start in range(0, len(ids), 500):
        for row in session.scalars(select(Verification).where(Verification.id.in_(ids[start:start + 500]))):
            try:
                parsed = parse_result(row.result)
            except VerificationSchemaError:
                continue
            # the stored verdict is the controller's; a baseline is made of results that passed on their own
            out.append(parsed if parsed.hostname else _with_host(parsed, row.hostname))
    return out[-BASELINE_WINDOW:]


def _with_host(result: VerificationResult, hostname: str) -> VerificationResult:
    from dataclasses import replace

    return replace(result, hostname=hostname)


def fleet_baselines(session: Session, *, gpu_model: str | None = None, simulated: bool | None = None,
                    exclude_host: str | None = None) -> FleetBaselines:
    return compute_baselines(latest_results(session, gpu_model=gpu_model, simulated=simulated,
                                            exclude_host=exclude_host))


def record(session: Session, hostname: str, result: VerificationResult | None, *, job_id: str | None = None,
           job_status: JobStatus = JobStatus.SUCCESSFUL, job_error: str | None = None, job_result: Any = None,
           facts: NodeFacts | None = None, trigger: str = "", schedule_id: int | None = None,
           policy: RegressionPolicy = DEFAULT_POLICY, recorded_at: dt.datetime | None = None) -> Verification:
    """Judge and store one result (or a verify job that produced none: its verdict is ``judge_job``'s on the
    raw ``job_result``). ``policy`` is ControllerSettings.regression (the service passes it).
    ``recorded_at`` is the controller's clock (now unless given: imports keep theirs); the
    result's own ``finished_at`` is stored as ``measured_at``. ``facts`` default to the node's stored facts;
    the snapshot stored with the result is ``facts.to_json()`` (empty when the node's facts are unreadable:
    a snapshot that does not parse could not be re-planned on). Idempotent per ``job_id``."""
    if facts is None:  # the column alone: the whole row would load the node's identity and labels too
        stored = session.execute(select(Node.facts).where(Node.hostname == hostname)).first()
        facts = read_facts(stored.facts)[0] if stored is not None else None
    model = gpu_name(facts, result)
    fa = facts.flash_attn if facts is not None else None
    values: dict[str, Any] = {"hostname": hostname, "gpu_model": model, "trigger": trigger[:16],
                              "schedule_id": schedule_id, "facts": facts.to_json() if facts is not None else {},
                              "fa_version": fa.version if fa else None, "fa_variant": fa.variant if fa else None,
                              "recorded_at": recorded_at or utcnow(), "gpus": gpus_measured(job_result)}
    if result is None:
        verdict = judge_job(job_status, job_result, job_error)
        detail = "; ".join(r for r in verdict.reasons if r)
        values.update(measured_at=None, passed=verdict.passed, status=verdict.status[:16],
                      bench_status=verdict.status[:16], simulated=False, reasons=list(verdict.reasons),
                      warnings=[], detail=detail[:500], result=None, regression=None, mode="", expect="",
                      tflops=None, sdpa_tflops=None, peak_mem_mib=None, started_at=None, duration_s=None)
    else:
        own = evaluate(result)
        key = gpu_model_key(result)
        regression: dict[str, Any] | None = None
        slower: str | None = None
        if own.status == STATUS_PASS:
            baselines = compute_baselines(latest_results(session, gpu_model=model, simulated=result.simulated,
                                                         exclude_host=hostname))
            check = check_regression(result, baselines, policy)
            regression = {"judged": check.judged, "regressed": check.regressed, "score": check.score,
                          "threshold": check.threshold, "reason": check.reason,
                          "worst": [c.describe() for c in check.worst], "model": key[0]}
            slower = check.reason if check.regressed else None
        verdict = judge(result, fleet_regression=slower)
        s = summarize(result)
        if not fa and result.flash_attn.version:
            values.update(fa_version=result.flash_attn.version)
        values.update(measured_at=result.finished_at, passed=verdict.passed, status=verdict.status,
                      bench_status=own.status, simulated=result.simulated, reasons=list(verdict.reasons),
                      warnings=list(verdict.warnings), detail="; ".join(verdict.reasons)[:500],
                      result=result.with_verdict(verdict).to_json(), regression=regression, mode=result.mode,
                      expect=result.expect, tflops=s.tflops, sdpa_tflops=s.sdpa_tflops,
                      peak_mem_mib=s.peak_mem_mib, started_at=result.started_at, duration_s=result.duration_s)
    existing = session.scalar(select(Verification).where(Verification.job_id == job_id)) if job_id else None
    if existing is not None:
        for k, v in values.items():
            setattr(existing, k, v)
        session.flush()
        return existing
    row = Verification(job_id=job_id, **values)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another controller recorded this job meanwhile: complete its row
        found = session.scalar(select(Verification).where(Verification.job_id == job_id))
        if found is None:
            raise
        for k, v in values.items():
            setattr(found, k, v)
        row = found
    session.flush()
    return row


# ---- reading ------------------------------------------------------------------------------------------------


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def verified_of(payload: Any) -> dict[str, Any] | None:
    """What a stored result verified: {implementation, module, dist, version, import_ok}; None for a job that
    left no result or a node expecting SDPA.  Results from before FA3/FA4 support are FA2/FA1."""
    if not isinstance(payload, Mapping) or payload.get("expect") == "sdpa":
        return None
    fa = payload.get("flash_attn")
    if not isinstance(fa, Mapping):
        return None
    status = FlashAttnStatus(import_ok=bool(fa.get("import_ok")), api=fa.get("api"),
                             impl=str(fa.get("impl") or "flash_attn"), implementation=fa.get("implementation"))
    module = fa.get("module") or ("flash_attn" if status.impl == "flash_attn" else None)
    return {"implementation": status.label, "module": module, "dist": fa.get("dist"), "version": fa.get("version"),
            "import_ok": status.import_ok}


def gpus_measured(job_result: Any) -> list[int] | None:
    """The GPU indices a verify job measured (``result["gpus"]``, agent/busy_guard.py), or None."""
    gpus = job_result.get("gpus") if isinstance(job_result, Mapping) else None
    if not isinstance(gpus, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in gpus):
        return None
    return gpus[:64]


def to_json(row: Verification, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id, "job_id": row.job_id, "hostname": row.hostname, "gpu_model": row.gpu_model,
        "at": _iso(row.recorded_at), "recorded_at": _iso(row.recorded_at), "measured_at": _iso(row.measured_at),
        "clock_skew_s": None if row.measured_at is None else round(
            (_aware(row.measured_at) - _aware(row.recorded_at)).total_seconds(), 3),
        "status": row.status, "passed": row.passed, "bench_status": row.bench_status,
        "simulated": row.simulated, "mode": row.mode, "expect": row.expect, "trigger": row.trigger,
        "schedule_id": row.schedule_id, "flash_attn": {"version": row.fa_version, "variant": row.fa_variant},
        "verified": verified_of(row.result),
        "tflops": row.tflops, "sdpa_tflops": row.sdpa_tflops, "peak_mem_mib": row.peak_mem_mib,
        "duration_s": row.duration_s, "reasons": list(row.reasons or []), "warnings": list(row.warnings or []),
        "regression": row.regression, "gpus": row.gpus,
    }
    if full:
        out["facts"] = row.facts
        out["result"] = row.result
    return out


def list_results(session: Session, *, hostname: str | None = None, limit: int = 100,
                 latest: bool = False) -> list[dict[str, Any]]:
    """Newest first; ``latest``: one (the newest) per node."""
    stmt = select(Verification)
    if hostname:
        stmt = stmt.where(Verification.hostname == hostname)
    if latest:
        stmt = stmt.where(Verification.id.in_(select(func.max(Verification.id)).group_by(Verification.hostname)))
    rows = session.scalars(stmt.order_by(Verification.recorded_at.desc(), Verification.id.desc()).limit(limit))
    return [to_json(r) for r in rows]


def get_result(session: Session, ref: str) -> dict[str, Any]:
    row = session.get(Verification, int(ref)) if ref.isdigit() and int(ref) < 2**63 else session.scalar(
        select(Verification).where(Verification.job_id == ref))
    if row is None:
        raise NotFoundError(f"no verification {ref!r}", hint="see `fleetctl verify --json` or /api/v1/verifications")
    return to_json(row, full=True)


def baselines_json(session: Session) -> list[dict[str, Any]]:
    """Per GPU model (real and simulated apart): the median flash_attn TFLOP/s of every shape."""
    out = []
    for (model, simulated), shapes in sorted(compute_baselines(latest_results(session)).by_model.items()):
        out.append({"gpu_model": model, "simulated": simulated,
                    "shapes": [{"impl": k[0], "dtype": k[1], "headdim": k[2], "seqlen": k[3], "causal": k[4],
                                "median_tflops": round(b.median_tflops, 2), "nodes": b.samples}
                               for k, b in sorted(shapes.items())]})
    return out


# ---- health: degraded ---------------------------------------------------------------------------------------


def failure_text(row: Verification) -> str:
    parts = list(row.reasons or [])
    res = row.result or {}
    raw = res.get("flash_attn")
    fa: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    for key in ("error_type", "error"):
        if fa.get(key):
            parts.append(str(fa[key]))
    if res.get("worker_stderr_tail"):
        parts.append(str(res["worker_stderr_tail"]))
    return "\n".join(parts)


def diagnose_failure(row: Verification) -> list[dict[str, Any]]:
    return [d.to_json() for d in diagnose(failure_text(row))]


def replan(facts: NodeFacts, catalog: Any = None) -> dict[str, Any]:
    """The resolver's decision on these facts (what a rollout would do now to fix the node)."""
    try:
        decision = resolve(facts, catalog or builtin_catalog(), Policy())
    except FleetError as exc:
        return _blocked(exc.message)
    out: dict[str, Any] = decision.to_json()
    return out


def _blocked(reason: str) -> dict[str, Any]:
    return {"variant": "blocked", "steps": [], "reasons": [reason], "rejected": []}


def replan_snapshot(stored: Any, catalog: Any = None) -> dict[str, Any] | None:
    """``replan`` on the facts snapshot a verification stored (JSON, parsed here once); None when there is none.
    An unreadable snapshot is blocked with the parser's reason, as the resolver blocks facts it cannot plan."""
    if not stored:
        return None
    try:
        facts = parse_node(stored)
    except FactsError as exc:
        return _blocked(exc.message)
    return replan(facts, catalog)


def is_failure(row: Verification) -> bool:
    return row.status in DEGRADING_STATUSES


class HealthChange(StrEnum):
    """What a new result did to its node's verification health (``apply_health``)."""

    DEGRADED = "degraded"  # a failure: diagnosis and re-plan stored
    CLEARED = "cleared"  # a pass after degraded
    UNCHANGED = "unchanged"


def apply_health(session: Session, row: Verification, *,
                 catalog: Any = None) -> tuple[HealthChange, NodeVerifyState]:
    """Update the node's verification health from a new result (see ``HealthChange``)."""
    now = utcnow()
    state = session.get(NodeVerifyState, row.hostname)
    if state is None:
        state = NodeVerifyState(hostname=row.hostname, degraded=False, reason="", diagnosis=[], updated_at=now)
        session.add(state)
    change = HealthChange.UNCHANGED
    if is_failure(row):
        diagnosis = diagnose_failure(row)
        plan = replan_snapshot(row.facts, catalog)
        reason = f"verification {row.status}: " + ("; ".join(row.reasons or []) or "no detail")
        if diagnosis:
            first = next((d for d in diagnosis if not d.get("red_herring")), diagnosis[0])
            reason += f" — diagnosis: {first['cause']}"
        if plan and plan.get("variant"):
            reason += f" — re-plan: {plan['variant']} {plan.get('flash_attn_version') or ''}".rstrip()
        if not state.degraded:
            state.since = now
        change = HealthChange.DEGRADED
        state.degraded, state.reason, state.diagnosis, state.replan = True, reason[:4000], diagnosis, plan
        state.verification_id = row.id
    elif row.status in (STATUS_PASS, STATUS_REGRESSION) and state.degraded:
        change = HealthChange.CLEARED
        state.degraded, state.since, state.reason, state.diagnosis, state.replan = False, None, "", [], None
        state.verification_id = row.id
    elif row.status in (STATUS_PASS, STATUS_REGRESSION):
        state.verification_id = row.id
    state.updated_at = now
    session.flush()
    return change, state


def health_json(session: Session, hostname: str) -> dict[str, Any]:
    """What ``fleetctl node HOST`` shows: degraded (with diagnosis and re-plan) and the latest results."""
    state = session.get(NodeVerifyState, hostname)
    latest = list_results(session, hostname=hostname, limit=5)
    return {"hostname": hostname, "degraded": bool(state and state.degraded),
            "since": _iso(state.since) if state else None, "reason": state.reason if state else "",
            "diagnosis": list(state.diagnosis or []) if state else [], "replan": state.replan if state else None,
            "latest": latest}
