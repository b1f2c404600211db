"""HTTP routes of verification and schedules.

The routes use the ``VerificationService`` the controller's parts hold (``ctx.verification``); the composition
root (controller/app.py) attaches it and runs its scheduler.

Routes (bearer token; reads: any role, writes: operator or admin — controller/http_deps.py): POST /api/v1/verify
· GET /api/v1/verifications[?node=&limit=&latest=]
· GET /api/v1/verifications/{id or job id} · GET /api/v1/verify/baselines · GET /api/v1/verify/nodes/{host}
· GET/POST /api/v1/schedules · DELETE /api/v1/schedules/{id} · GET /api/v1/schedules/{id}/runs
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fleetctl.controller.audit import audit
from fleetctl.controller.http_deps import API_PREFIX, Ctx, Operator, Viewer
from fleetctl.controller.rollout.core import selection_text
from fleetctl.controller.verify_store import schedules, store
from fleetctl.fleet.workload import BusyPolicy


class VerifyBody(BaseModel):
    hosts: list[str] = Field(default_factory=list)
    selector: str | None = None
    labels: str | None = None  # a label selector (-l), AND-ed with selector
    mode: str = "full"
    model_path: str | None = None
    gpus: str | None = None  # any | all | idle | 0,1 (fleet/workload.py; default any: one idle GPU)
    when_busy: str | None = None  # wait | skip | fail (default wait)
    busy_timeout: float | None = None  # seconds to wait for idle GPUs (default 1800)


class ScheduleBody(BaseModel):
    cron: str
    selector: str = "all"
    labels: str | None = None  # a label selector (-l), stored with selector (rollout.core.selection_text)
    mode: str = "full"
    actor: str = "admin"  # a claim only: the audit actor is who authenticated (on_behalf_of when it differs)


def router() -> APIRouter:
    r = APIRouter(prefix=API_PREFIX)

    @r.post("/verify")
    async def verify(body: VerifyBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        selector = selection_text(body.selector, body.labels)
        done = await ctx.verification.submit(body.hosts, selector, mode=body.mode, trigger="manual",
                                              model_path=body.model_path,
                                              busy=BusyPolicy.of(body.when_busy, body.busy_timeout, body.gpus))
        await ctx.store.call(audit, ctx.store, actor.name, "verify.submit", selector or ",".join(body.hosts),
                             mode=body.mode, jobs=len(done.jobs))
        return {"jobs": done.jobs, "mode": body.mode, "skipped": done.skipped}

    @r.get("/verifications")
    def verifications(ctx: Ctx, _: Viewer, node: str | None = None, limit: int = 100,
                      latest: bool = False) -> dict[str, Any]:
        with ctx.store.session() as s:
            return {"verifications": store.list_results(s, hostname=node, limit=min(max(limit, 1), 1000),
                                                        latest=latest)}

    @r.get("/verifications/{ref}")
    def verification(ref: str, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        with ctx.store.session() as s:
            return store.get_result(s, ref)

    @r.get("/verify/baselines")
    def baselines(ctx: Ctx, _: Viewer) -> dict[str, Any]:
        with ctx.store.session() as s:
            return {"baselines": store.baselines_json(s), "policy": {
                "threshold": ctx.verification.policy.threshold, "min_samples": ctx.verification.policy.min_samples}}

    @r.get("/verify/nodes/{hostname}")
    def node_health(hostname: str, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        with ctx.store.session() as s:
            return store.health_json(s, hostname)

    @r.get("/schedules")
    def list_schedules(ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return {"schedules": schedules.list_schedules(ctx.store)}

    @r.post("/schedules")
    def add_schedule(body: ScheduleBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        selector = selection_text(body.selector, body.labels) or "all"
        out = schedules.add_schedule(ctx.store, body.cron, selector, mode=body.mode, actor=actor.name)
        claimed: dict[str, Any] = {"on_behalf_of": body.actor} if body.actor not in ("admin", actor.name) else {}
        audit(ctx.store, actor.name, "schedule.add", f"schedule:{out.get('id')}", cron=body.cron,
              selector=selector, mode=body.mode, **claimed)
        return out

    @r.delete("/schedules/{schedule_id}")
    def remove_schedule(schedule_id: int, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        out = schedules.remove_schedule(ctx.store, schedule_id)
        audit(ctx.store, actor.name, "schedule.remove", f"schedule:{schedule_id}")
        return out

    @r.get("/schedules/{schedule_id}/runs")
    def runs(schedule_id: int, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return {"runs": schedules.schedule_runs(ctx.store, schedule_id)}

    return r
