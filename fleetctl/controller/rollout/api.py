"""HTTP routes of rollouts under /api/v1/rollouts.

A change the engine should act on at once wakes ``ctx.rollout_engine`` (its loop is the composition root's,
controller/app.py; it also finds the change at its next tick).

Routes (bearer token; reads: any role, POST: operator or admin — controller/http_deps.py):
POST /rollouts (start or dry run) · GET /rollouts · GET /rollouts/latest ·
GET /rollouts/{id}[?since=TRANSITION_ID] ·
GET /rollouts/nodes/{hostname} (that node's part in each) · POST /rollouts/{id}/pause|resume|approve|abort|rollback ·
GET /rollouts/{id}/audit
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fleetctl.controller.api_tokens import Principal
from fleetctl.controller.http_deps import API_PREFIX, Ctx, Operator, Viewer
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.core import selection_text
from fleetctl.fleet.workload import BusyPolicy


class StartBody(BaseModel):
    version: str | None = None
    nodes: str | None = None
    labels: str | None = None  # a label selector (-l), AND-ed with nodes
    canary: int | None = Field(default=None, ge=0, le=10_000)
    batch: str | None = None
    max_parallel: int | None = Field(default=None, ge=1, le=100_000)
    max_failures: str | None = None
    dry_run: bool = False
    actor: str | None = Field(default=None, max_length=128)
    step_timeouts: dict[str, int] = Field(default_factory=dict)
    min_free_bytes: int | None = Field(default=None, ge=0)
    builders: list[str] = Field(default_factory=list, max_length=1000)
    verify_mode: str | None = Field(default=None, pattern="^(quick|full)$")
    when_busy: str | None = None  # wait | skip | fail (fleet/workload.py; default wait)
    busy_timeout: float | None = None  # seconds a step waits for idle GPUs (default 1800)
    gpus: str | None = None  # the verify step's GPUs: any | all | idle | 0,1 (default any)
    fa3: bool = False
    fa4: bool = False
    source_builds: bool = True
    prefer: str = "compatible"  # fastest: the attention recommendation picks (controller/attention.py)
    workload: str = "training"
    max_unavailable: str | None = Field(default=None, max_length=16)
    windows: list[str] = Field(default_factory=list, max_length=50)
    window_zone: str = Field(default="UTC", max_length=64)
    pause_after_canary: bool = False
    bake_time: str | None = Field(default=None, max_length=32)
    notify_webhooks: list[str] = Field(default_factory=list, max_length=10)


class ActorBody(BaseModel):
    actor: str | None = Field(default=None, max_length=128)
    retry_failed: bool = False
    max_failures: str | None = None


def _on_behalf_of(principal: Principal, claimed: str | None) -> str | None:
    """The audit actor is who authenticated (``principal``); the name the client sends ($USER / --actor) is only
    a claim, kept as the audit row's ``on_behalf_of`` detail when it says something else."""
    return claimed if claimed and claimed != principal.name else None


def router() -> APIRouter:
    r = APIRouter(prefix=f"{API_PREFIX}/rollouts")

    @r.post("")
    def start(body: StartBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        req = service.RolloutRequest(version=body.version, nodes=selection_text(body.nodes, body.labels),
                                     canary=body.canary, batch=body.batch,
                                     max_parallel=body.max_parallel, max_failures=body.max_failures,
                                     dry_run=body.dry_run, step_timeouts=body.step_timeouts,
                                     min_free_bytes=body.min_free_bytes, builders=tuple(body.builders),
                                     verify_mode=body.verify_mode, fa3=body.fa3, fa4=body.fa4,
                                     source_builds=body.source_builds, prefer=body.prefer,
                                     workload=body.workload, max_unavailable=body.max_unavailable,
                                     windows=tuple(body.windows), window_zone=body.window_zone,
                                     pause_after_canary=body.pause_after_canary, bake_time=body.bake_time,
                                     notify_webhooks=tuple(body.notify_webhooks), actor=actor.name,
                                     busy=BusyPolicy.of(body.when_busy, body.busy_timeout, body.gpus),
                                     on_behalf_of=_on_behalf_of(actor, body.actor))
        out = service.start_rollout(ctx.store, req, state_dir=ctx.settings.state_dir, provisioner=ctx.provisioner)
        ctx.rollout_engine.wake()
        return out

    @r.get("")
    def list_(ctx: Ctx, _: Viewer, limit: int = 50) -> dict[str, Any]:
        return {"rollouts": service.list_rollouts(ctx.store, min(max(limit, 1), 1000))}

    @r.get("/latest")
    def latest(ctx: Ctx, _: Viewer, since: int | None = None) -> dict[str, Any]:
        return service.get_status(ctx.store, None, since=since)

    @r.get("/nodes/{hostname}")
    def of_node(hostname: str, ctx: Ctx, _: Viewer, limit: int = 20) -> dict[str, Any]:
        with ctx.store.session() as s:
            return {"hostname": hostname, "rollouts": service.node_rollouts(s, hostname, min(max(limit, 1), 200))}

    @r.get("/{rid}")
    def status(rid: str, ctx: Ctx, _: Viewer, since: int | None = None) -> dict[str, Any]:
        return service.get_status(ctx.store, rid, since=since)

    @r.get("/{rid}/audit")
    def audit_(rid: str, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return {"audit": service.audit_entries(ctx.store, rid)}

    @r.post("/{rid}/pause")
    def pause(rid: str, body: ActorBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        return service.pause(ctx.store, rid, actor.name, on_behalf_of=_on_behalf_of(actor, body.actor))

    @r.post("/{rid}/resume")
    def resume(rid: str, body: ActorBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        out = service.resume(ctx.store, rid, actor.name, retry_failed=body.retry_failed,
                             max_failures=body.max_failures, state_dir=ctx.settings.state_dir,
                             provisioner=ctx.provisioner, on_behalf_of=_on_behalf_of(actor, body.actor))
        ctx.rollout_engine.wake()
        return out

    @r.post("/{rid}/approve")
    def approve(rid: str, body: ActorBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        out = service.approve(ctx.store, rid, actor.name, on_behalf_of=_on_behalf_of(actor, body.actor))
        ctx.rollout_engine.wake()
        return out

    @r.post("/{rid}/abort")
    def abort(rid: str, body: ActorBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        return service.abort(ctx.store, rid, actor.name, on_behalf_of=_on_behalf_of(actor, body.actor))

    @r.post("/{rid}/rollback")
    def rollback(rid: str, body: ActorBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        out = service.rollback(ctx.store, rid, actor.name, on_behalf_of=_on_behalf_of(actor, body.actor))
        ctx.rollout_engine.wake()
        return out

    return r
