"""Adapters onto the other parts of the controller (verification, rollouts, schedules, resolver).

The dashboard reads those parts through these few functions only; each part owns its rules (a
rollout's progress is ``controller.rollout.core.progress``). Migrations run before the controller
serves, so a missing table is a real fault and surfaces as one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleetctl.controller.diagnose import diagnose
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.registry import NodeRecord
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.rollout import service as rollout_service
from fleetctl.controller.rollout.core import State, manual_commands, progress
from fleetctl.controller.rollout.models import Rollout, RolloutNode
from fleetctl.controller.store.models import Node
from fleetctl.controller.verify_store import views as verification_views
from fleetctl.controller.verify_store.views import GpuVerificationCounts, MedianPoint, ScheduleView, VerificationView
from fleetctl.fleet.errors import ConflictError, FleetError

log = logging.getLogger(__name__)


def verification_history(session: Session, hostname: str, limit: int = 200) -> list[VerificationView]:
    """A node's verification results, oldest first (verify_store's view)."""
    return verification_views.history(session, hostname, limit)


def fleet_median(session: Session, gpu_model: str, simulated: bool | None = None) -> list[MedianPoint]:
    """Median TFLOP/s per day over the nodes with the same GPU model (verify_store's view)."""
    return verification_views.fleet_median(session, gpu_model, simulated=simulated)


def plan_for(session: Session, record: NodeRecord, state_dir: Any = None) -> dict[str, Any]:
    """The resolver's current decision for this node's facts (DESIGN §3.2 decision, default policy, the
    controller's catalog: its additions in STATE/catalog.json, the built-in list and the wheels in the
    artifact store, as a rollout sees them); facts that are missing or unreadable give a ``blocked`` decision
    that says why (the registry's reason)."""
    if record.facts is None:
        return _blocked(record.facts_error or "stored facts unreadable")
    try:
        catalog = controller_catalog(session, Path(state_dir) if state_dir else None)
        decision = resolve(record.facts, catalog, Policy())
    except FleetError as exc:
        return _blocked(exc.message + (f" ({exc.hint})" if exc.hint else ""))
    out: dict[str, Any] = decision.to_json()
    return out


def _blocked(reason: str) -> dict[str, Any]:
    return {"variant": "blocked", "flash_attn_version": None, "artifact": None, "toolkit": None, "steps": [],
            "reasons": [reason], "rejected": []}


def node_rollouts(session: Session, hostname: str) -> list[dict[str, Any]]:
    """This node's part in each rollout, newest first (``controller.rollout.service.node_rollouts``)."""
    return rollout_service.node_rollouts(session, hostname, limit=10)


def _simulated_hosts(session: Session, hosts: list[str]) -> set[str]:
    if not hosts:
        return set()
    return set(session.scalars(select(Node.hostname).where(Node.hostname.in_(hosts), Node.simulated.is_(True))))


def _summary(r: Rollout, by_state: dict[str, int], simulated: bool) -> dict[str, Any]:
    """The rollout's row: ``done`` counts its finished nodes (done, failed or skipped) out of ``total``, the
    numbers ``fleetctl rollout status`` shows as ``progress.finished``/``progress.total``."""
    p = progress(by_state)
    return {"id": r.id, "status": r.status, "version": r.version, "reason": r.reason or "",
            "created_at": r.created_at, "finished_at": r.finished_at, "created_by": r.created_by,
            "current_batch": r.current_batch, "batches_total": r.batches, "by_state": by_state,
            "total": p.total, "done": p.finished, "failed": p.failed, "simulated": simulated}


def rollouts(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Newest rollouts first, each with node counts by state."""
    rows = list(session.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)))
    ids = [r.id for r in rows]
    counts: dict[str, dict[str, int]] = {i: {} for i in ids}
    sims: dict[str, int] = {}
    if ids:
        for rid, state, n in session.execute(select(RolloutNode.rollout_id, RolloutNode.state, func.count())
                                             .where(RolloutNode.rollout_id.in_(ids))
                                             .group_by(RolloutNode.rollout_id, RolloutNode.state)):
            counts[rid][state] = n
        for rid, n in session.execute(select(RolloutNode.rollout_id, func.count())
                                      .join(Node, Node.hostname == RolloutNode.hostname)
                                      .where(RolloutNode.rollout_id.in_(ids), Node.simulated.is_(True))
                                      .group_by(RolloutNode.rollout_id)):
            sims[rid] = n
    return [_summary(r, counts[r.id], sims.get(r.id, 0) > 0) for r in rows]


def rollout_counts(session: Session) -> dict[str, int]:
    """Rollouts by status, all of them (for /metrics: a paused rollout is alerted on however old it is)."""
    return {status: n for status, n in session.execute(select(Rollout.status, func.count())
                                                         .group_by(Rollout.status))}


def _diagnosis(raw: Any) -> dict[str, Any] | None:
    """The first real cause of a rollout node's diagnosis (dict or list of controller.diagnose entries)."""
    if isinstance(raw, dict) and isinstance(raw.get("diagnoses"), list):
        raw = raw["diagnoses"]
    if isinstance(raw, list):
        real = [d for d in raw if isinstance(d, dict) and not d.get("red_herring")]
        candidates = real or [d for d in raw if isinstance(d, dict)]
        raw = candidates[0] if candidates else None
    return raw if isinstance(raw, dict) else None


def rollout_detail(session: Session, rollout_id: str) -> dict[str, Any] | None:
    """One rollout (None when there is no such rollout): summary, batches, nodes (with plan and state),
    failures with their diagnosis."""
    r = session.get(Rollout, rollout_id)
    if r is None:
        return None
    nodes = list(session.scalars(select(RolloutNode).where(RolloutNode.rollout_id == rollout_id)
                                 .order_by(RolloutNode.batch, RolloutNode.hostname)))
    sims = _simulated_hosts(session, [n.hostname for n in nodes])
    by_state: dict[str, int] = {}
    batches: dict[int, dict[str, Any]] = {}
    out_nodes, failures = [], []
    for n in nodes:
        by_state[n.state] = by_state.get(n.state, 0) + 1
        b = batches.setdefault(n.batch, {"index": n.batch, "size": 0, "by_state": {}, "canary": False})
        b["size"] += 1
        b["by_state"][n.state] = b["by_state"].get(n.state, 0) + 1
        b["canary"] = b["canary"] or bool(n.canary)
        plan = n.plan or {}
        diag = _diagnosis(n.diagnosis)
        item = {"hostname": n.hostname, "batch": n.batch, "canary": bool(n.canary), "state": n.state,
                "step": n.step, "job_id": n.job_id, "attempt": n.attempt, "variant": plan.get("variant", ""),
                "steps": list(plan.get("steps") or []), "version": plan.get("flash_attn_version")
                or plan.get("version"),
                "error": n.cause or "", "simulated": n.hostname in sims, "diagnosis": diag,
                "updated_at": n.updated_at, "commands": manual_commands(plan)}
        out_nodes.append(item)
        if n.state == State.FAILED:
            failures.append(item)
    for b in batches.values():
        b["status"] = str(progress(b["by_state"]).status)
        b["label"] = "canary" if b["canary"] else f"batch {b['index']}"
    detail = _summary(r, by_state, bool(sims))
    detail.update({"options": rollout_service.public_options(r.options or {}), "selector": r.selector,
                   "batches": [batches[k] for k in sorted(batches)],
                   "nodes": out_nodes, "failures": failures,
                   # the maintenance policy: why no new node starts (window, bake, max-unavailable), who approved
                   "waiting": rollout_service.hold_text(r), "approved_by": r.approved_by})
    return detail


def rollout_action(ctx: Any, rollout_id: str, action: str, actor: str, *, engine: Any = None) -> str:
    """pause | resume | approve | abort | rollback through controller.rollout.service (which audits it); wakes the
    rollout engine when one runs in this process. Returns a message for the page."""
    fn = getattr(rollout_service, action, None)
    if fn is None:
        raise ConflictError(f"the rollout service has no {action!r}", hint="update the controller")
    result = fn(ctx.store, rollout_id, actor)
    if engine is not None and hasattr(engine, "wake"):
        engine.wake()
    status = result.get("status") if isinstance(result, dict) else None
    if isinstance(status, dict):
        status = status.get("status")
    return f"{action} requested by {actor}" + (f"; rollout is now {status}" if isinstance(status, str) else "")


def node_rollout_failures(session: Session, hostname: str) -> list[dict[str, Any]]:
    """This node's failed states in rollouts (newest first), with their diagnosis."""
    rows = list(session.scalars(select(RolloutNode).where(RolloutNode.hostname == hostname,
                                                          RolloutNode.state == State.FAILED)
                                .order_by(RolloutNode.updated_at.desc()).limit(5)))
    return [{"rollout": n.rollout_id, "step": n.step or "", "error": n.cause or "", "job": n.job_id,
             "diagnosis": _diagnosis(n.diagnosis)} for n in rows]


def node_verify_health(session: Session, hostname: str) -> dict[str, Any] | None:
    """The node's verification health when it is degraded (verify_store's view): reason, first real
    diagnosis, and the resolver's re-plan on the current facts; None when it is not degraded."""
    health = verification_views.degraded_health(session, hostname)
    if health is None:
        return None
    return {"since": health.since, "reason": health.reason, "diagnosis": _diagnosis(list(health.diagnosis)),
            "replan": health.replan}


def diagnose_text(text: str) -> dict[str, Any] | None:
    """The first real cause controller.diagnose finds in a failed job's output."""
    found = [d.to_json() for d in diagnose(text)] if text else []
    return _diagnosis(found)


def schedules(session: Session) -> list[ScheduleView]:
    """Re-verification schedules (verify_store's view): cron, selector, next run, and the last run's results
    (passed / failed / still running, from the verifications its jobs produced)."""
    return verification_views.schedule_overview(session)


def verification_metrics(session: Session) -> list[GpuVerificationCounts]:
    """Per GPU model: nodes whose latest verification passed / failed, median TFLOP/s (for /metrics)."""
    return verification_views.fleet_counts(session)
