"""Verification results for the dashboard, from finished ``verify`` jobs (``jobs.result`` holds the
``fleet.verification`` result, or a short verdict for simple runners).

``sync(session)`` adds finished verify jobs not yet in ``verifications`` (the one table of results,
written by controller.verify_store as jobs finish; one row per job: pass/fail, median FlashAttention and
SDPA TFLOP/s, peak memory) and updates each node's latest result in ``dashboard_nodes``; the node page's
chart, the fleet medians and /metrics read that table.
"""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.store.db import utcnow
from controller.store.models import Job
from controller.web.models import DashboardNode, DashboardVerification, rank_of

SYNC_EVERY_SECONDS = 2.0
FINISHED = ("successful", "failed", "timeout")
SDPA_IMPLS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")

_lock = threading.Lock()
_last: dict[int, float] = {}


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarize(status: str, result: Any, error: str | None) -> dict[str, Any]:
    """(passed, status, simulated, tflops, sdpa_tflops, peak_mem_mib, detail) of one verify job."""
    res: Mapping[str, Any] = result if isinstance(result, Mapping) else {}
    payload = res.get("verification") if isinstance(res.get("verification"), Mapping) else (
        res if "schema_version" in res else None)
    out: dict[str, Any] = {"simulated": bool((payload or res).get("simulated", False)), "tflops": None,
                           "sdpa_tflops": None, "peak_mem_mib": None}
    if payload is not None:
        speed = [e for e in payload.get("speed") or [] if isinstance(e, Mapping)
                 and e.get("status") == "ok" and e.get("direction", "fwd") == "fwd"
                 and isinstance(e.get("tflops"), int | float)]
        fa_status = payload.get("flash_attn")  # FA3/FA4 results chart their own rows
        verified = str(fa_status.get("impl") or "flash_attn") if isinstance(fa_status, Mapping) else "flash_attn"
        fa = [float(e["tflops"]) for e in speed if e.get("impl") == verified]
        sdpa: list[float] = []
        for impl in SDPA_IMPLS:
            sdpa = [float(e["tflops"]) for e in speed if e.get("impl") == impl]
            if sdpa:
                break
        mem = [float(e["peak_mem_mib"]) for e in speed if e.get("impl") == verified
               and isinstance(e.get("peak_mem_mib"), int | float)]
        out.update(tflops=_median(fa), sdpa_tflops=_median(sdpa), peak_mem_mib=max(mem) if mem else None)
        verdict = str(payload.get("status") or "")
        passed = bool(payload.get("passed")) and verdict not in ("regression", "fail", "error")
        reasons = payload.get("reasons") or []
        detail = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else str(reasons)
    else:
        verdict = ""
        passed = bool(res.get("passed", res.get("ok", status == "successful")))
        detail = str(res.get("reason") or res.get("reasons") or "")
    if status != "successful":
        passed, verdict, detail = False, status, (error or detail or f"verify job {status}")
    out.update(passed=passed, status=(verdict or ("pass" if passed else "fail"))[:16], detail=detail[:500])
    return out


