"""The node table's index: ``dashboard_nodes`` kept in step with ``nodes`` and verifications.

``sync(session)`` finds, in one indexed SQL query, the nodes whose row is missing or stale
(status or facts changed) and rewrites only those; verification columns are a verbatim copy of
each node's latest result from ``controller.verify_store.views``, refreshed for the results the
controller stored since the newest one copied (by row id, never by a clock). ``query_nodes``
then filters, sorts and pages on plain indexed columns.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.node_summary import NodeSummary, summarize
from fleetctl.controller.registry import record_of
from fleetctl.controller.store.models import Job, Node
from fleetctl.controller.verify_store import views as verification_views
from fleetctl.controller.web.models import DashboardNode, rank_of
from fleetctl.fleet.jobs import RAN_TO_END

SORTABLE: dict[str, Any] = {
    "hostname": DashboardNode.hostname,
    "status": DashboardNode.status,
    "gpu": DashboardNode.gpu_model,
    "driver": DashboardNode.driver,
    "cuda_max": DashboardNode.cuda_max,
    "nvcc": DashboardNode.nvcc,
    "torch": DashboardNode.torch,
    "python": DashboardNode.python,
    "fa": DashboardNode.fa_version,
    "verify": DashboardNode.verify_result,
    "verified_at": DashboardNode.verify_at,
    "rank": DashboardNode.rank,
}
MAX_PER_PAGE = 200
SYNC_EVERY_SECONDS = 2.0
# verifications stored up to this many rows before the newest one copied are looked at again: on PostgreSQL a
# row with a lower id can commit after one with a higher id
VERIFY_RESCAN_ROWS = 100

_lock = threading.Lock()
FULL_CHECK_SECONDS = 5.0
_fingerprints: dict[int, tuple[tuple[Any, ...], float]] = {}


def _s(value: Any) -> str:
    return "" if value is None else str(value)


def row_values(node_id: int, summary: NodeSummary) -> dict[str, Any]:
    """The summary-derived columns of one node (the node summary flattened to indexed strings)."""
    return {
        "node_id": node_id, "hostname": summary.hostname, "status": summary.status, "simulated": summary.simulated,
        "gpu_model": _s(summary.gpu_model)[:128], "gpu_count": summary.gpu_count,
        "compute_capability": _s(summary.compute_capability)[:8],
        "driver": _s(summary.driver)[:32], "cuda_max": _s(summary.cuda_max)[:16],
        "nvcc": _s(summary.nvcc)[:16], "torch": _s(summary.torch)[:64],
        "torch_cuda": _s(summary.torch_cuda)[:16], "cxx11abi": summary.cxx11abi,
        "python": _s(summary.python)[:32], "fa_version": _s(summary.flash_attn)[:32],
        "fa_variant": _s(summary.flash_attn_variant)[:32], "src_facts_at": summary.facts_updated_at,
    }


def sync(session: Session) -> int:
    """Bring ``dashboard_nodes`` up to date; returns how many rows were rewritten."""
    with _lock:
        # cheap fingerprint first: when no node was added, removed, re-reported or changed status since the
        # last full check (and that was less than FULL_CHECK_SECONDS ago), nothing can be stale
        key = id(session.get_bind())
        fp = tuple(session.execute(select(func.count(), func.max(Node.id), func.max(Node.facts_updated_at),
                                          func.max(Node.status_changed_at))).one())
        prev = _fingerprints.get(key)
        now = time.monotonic()
        if prev is not None and prev[0] == fp and now - prev[1] < FULL_CHECK_SECONDS:
            return _sync_verifications(session) + _sync_jobs(session)
        stale = select(Node.id).outerjoin(DashboardNode, DashboardNode.node_id == Node.id).where(or_(
            DashboardNode.node_id.is_(None),
            DashboardNode.status != Node.status,
            DashboardNode.simulated != Node.simulated,
            DashboardNode.src_facts_at.is_distinct_from(Node.facts_updated_at),
        ))
        ids = list(session.scalars(stale))
        changed = 0
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            nodes = session.scalars(select(Node).where(Node.id.in_(chunk))).all()
            existing = {d.node_id: d for d in session.scalars(
                select(DashboardNode).where(DashboardNode.node_id.in_(chunk)))}
            for node in nodes:
                values = row_values(node.id, summarize(record_of(node)))
                row = existing.get(node.id)
                if row is None:
                    row = DashboardNode(verify_result="", job_kind="", job_status="", **values)
                    session.add(row)
                else:
                    for column, value in values.items():
                        setattr(row, column, value)
                row.rank = rank_of(row.status, row.verify_result or "", row.fa_version, row.job_status or "")
                changed += 1
            session.flush()
        _fingerprints[key] = (fp, now)
        changed += _sync_verifications(session, force=bool(ids))
        changed += _sync_jobs(session, force=bool(ids))
        return changed


def _due(last_checked: dict[int, float], session: Session, force: bool) -> bool:
    """Whether a copy into the index is due for this database (at most every SYNC_EVERY_SECONDS; ``force``:
    now); marks it checked when it is."""
    key = id(session.get_bind())
    now = time.monotonic()
    if not force and now - last_checked.get(key, -1e9) < SYNC_EVERY_SECONDS:
        return False
    last_checked[key] = now
    return True


_verifications_checked: dict[int, float] = {}


def _sync_verifications(session: Session, *, force: bool = False) -> int:
    """Copy each node's latest verification (verify_store's view: its verdict, the controller's time) into
    the node rows, for the results stored since the newest one copied; returns how many rows changed."""
    if not _due(_verifications_checked, session, force):
        return 0
    newest_copied = session.scalar(select(func.max(DashboardNode.verify_id)))
    latest = {v.hostname: v for v in verification_views.latest_stored_after(
        session, None if newest_copied is None else newest_copied - VERIFY_RESCAN_ROWS)}
    changed = 0
    hosts = list(latest)
    for start in range(0, len(hosts), 500):
        for row in session.scalars(select(DashboardNode).where(DashboardNode.hostname.in_(hosts[start:start + 500]))):
            v = latest[row.hostname]
            if row.verify_id is not None and row.verify_id >= v.id:
                continue
            row.verify_id, row.verify_result, row.verify_at, row.verify_tflops = v.id, v.result, v.at, v.tflops
            row.rank = rank_of(row.status, row.verify_result, row.fa_version, row.job_status or "")
            changed += 1
    session.flush()
    return changed


_jobs_checked: dict[int, float] = {}


def _sync_jobs(session: Session, *, force: bool = False) -> int:
    """Each node's latest finished non-verify job (a failed install or build puts the node first)."""
    if not _due(_jobs_checked, session, force):
        return 0
    since = session.scalar(select(func.max(DashboardNode.job_at)))
    stmt = select(Job.node, Job.kind, Job.status, Job.finished_at).where(
        Job.finished_at.is_not(None), Job.kind != "verify", Job.status.in_(sorted(RAN_TO_END)))
    if since is not None:
        stmt = stmt.where(Job.finished_at >= since)
    latest: dict[str, tuple[str, str, dt.datetime]] = {}
    for host, kind, status, finished in session.execute(stmt.order_by(Job.finished_at)):
        if finished is not None:
            latest[host] = (kind, status, finished)
    if not latest:
        return 0
    changed = 0
    hosts = list(latest)
    for start in range(0, len(hosts), 500):
        for row in session.scalars(select(DashboardNode).where(DashboardNode.hostname.in_(hosts[start:start + 500]))):
            kind, status, finished = latest[row.hostname]
            if row.job_at is not None and finished < row.job_at:
                continue
            if (row.job_kind, row.job_status, row.job_at) == (kind, status, finished):
                continue
            row.job_kind, row.job_status, row.job_at = kind[:64], status[:16], finished
            row.rank = rank_of(row.status, row.verify_result or "", row.fa_version, row.job_status)
            changed += 1
    session.flush()
    return changed


