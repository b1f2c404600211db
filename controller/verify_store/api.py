"""HTTP routes of verification and schedules, and the service's life inside the controller.

``router()`` carries a lifespan that attaches the ``VerificationService`` (recording verify jobs,
drift) and starts the scheduler task on the controller's event loop; ``create_app`` includes it.

Routes (bearer token; reads: any role, writes: operator or admin — controller/api.py): POST /api/v1/verify
· GET /api/v1/verifications[?node=&limit=&latest=]
· GET /api/v1/verifications/{id or job id} · GET /api/v1/verify/baselines · GET /api/v1/verify/nodes/{host}
· GET/POST /api/v1/schedules · DELETE /api/v1/schedules/{id} · GET /api/v1/schedules/{id}/runs
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, Field

from controller.api import API_PREFIX, Ctx, Operator, Viewer
from controller.audit import audit
from controller.verify_store import schedules, store
from controller.verify_store.service import VerificationService

SCHEDULER_ENV = "FLEET_SCHEDULER"  # "off": this controller runs no schedules


def service_for(app: FastAPI) -> VerificationService | None:
    svc: VerificationService | None = getattr(app.state, "verify_service", None)
    return svc


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx = app.state.ctx
    svc = VerificationService(ctx).attach()
    app.state.verify_service = svc
    await svc.recover()  # records an earlier fault left unrecorded (off the loop, retried)
    task = None
    if os.environ.get(SCHEDULER_ENV, "on").lower() not in ("off", "0", "false", "no"):
        task = asyncio.create_task(svc.run_scheduler(), name="verify-scheduler")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        svc.close()


class VerifyBody(BaseModel):
    hosts: list[str] = Field(default_factory=list)
    selector: str | None = None
    mode: str = "full"
    model_path: str | None = None


class ScheduleBody(BaseModel):
    cron: str
    selector: str = "all"
    mode: str = "full"
    actor: str = "admin"  # a claim only: the audit actor is who authenticated (on_behalf_of when it differs)


def router() -> APIRouter:
    r = APIRouter(prefix=API_PREFIX, lifespan=lifespan)

    def svc(request: Request, ctx: Any) -> VerificationService:
        found = service_for(request.app)
        return found if found is not None else VerificationService(ctx)

    @r.post("/verify")
    async def verify(body: VerifyBody, request: Request, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        jobs = await svc(request, ctx).submit(body.hosts, body.selector, mode=body.mode, trigger="manual",
                                              model_path=body.model_path)
        await ctx.store.call(audit, ctx.store, actor.name, "verify.submit", body.selector or ",".join(body.hosts),
                             mode=body.mode, jobs=len(jobs))
        return {"jobs": jobs, "mode": body.mode}

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
                "threshold": store.policy_from_env().threshold, "min_samples": store.policy_from_env().min_samples}}

    @r.get("/verify/nodes/{hostname}")
    def node_health(hostname: str, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        with ctx.store.session() as s:
            return store.health_json(s, hostname)

    @r.get("/schedules")
    def list_schedules(ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return {"schedules": schedules.list_schedules(ctx.store)}

    @r.post("/schedules")
    def add_schedule(body: ScheduleBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        out = schedules.add_schedule(ctx.store, body.cron, body.selector, mode=body.mode, actor=actor.name)
        claimed: dict[str, Any] = {"on_behalf_of": body.actor} if body.actor not in ("admin", actor.name) else {}
        audit(ctx.store, actor.name, "schedule.add", f"schedule:{out.get('id')}", cron=body.cron,
              selector=body.selector, mode=body.mode, **claimed)
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
