"""The controller's HTTP app (FastAPI): it assembles the routers; each router is a leaf.

``create_app(ctx)`` builds the app from the parts the composition root (controller/app.py) built: this
module's own JSON routes, the sub-routers (artifacts, rollouts, verification, attention) and the dashboard.
Routes take the controller and the caller from controller/http_deps.py (``Ctx``, ``Viewer``, ``Operator``,
``Admin``), never from this module, so that no router imports the app back. No router starts anything: the
background loops are the root's. ``FleetError`` raised by a handler becomes
``{"error": {"code", "message", "hint"}}`` with a matching HTTP status.

Routes: GET /api/v1/health, /api/v1/live, /api/v1/ready (no auth; docs/fleet.md "Health")
· GET /api/v1/stats · GET /api/v1/nodes[?facts=true&selector=LABELS] · GET /api/v1/nodes/{host}
· POST /api/v1/nodes/{host}/labels (``fleetctl label``; docs/cli.md, "Labels and selectors")
· POST /api/v1/nodes/{host}/revoke · GET/POST /api/v1/tokens · POST /api/v1/tokens/{ref}/revoke
· GET /api/v1/agents/pending · POST /api/v1/agents/{host}/approve|deny (the approval queue)
· GET /api/v1/jobs[?node=] · GET /api/v1/jobs/{id} · GET /api/v1/artifacts · GET /api/v1/audit
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from fleetctl.controller import audit, node_summary, web
from fleetctl.controller.artifacts_api import router as artifacts_router
from fleetctl.controller.attention_api import router as attention_router
from fleetctl.controller.context import ControllerContext
from fleetctl.controller.dashboard_sessions import SessionPolicy
from fleetctl.controller.enrollment import TokenLimits
from fleetctl.controller.http_deps import API_PREFIX, Admin, Ctx, Operator, Viewer
from fleetctl.controller.labels import parse_label_changes
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.rollout.api import router as rollout_router
from fleetctl.controller.telemetry import HttpMetrics
from fleetctl.controller.verify_store.api import router as verify_router
from fleetctl.fleet.errors import (
    AuthError,
    ConflictError,
    ControllerUnavailable,
    FleetError,
    ForbiddenError,
    InputError,
    NotFoundError,
    StoreError,
    UpstreamError,
    UsageError,
)
from fleetctl.fleet.version import package_version, supported_agent_versions

_HTTP_STATUS: list[tuple[type[FleetError], int]] = [
    (AuthError, 401), (ForbiddenError, 403), (NotFoundError, 404), (ConflictError, 409), (InputError, 422),
    (UsageError, 400),
    (StoreError, 503), (ControllerUnavailable, 503), (UpstreamError, 502),
]


def http_status_for(exc: FleetError) -> int:
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


class LabelsBody(BaseModel):
    """``fleetctl label NODE k=v k2-``: labels to set and keys to remove (checked by controller/labels.py)."""

    set: dict[str, str] = Field(default_factory=dict, max_length=100)
    remove: list[str] = Field(default_factory=list, max_length=100)


class TokenCreate(BaseModel):
    ttl_seconds: int = Field(default=24 * 3600, ge=1, le=365 * 24 * 3600)
    hostname: str | None = None
    uses: int = 1  # checked by TokenLimits (InputError naming the range)
    hostname_pattern: str | None = None
    source_network: str | None = None
    approval: bool = False


READY_TIMEOUT_S = 2.0


async def db_probe(ctx: ControllerContext) -> dict[str, Any]:
    """``Store.probe`` on the store's thread pool, bounded as a whole: when every database worker is stuck
    (a held lock), the probe cannot even start, and that is the answer."""
    try:
        probe = await asyncio.wait_for(ctx.store.call(ctx.store.probe, READY_TIMEOUT_S), READY_TIMEOUT_S + 0.5)
    except TimeoutError:
        probe = {"ok": False, "ms": (READY_TIMEOUT_S + 0.5) * 1000,
                 "reason": f"database blocked: no answer within {READY_TIMEOUT_S:g}s (every database worker is busy)"}
    result: dict[str, Any] = probe
    return result


def api_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)

    @router.get("/live")
    async def live() -> dict[str, Any]:
        """The process answers (and says its version, for `fleetctl version`). Served on the event loop on
        purpose: a stalled loop shows as a slow /live."""
        return {"ok": True, "version": package_version()}

    @router.get("/ready")
    async def ready(ctx: Ctx) -> JSONResponse:
        """The database answers and takes a write within READY_TIMEOUT_S; 503 with the reason if not."""
        db = await db_probe(ctx)
        return JSONResponse({"ok": db["ok"], "db": db}, status_code=200 if db["ok"] else 503)

    @router.get("/health")
    async def health(ctx: Ctx) -> JSONResponse:
        """Ready, and the controller's own writes are not failing: 503 with the reason if either is wrong."""
        db = await db_probe(ctx)
        writes = ctx.store.health
        if db["ok"] and writes.failing:
            db = {**db, "ok": False, "reason": f"database writes failing: {writes.last_error}"}
        db["write_errors"] = writes.errors
        body = {"ok": db["ok"], "db": db, "grpc": ctx.grpc_address, "enroll": ctx.enroll_address}
        return JSONResponse(body, status_code=200 if db["ok"] else 503)

    @router.get("/stats")
    def stats(ctx: Ctx, _: Viewer, reset_lag: bool = False) -> dict[str, Any]:
        """Counters for monitoring and benchmarks (heartbeats received, DB rows written by liveness, loop lag)."""
        reg = ctx.registry
        counts = reg.counts()
        lag, gcs = ctx.loop_lag.summary(), ctx.gc_monitor.summary()
        if reset_lag:
            ctx.loop_lag.reset()
            ctx.gc_monitor.reset()
        return {"loop_lag": lag, "gc": gcs, "nodes": reg.node_count, "heartbeats": reg.heartbeats,
                "liveness_db_writes": reg.db_writes, "online": counts[NodeStatus.ONLINE]}

    @router.get("/nodes")
    def nodes(ctx: Ctx, _: Viewer, facts: bool = False, selector: str | None = None) -> dict[str, Any]:
        """Every node, or those whose labels ``selector`` (``-l``) matches: the registry applies it."""
        records = ctx.registry.select(selector) if selector else ctx.registry.records()
        with ctx.store.session() as s:
            return {"nodes": node_summary.list_json(s, records, with_facts=facts),
                    "supported_agent_versions": supported_agent_versions()}

    @router.get("/nodes/{hostname}")
    def node(hostname: str, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        record, history = ctx.registry.record(hostname), ctx.registry.history(hostname)
        with ctx.store.session() as s:
            return node_summary.detail_json(s, record, history)

    @router.post("/nodes/{hostname}/labels")
    def label_node(hostname: str, body: LabelsBody, ctx: Ctx, actor: Operator) -> dict[str, Any]:
        """Labels steer which nodes rollouts and verifications take: an operator's change, audited."""
        changes = parse_label_changes([f"{k}={v}" for k, v in body.set.items()] + [f"{k}-" for k in body.remove])
        return {"hostname": hostname, "labels": ctx.registry.set_labels(hostname, changes, actor.name)}

    @router.post("/nodes/{hostname}/revoke")
    def revoke_agent(hostname: str, ctx: Ctx, actor: Admin) -> dict[str, Any]:
        return {"hostname": hostname, "revoked": ctx.revoke_agent(hostname, actor.name)}

    @router.get("/tokens")
    def tokens(ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return {"tokens": ctx.enrollment.list_tokens()}

    @router.post("/tokens")
    def create_token(body: TokenCreate, ctx: Ctx, actor: Admin) -> dict[str, Any]:
        limits = TokenLimits(uses=body.uses, hostname=body.hostname, hostname_pattern=body.hostname_pattern,
                             source_network=body.source_network, approval=body.approval)
        token, listing = ctx.enrollment.create_token(dt.timedelta(seconds=body.ttl_seconds), body.hostname,
                                                     actor.name, limits)
        return {"token": token, **listing}

    @router.get("/agents/pending")
    def pending_agents(ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return {"pending": ctx.enrollment.pending()}

    @router.post("/agents/{hostname}/approve")
    def approve_agent(hostname: str, ctx: Ctx, actor: Admin) -> dict[str, Any]:
        return ctx.enrollment.approve(hostname, actor.name)

    @router.post("/agents/{hostname}/deny")
    def deny_agent(hostname: str, ctx: Ctx, actor: Admin) -> dict[str, Any]:
        return ctx.enrollment.deny(hostname, actor.name)

    @router.post("/tokens/{ref}/revoke")
    def revoke_token(ref: str, ctx: Ctx, actor: Admin) -> dict[str, Any]:
        return ctx.enrollment.revoke_token(ref, actor.name)

    @router.get("/jobs")
    def jobs(ctx: Ctx, _: Viewer, node: str | None = None, limit: int = 100) -> dict[str, Any]:
        return {"jobs": ctx.jobs.list_jobs(node, min(max(limit, 1), 1000))}

    @router.get("/jobs/{job_id}")
    def job(job_id: str, ctx: Ctx, _: Viewer) -> dict[str, Any]:
        return ctx.jobs.get(job_id)

    @router.get("/ca")
    def ca_certificate(ctx: Ctx, _: Viewer) -> dict[str, str]:
        """The CA agents verify the controller with (and its chain): what `fleetctl agents install` puts on nodes."""
        return {"pem": ctx.ca.ca_pem.decode()}

    @router.get("/artifacts")
    def artifacts(ctx: Ctx, _: Viewer, kind: str | None = None) -> dict[str, Any]:
        return {"artifacts": [a.to_json() for a in ctx.artifacts.list_all() if kind is None or a.kind == kind]}

    @router.get("/audit")
    def audit_log(ctx: Ctx, _: Viewer, limit: int = 100) -> dict[str, Any]:
        with ctx.store.session() as s:
            rows = audit.entries(s, limit=min(max(limit, 1), 1000), newest_first=True)
        return {"audit": [r.to_json() for r in rows]}

    return router


def create_app(ctx: ControllerContext) -> FastAPI:
    """The controller's web app: JSON API under /api/v1; the dashboard mounts its pages here too."""
    # The schema maps every route an attacker could try, so it is served to authenticated callers only (bearer
    # token, like the API it describes); the Swagger/ReDoc pages are off: they load their scripts from a CDN
    # (nothing in an air-gapped site) and a browser page cannot send the bearer token (docs/security.md, "OpenAPI
    # schema").
    app = FastAPI(title="fleetctl controller", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HttpMetrics)  # fleet_controller_http_request_duration_seconds on /metrics
    app.state.ctx = ctx

    @app.get(f"{API_PREFIX}/openapi.json", include_in_schema=False)
    def openapi_schema(_: Viewer) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.exception_handler(FleetError)
    async def fleet_error(request: Request, exc: FleetError) -> JSONResponse:
        return JSONResponse(status_code=http_status_for(exc),
                            content={"error": {"code": exc.code, "message": exc.message, "hint": exc.hint}})

    app.include_router(api_router())
    app.include_router(artifacts_router())  # POST /api/v1/artifacts (fleetctl artifact add)
    app.include_router(rollout_router())  # rollouts: docs/rollout.md
    app.include_router(verify_router())  # verify, schedules: docs/verification.md
    app.include_router(attention_router())  # attention recommendation
    # the dashboard: controller/web, docs/dashboard.md
    web.mount(app, ctx, session_policy=SessionPolicy.of_seconds(ctx.settings.dashboard_session_seconds,
                                                            ctx.settings.dashboard_session_idle_seconds))
    return app