@dataclass
class NodeQuery:
    q: str = ""
    status: str = ""
    gpu: str = ""
    fa: str = ""
    verify: str = ""
    simulated: str = ""  # "", "yes", "no"
    sort: str = "rank"
    dir: str = "asc"
    page: int = 1
    per_page: int = 50

    def normalised(self) -> NodeQuery:
        sort = self.sort if self.sort in SORTABLE else "rank"
        direction = "desc" if self.dir == "desc" else "asc"
        per_page = min(max(self.per_page, 1), MAX_PER_PAGE)
        return NodeQuery(q=self.q.strip()[:100], status=self.status, gpu=self.gpu, fa=self.fa, verify=self.verify,
                         simulated=self.simulated, sort=sort, dir=direction, page=max(self.page, 1),
                         per_page=per_page)

    def params(self, **override: Any) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("q", "status", "gpu", "fa", "verify", "simulated", "sort", "dir",
                                             "page", "per_page")}
        out.update(override)
        return {k: v for k, v in out.items() if v not in ("", None)}


@dataclass
class NodePage:
    query: NodeQuery
    total: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.per_page))


def _filters(q: NodeQuery) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if q.status == "failing":
        out.append(DashboardNode.rank == 0)
    elif q.status:
        out.append(DashboardNode.status == q.status)
    if q.gpu:
        out.append(DashboardNode.gpu_model == q.gpu)
    if q.fa == "none":
        out.append(DashboardNode.fa_version == "")
    elif q.fa:
        variant, _, version = q.fa.partition(":")
        out.append(DashboardNode.fa_variant == variant) if variant else None
        if version:
            out.append(DashboardNode.fa_version == version)
    if q.verify == "never":
        out.append(DashboardNode.verify_result == "")
    elif q.verify:
        out.append(DashboardNode.verify_result == q.verify)
    if q.simulated in ("yes", "no"):
        out.append(DashboardNode.simulated.is_(q.simulated == "yes"))
    if q.q:
        like = "%" + q.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        out.append(or_(DashboardNode.hostname.like(like, escape="\\"), DashboardNode.gpu_model.like(like, escape="\\"),
                       DashboardNode.torch.like(like, escape="\\"), DashboardNode.driver.like(like, escape="\\")))
    return out