def sync(session: Session, *, force: bool = False) -> int:
    """Copy verify jobs finished since the newest one seen; returns how many were added."""
    key = id(session.get_bind())
    now = time.monotonic()
    with _lock:
        if not force and now - _last.get(key, -1e9) < SYNC_EVERY_SECONDS:
            return 0
        _last[key] = now
        # watermark: the newest verification reflected in a node row (rows verify_store adds meanwhile must
        # still reach their node), else the newest stored one
        since = session.scalar(select(func.max(DashboardNode.verify_at))) or session.scalar(
            select(func.max(DashboardVerification.at)))
        stmt = select(Job.id, Job.node, Job.status, Job.finished_at, Job.result, Job.error).where(
            Job.kind == "verify", Job.finished_at.is_not(None), Job.status.in_(FINISHED))
        if since is not None:
            stmt = stmt.where(Job.finished_at >= since)
        rows = session.execute(stmt.order_by(Job.finished_at)).all()
        if not rows:
            return 0
        # controller.verify_store records verify jobs into the same table as they finish (with the fleet
        # verdict); rows it already wrote are read back here, the others are added from the job
        stored: dict[str, DashboardVerification] = {}
        ids = [r[0] for r in rows]
        for start in range(0, len(ids), 500):
            for got in session.scalars(select(DashboardVerification)
                                       .where(DashboardVerification.job_id.in_(ids[start:start + 500]))):
                stored[str(got.job_id)] = got
        hosts = sorted({r[1] for r in rows})
        index: dict[str, DashboardNode] = {}
        for start in range(0, len(hosts), 500):
            chunk = hosts[start:start + 500]
            for row in session.scalars(select(DashboardNode).where(DashboardNode.hostname.in_(chunk))):
                index[row.hostname] = row
        changed = 0
        for job_id, host, status, finished, result, error in rows:
            node = index.get(host)
            v = stored.get(job_id)
            if v is None:
                s = summarize(status, result, error)
                v = DashboardVerification(job_id=job_id, hostname=host, at=finished,
                                          gpu_model=node.gpu_model if node else "", passed=s["passed"],
                                          status=s["status"], simulated=s["simulated"], tflops=s["tflops"],
                                          sdpa_tflops=s["sdpa_tflops"], peak_mem_mib=s["peak_mem_mib"],
                                          detail=s["detail"], trigger="job")
                try:
                    with session.begin_nested():
                        session.add(v)
                except IntegrityError:  # verify_store wrote it meanwhile
                    found = session.scalar(select(DashboardVerification).where(DashboardVerification.job_id == job_id))
                    if found is None:
                        continue
                    v = found
                changed += 1
            elif node is None or node.src_verify_key == job_id[:64]:
                continue
            if node is not None and (node.verify_at is None or finished >= node.verify_at):
                if v.job_id in stored and node.src_verify_key != job_id[:64]:
                    changed += 1
                node.verify_result = "passed" if v.passed else "failed"
                node.verify_at, node.verify_tflops, node.src_verify_key = finished, v.tflops, job_id[:64]
                node.rank = rank_of(node.status, node.verify_result, node.fa_version, node.job_status or "")
        session.flush()
        return changed


def history(session: Session, hostname: str, limit: int = 200) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(DashboardVerification).where(DashboardVerification.hostname == hostname)
                                .order_by(DashboardVerification.at.desc()).limit(limit)))
    return [{"at": r.at, "passed": r.passed, "status": r.status, "tflops": r.tflops, "sdpa_tflops": r.sdpa_tflops,
             "memory": f"{r.peak_mem_mib:.0f} MiB" if r.peak_mem_mib is not None else "", "detail": r.detail,
             "simulated": r.simulated, "job_id": r.job_id} for r in reversed(rows)]


def fleet_median(session: Session, gpu_model: str, *, simulated: bool | None = None, days: int = 30,
                 max_rows: int = 20_000) -> list[dict[str, Any]]:
    """Median FlashAttention TFLOP/s per day over every node with this GPU model (real and simulated
    results are never mixed when ``simulated`` is given)."""
    stmt = select(DashboardVerification.at, DashboardVerification.tflops).where(
        DashboardVerification.gpu_model == gpu_model, DashboardVerification.tflops.is_not(None),
        DashboardVerification.at >= utcnow() - dt.timedelta(days=days))
    if simulated is not None:
        stmt = stmt.where(DashboardVerification.simulated.is_(simulated))
    per_day: dict[dt.date, list[float]] = {}
    for at, tflops in session.execute(stmt.order_by(DashboardVerification.at.desc()).limit(max_rows)):
        if tflops is not None:
            per_day.setdefault(at.date(), []).append(float(tflops))
    return [{"at": dt.datetime.combine(day, dt.time(12), dt.UTC), "tflops": statistics.median(v),
             "nodes": len(v)} for day, v in sorted(per_day.items())]


def metrics(session: Session) -> list[dict[str, Any]]:
    """Per GPU model: nodes whose latest verification passed / failed, median TFLOP/s of those."""
    out: dict[str, dict[str, Any]] = {}
    counts = select(DashboardNode.gpu_model, DashboardNode.verify_result, func.count()).where(
        DashboardNode.verify_result != "").group_by(DashboardNode.gpu_model, DashboardNode.verify_result)
    for gpu, result, n in session.execute(counts):
        out.setdefault(gpu or "none", {"gpu": gpu or "none", "passed": 0, "failed": 0})[result] = n
    values: dict[str, list[float]] = {}
    for gpu, tflops in session.execute(select(DashboardNode.gpu_model, DashboardNode.verify_tflops)
                                       .where(DashboardNode.verify_tflops.is_not(None))):
        if tflops is not None:
            values.setdefault(gpu or "none", []).append(float(tflops))
    for gpu, row in out.items():
        row["tflops_median"] = _median(values.get(gpu, []))
    return sorted(out.values(), key=lambda r: r["gpu"])