def query_nodes(session: Session, query: NodeQuery, *, do_sync: bool = True) -> NodePage:
    """One page of the node table (sync first, unless told not to)."""
    if do_sync:
        sync(session)
    q = query.normalised()
    where = _filters(q)
    total = int(session.scalar(select(func.count()).select_from(DashboardNode).where(*where)) or 0)
    col = SORTABLE[q.sort]
    # ties by hostname in the same direction, so one (column, hostname) index serves both directions
    host = DashboardNode.hostname
    order = [col.desc(), host.desc()] if q.dir == "desc" else [col.asc(), host.asc()]
    if q.sort == "hostname":
        order = order[:1]
    page = min(q.page, max(1, -(-total // q.per_page)))
    q.page = page
    rows = list(session.scalars(select(DashboardNode).where(*where).order_by(*order)
                                .limit(q.per_page).offset((page - 1) * q.per_page)))
    seen = dict(session.execute(select(Node.id, Node.last_seen).where(
        Node.id.in_([r.node_id for r in rows]))).all()) if rows else {}
    return NodePage(query=q, total=total, rows=[as_dict(r, seen.get(r.node_id)) for r in rows])


def as_dict(r: DashboardNode, last_seen: dt.datetime | None) -> dict[str, Any]:
    return {
        "hostname": r.hostname, "status": r.status, "rank": r.rank, "simulated": r.simulated,
        "gpu": r.gpu_model, "gpu_count": r.gpu_count, "compute_capability": r.compute_capability,
        "driver": r.driver, "cuda_max": r.cuda_max, "nvcc": r.nvcc, "torch": r.torch, "torch_cuda": r.torch_cuda,
        "cxx11abi": r.cxx11abi, "python": r.python, "fa_version": r.fa_version, "fa_variant": r.fa_variant,
        "verify_result": r.verify_result, "verify_at": r.verify_at.isoformat() if r.verify_at else None,
        "verify_tflops": r.verify_tflops, "last_seen": last_seen.isoformat() if last_seen else None,
        "job_kind": r.job_kind, "job_status": r.job_status, "job_at": r.job_at.isoformat() if r.job_at else None,
    }


def overview(session: Session, *, do_sync: bool = True, failing_limit: int = 20) -> dict[str, Any]:
    """Counts by status, GPU model, FA variant+version and verification; failing nodes first."""
    if do_sync:
        sync(session)

    def counts(*cols: Any) -> list[tuple[Any, ...]]:
        stmt = select(*cols, func.count()).group_by(*cols).order_by(func.count().desc())
        return [tuple(r) for r in session.execute(stmt).all()]

    by_status = {s: n for s, n in counts(DashboardNode.status)}
    total = sum(by_status.values())
    failing = list(session.scalars(select(DashboardNode).where(DashboardNode.rank == 0)
                                   .order_by(DashboardNode.status, DashboardNode.hostname).limit(failing_limit)))
    n_failing = int(session.scalar(select(func.count()).select_from(DashboardNode)
                                   .where(DashboardNode.rank == 0)) or 0)
    return {
        "total": total,
        "by_status": {s.value: 0 for s in NodeStatus} | by_status,  # every status shown, zero or not
        "by_gpu": [{"gpu": g or "(no GPU)", "count": n} for g, n in counts(DashboardNode.gpu_model)],
        "by_fa": [{"variant": v or "", "version": ver or "", "count": n}
                  for v, ver, n in counts(DashboardNode.fa_variant, DashboardNode.fa_version)],
        "by_verify": {v or "never": n for v, n in counts(DashboardNode.verify_result)},
        "simulated": int(session.scalar(select(func.count()).select_from(DashboardNode)
                                        .where(DashboardNode.simulated.is_(True))) or 0),
        "failing_count": n_failing,
        "failing": [as_dict(r, None) for r in failing],
    }


def fingerprint(session: Session) -> dict[str, Any]:
    """Changes whenever a row of the node table would: counts by status and verification, newest facts
    and newest verification."""
    sync(session)
    by_status = dict(session.execute(select(DashboardNode.status, func.count()).group_by(DashboardNode.status)).all())
    return {"by_status": by_status,
            "facts_at": session.scalar(select(func.max(DashboardNode.src_facts_at))),
            "status_at": session.scalar(select(func.max(Node.status_changed_at))),
            "verify_at": session.scalar(select(func.max(DashboardNode.verify_at))),
            "failing": session.scalar(select(func.count()).select_from(DashboardNode).where(DashboardNode.rank == 0))}


def hostnames(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r["hostname"] for r in rows]
