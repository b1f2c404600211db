"""The dashboard's FastAPI router: pages, their JSON, Server-Sent Events, login, /metrics.

``mount(app, ctx)`` adds it to the controller's app. ``ctx`` needs ``store``
(``controller.store.db.Store``); ``state_dir`` and ``admin_token`` (a bearer token /metrics also accepts, as it
accepts users' API tokens) are used when present. Login sessions are rows of the database
(controller/dashboard_sessions.py), so a login holds on every controller sharing it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import desc, select
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from fleetctl.controller import audit
from fleetctl.controller.api_tokens import authenticate as authenticate_api_token
from fleetctl.controller.dashboard_sessions import (
    SESSION_COOKIE,
    SessionPolicy,
    WebUser,
    close_session,
    open_session,
    resolve,
)
from fleetctl.controller.node_summary import summarize
from fleetctl.controller.ratelimit import LOGIN_OVERALL, LOGIN_PER_SOURCE, RateLimits
from fleetctl.controller.registry import record_of
from fleetctl.controller.store.db import Store, utcnow
from fleetctl.controller.store.models import FactsHistory, Job, JobEvent, Node, NodeEvent
from fleetctl.controller.verify_store import views as verification_views
from fleetctl.controller.web import attentionview, nodeindex, rolloutview, sources
from fleetctl.controller.web.auth import (
    LOGIN_CSRF_COOKIE,
    MAX_PASSWORD_CHARS,
    LoginThrottle,
    authenticate,
    csrf_ok,
    run_password_work,
)
from fleetctl.controller.web.metrics import render_metrics
from fleetctl.fleet.errors import AuthError, FleetError
from fleetctl.fleet.jobs import UNSUCCESSFUL
from fleetctl.fleet.version import AgentSupport, agent_support, supported_agent_versions

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SSE_POLL_SECONDS = 1.0
SSE_MAX_SECONDS = 20.0  # then the browser reconnects (EventSource retry): no stream outlives a shutdown long
SSE_KEEPALIVE_SECONDS = 15.0
SSE_SESSION_CHECK_SECONDS = 5.0


class LoginRequired(Exception):
    def __init__(self, api: bool) -> None:
        self.api = api


class Forbidden(Exception):
    def __init__(self, message: str) -> None:
        self.message = message


class WebState:
    """What the dashboard keeps per app."""

    def __init__(self, ctx: Any, *, session_policy: SessionPolicy | None = None) -> None:
        self.ctx = ctx
        self.store: Store = ctx.store
        # the controller passes its settings' dashboard_session_seconds and _idle_seconds; standalone apps, defaults
        self.session_policy = session_policy or SessionPolicy.of_seconds()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["age"] = _age
        self.templates.env.filters["skew"] = _skew
        self.templates.env.filters["event_task"] = _event_task
        self.templates.env.filters["event_text"] = _event_text
        self.templates.env.filters["rollout_options"] = rolloutview.describe_options
        self.templates.env.policies["json.dumps_kwargs"] = {"default": str, "sort_keys": True}
        self.closing = False
        self.throttle = LoginThrottle()
        # attempts per client address and overall, before any password work (controller/ratelimit.py): a
        # per-name throttle alone is bypassed by trying a new name each time
        self.login_limits = RateLimits(LOGIN_PER_SOURCE, LOGIN_OVERALL)
        self._counts: tuple[float, dict[str, Any]] | None = None
        self.admin_token: str | None = _admin_token(ctx)

    def filter_counts(self, session: Session) -> dict[str, Any]:
        """The node table's filter choices (GPU models, FA versions with counts): at most 2 s old."""
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] > 2.0:
            self._counts = (now, nodeindex.overview(session, do_sync=False, failing_limit=0))
        return self._counts[1]


def _state_dir(ctx: Any) -> Any:
    return getattr(ctx, "state_dir", None) or getattr(getattr(ctx, "settings", None), "state_dir", None)


def _remove_retired_session_key(ctx: Any) -> None:
    """Delete the ``dashboard.key`` an older version kept in the state dir to sign its session cookies: sessions are
    rows of the database now, and a secret nothing reads should not lie around."""
    state_dir = _state_dir(ctx)
    if not state_dir:
        return
    path = Path(state_dir) / "dashboard.key"
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot remove %s, which no longer signs anything (%s): delete it by hand", path, exc)
        return
    log.info("removed %s: dashboard sessions are rows of the database now (docs/security.md)", path)


def _admin_token(ctx: Any) -> str | None:
    token = getattr(ctx, "admin_token", None)
    if isinstance(token, str) and token:
        return token
    state_dir = _state_dir(ctx)
    if state_dir:
        try:
            return (Path(state_dir) / "admin.token").read_text().strip() or None
        except OSError:
            return None
    return None


def _event_data(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {}
    inner = data.get("event_data")
    return inner if isinstance(inner, dict) else data


def _event_task(data: Any) -> str:
    """The task (or play) of an ansible-runner / fleet event, whichever shape it was stored in."""
    d = _event_data(data)
    top = data if isinstance(data, dict) else {}
    return str(d.get("task") or top.get("task") or d.get("play") or top.get("play") or "")


def _event_text(data: Any) -> str:
    """What an event said: stdout, else the module result's msg/stderr, else a fleet event's message."""
    top = data if isinstance(data, dict) else {}
    d = _event_data(data)
    raw = d.get("res")
    res: dict[str, Any] = raw if isinstance(raw, dict) else {}
    text = top.get("stdout") or res.get("msg") or res.get("stderr") or top.get("msg") or d.get("msg") or ""
    if not text and top.get("event") == "fleet_events_dropped":
        text = f"{top.get('count', '?')} events dropped"
    return str(text)[-4000:]


def _age(value: Any) -> str:
    import datetime as dt
    if value is None or value == "":
        return "never"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    secs = (utcnow() - value).total_seconds()
    if secs < 0:
        return "in " + _span(-secs)
    return _span(secs) + " ago"


def _span(secs: float) -> str:
    if secs < 90:
        return f"{int(secs)} s"
    if secs < 5400:
        return f"{int(secs // 60)} min"
    if secs < 172800:
        return f"{int(secs // 3600)} h"
    return f"{int(secs // 86400)} d"


def _state(request: Request) -> WebState:
    st: WebState = request.app.state.fleet_web
    return st


def _is_api(request: Request) -> bool:
    p = request.url.path
    return p.startswith("/ui/api/") or p.startswith("/ui/events") or p == "/metrics"


def current_user(request: Request) -> WebUser | None:
    cached = getattr(request.state, "web_user", "unset")
    if cached is None or isinstance(cached, WebUser):
        return cached
    st = _state(request)
    with st.store.session() as s:
        user = resolve(s, request.cookies.get(SESSION_COOKIE), st.session_policy, utcnow())
    request.state.web_user = user
    return user


def require_user(request: Request) -> WebUser:
    user = current_user(request)
    if user is None:
        raise LoginRequired(_is_api(request))
    return user


async def require_user_async(request: Request) -> WebUser:
    """``require_user`` for ``async def`` routes: the session lookup reads the database, so it runs on the
    store's pool (a locked database must not stall the event loop); the user is cached on the request, so
    ``render`` afterwards does not look again."""
    return await _state(request).store.call(require_user, request)


async def require_operator(request: Request) -> tuple[WebUser, FormData]:
    """An operator with a valid CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``)."""
    user = await require_user_async(request)
    form = await request.form()
    given = request.headers.get("x-csrf-token") or form.get("csrf_token")
    if not csrf_ok(user.csrf, given if isinstance(given, str) else None):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again")
    if not user.can_act:
        raise Forbidden(f"user {user.name} has the viewer role (read-only); this needs the operator role")
    return user, form


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    st = _state(request)
    context.setdefault("user", current_user(request))
    context.setdefault("nav", "")
    context.setdefault("now", utcnow())
    resp = st.templates.TemplateResponse(request, name, context, status_code=status_code)
    return resp


def _security_headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["Cache-Control"] = "no-store"
    return resp


router = APIRouter()


# ---- login ---------------------------------------------------------------------------------------

def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> Response:
    token = secrets.token_urlsafe(24)
    resp = render(request, "login.html", login_csrf=token, next=_safe_next(next), error=None)
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", max_age=3600, path="/login",
                    secure=request.url.scheme == "https")
    return _security_headers(resp)


@router.post("/login", response_model=None)
async def login_submit(request: Request) -> Response:
    st = _state(request)
    form = await request.form()
    await st.store.call(current_user, request)  # the pages below show who is logged in: look it up off the loop
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    nxt = _safe_next(str(form.get("next", "/")))
    if not csrf_ok(request.cookies.get(LOGIN_CSRF_COOKIE, ""), str(form.get("csrf_token", ""))):
        return _security_headers(render(request, "login.html", status_code=403, login_csrf="", next=nxt,
                                        error="The login form expired; reload the page and try again."))
    addr = request.client.host if request.client else ""
    name, password = name[:64], password[:MAX_PASSWORD_CHARS]  # longer names are invalid anyway
    wait = st.throttle.retry_after(name, addr, time.monotonic()) or math.ceil(st.login_limits.take(addr))
    if wait:
        token = secrets.token_urlsafe(24)
        resp = render(request, "login.html", status_code=429, login_csrf=token, next=nxt,
                      error=f"Too many login attempts; try again in {wait} s.")
        resp.headers["Retry-After"] = str(wait)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", max_age=3600, path="/login")
        return _security_headers(resp)

    def check() -> str | None:  # scrypt and the database: on the password workers, never on the event loop
        with st.store.session() as s:
            user = authenticate(s, name, password)
            issued = open_session(s, user, st.session_policy, utcnow()) if user is not None else None
            if user is not None:
                _audit(s, f"user:{user.name}", "dashboard.login", "")
            else:
                _audit(s, f"user:{name}", "dashboard.login.refused", addr)
            return issued

    cookie = await run_password_work(check)
    if cookie is None:
        st.throttle.failed(name, addr, time.monotonic())
        token = secrets.token_urlsafe(24)
        resp = render(request, "login.html", status_code=401, login_csrf=token, next=nxt,
                      error="Wrong user name or password.")
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", max_age=3600, path="/login")
        return _security_headers(resp)
    st.throttle.succeeded(name, addr)
    redirect = RedirectResponse(nxt, status_code=303)
    lifetime = int(st.session_policy.lifetime.total_seconds())
    redirect.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="lax", max_age=lifetime,
                        secure=request.url.scheme == "https", path="/")
    redirect.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return redirect


@router.post("/logout", response_model=None)
async def logout(request: Request) -> Response:
    user = await require_user_async(request)
    form = await request.form()
    given = request.headers.get("x-csrf-token") or form.get("csrf_token")
    if not csrf_ok(user.csrf, given if isinstance(given, str) else None):
        raise Forbidden("missing or wrong CSRF token")
    st = _state(request)

    def end() -> None:  # the row goes: the cookie is refused by every controller from now on
        with st.store.session() as s:
            close_session(s, request.cookies.get(SESSION_COOKIE, ""))
            _audit(s, f"user:{user.name}", "dashboard.logout", "")

    await st.store.call(end)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


def _audit(session: Session, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
    try:
        audit.record(session, actor, action, target, detail)
    except Exception:  # auditing must never take the dashboard down
        log.exception("audit write failed")


# ---- overview and nodes ----------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request) -> Response:
    require_user(request)
    st = _state(request)
    with st.store.session() as s:
        data = nodeindex.overview(s)
        ro = sources.rollouts(s, limit=5)
    return _security_headers(render(request, "overview.html", nav="overview", ov=data, rollouts=ro))


@router.get("/ui/api/overview")
def overview_json(request: Request) -> JSONResponse:
    require_user(request)
    with _state(request).store.session() as s:
        return JSONResponse(nodeindex.overview(s))


def _node_query(request: Request) -> nodeindex.NodeQuery:
    p = request.query_params

    def num(key: str, default: int) -> int:
        try:
            return int(p.get(key, default))
        except ValueError:
            return default

    return nodeindex.NodeQuery(q=p.get("q", ""), status=p.get("status", ""), gpu=p.get("gpu", ""),
                               fa=p.get("fa", ""), verify=p.get("verify", ""), simulated=p.get("simulated", ""),
                               sort=p.get("sort", "rank"), dir=p.get("dir", "asc"), page=num("page", 1),
                               per_page=num("per_page", 50)).normalised()


@router.get("/nodes", response_class=HTMLResponse)
def nodes_page(request: Request) -> Response:
    require_user(request)
    t0 = time.perf_counter()
    query = _node_query(request)
    st = _state(request)
    with st.store.session() as s:
        page = nodeindex.query_nodes(s, query)
        ov = st.filter_counts(s)
        skew = _agent_skew(s, [row["hostname"] for row in page.rows])
    elapsed_ms = (time.perf_counter() - t0) * 1000

    def link(**override: Any) -> str:
        return "/nodes?" + urlencode(page.query.params(**override))

    resp = render(request, "nodes.html", nav="nodes", page=page, ov=ov, link=link, elapsed_ms=elapsed_ms,
                  skew=skew, supported_agents=supported_agent_versions())
    resp.headers["Server-Timing"] = f"db;dur={elapsed_ms:.1f}"
    return _security_headers(resp)


@router.get("/ui/api/nodes")
def nodes_json(request: Request) -> JSONResponse:
    require_user(request)
    t0 = time.perf_counter()
    query = _node_query(request)
    with _state(request).store.session() as s:
        page = nodeindex.query_nodes(s, query)
    elapsed_ms = (time.perf_counter() - t0) * 1000
    return JSONResponse({"total": page.total, "page": page.query.page, "pages": page.pages,
                         "per_page": page.query.per_page, "sort": page.query.sort, "dir": page.query.dir,
                         "nodes": page.rows, "server_ms": round(elapsed_ms, 2)},
                        headers={"Server-Timing": f"db;dur={elapsed_ms:.1f}"})


def _agent_skew(s: Session, hostnames: list[str]) -> dict[str, str]:
    """The hosts among ``hostnames`` whose agent is outside the versions this controller supports (fleet/version.py),
    as "0.0.9 (too-old)": the node table flags them."""
    rows = s.execute(select(Node.hostname, Node.agent_version).where(Node.hostname.in_(hostnames)))
    return {host: f"{version} ({support})" for host, version in rows
            if (support := agent_support(version)) in (AgentSupport.TOO_OLD, AgentSupport.TOO_NEW)}


def _node_detail(s: Session, hostname: str, state_dir: Any = None) -> dict[str, Any] | None:
    node = s.scalars(select(Node).where(Node.hostname == hostname)).first()
    if node is None:
        return None
    history = list(s.scalars(select(FactsHistory).where(FactsHistory.node_id == node.id)
                             .order_by(desc(FactsHistory.at)).limit(50)))
    events = list(s.scalars(select(NodeEvent).where(NodeEvent.node_id == node.id)
                            .order_by(desc(NodeEvent.at)).limit(50)))
    jobs = list(s.scalars(select(Job).where(Job.node == hostname).order_by(desc(Job.created_at)).limit(20)))
    job_events: dict[str, list[JobEvent]] = {}
    for job in jobs[:10]:
        job_events[job.id] = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)
                                            .order_by(JobEvent.counter).limit(300)))
    record = record_of(node)
    summary = summarize(record)
    gpu_model = summary.gpu_model or ""
    verifications = sources.verification_history(s, hostname)
    median = sources.fleet_median(s, gpu_model, simulated=node.simulated) if gpu_model else None
    return {
        "node": node, "labels": dict(record.labels), "summary": summary,
        "supported_agents": supported_agent_versions(),
        "facts": record.facts, "facts_error": record.facts_error, "history": history, "events": events,
        "jobs": jobs,
        "job_events": job_events, "plan": sources.plan_for(s, record, state_dir), "verifications": verifications,
        "rollouts": sources.node_rollouts(s, hostname),
        "median": median, "gpu_model": gpu_model,
        "chart": chart_svg([{"at": v.at, "tflops": v.tflops, "sdpa_tflops": v.sdpa_tflops, "passed": v.passed}
                            for v in verifications], [{"at": m.at, "tflops": m.tflops} for m in median or []])
        if verifications else None,
        "diagnosis": _diagnoses(s, hostname, jobs, job_events),
        "health": sources.node_verify_health(s, hostname),
        "attention": attentionview.node_attention(s, record, bool(node.simulated), state_dir),
    }


def _diagnoses(s: Session, hostname: str, jobs: list[Job],
               job_events: dict[str, list[JobEvent]]) -> list[dict[str, Any]]:
    """Failures to show on top of the node page: rollout failures (diagnosed by the rollout engine),
    then failed jobs not covered by them (diagnosed here from their output)."""
    out = [{"source": f"rollout {f['rollout']}", "kind": f["step"], "job": f["job"], "error": f["error"],
            "diagnosis": f["diagnosis"]} for f in sources.node_rollout_failures(s, hostname)]
    covered = {f["job"] for f in out}
    for job in jobs[:10]:
        if job.status in UNSUCCESSFUL and job.id not in covered:
            text = "\n".join([job.error or ""] + [str(e.data.get("stdout") or e.data.get("msg") or "")
                                                   for e in job_events.get(job.id, [])
                                                   if e.event in ("runner_on_failed", "fleet_failed", "fleet_output")])
            out.append({"source": "job", "kind": job.kind, "job": job.id, "error": job.error or "",
                        "diagnosis": sources.diagnose_text(text)})
    return out


@router.get("/nodes/{hostname}", response_class=HTMLResponse)
def node_page(request: Request, hostname: str) -> Response:
    require_user(request)
    st = _state(request)
    with st.store.session() as s:
        detail = _node_detail(s, hostname, _state_dir(st.ctx))
    if detail is None:
        return _security_headers(render(request, "error.html", status_code=404, title="No such node",
                                        message=f"No node is registered as {hostname}."))
    return _security_headers(render(request, "node.html", nav="nodes", d=detail))


@router.get("/attention", response_class=HTMLResponse)
def attention_page(request: Request, workload: str | None = None) -> Response:
    require_user(request)
    st = _state(request)
    chosen = attentionview.workload_of(workload)
    with st.store.session() as s:
        table = attentionview.fleet_table(s, _state_dir(st.ctx), chosen)
    return _security_headers(render(request, "attention.html", nav="attention", t=table))


# ---- rollouts and schedules ----------------------------------------------------------------------

@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request) -> Response:
    require_user(request)
    with _state(request).store.session() as s:
        ro = sources.rollouts(s)
    return _security_headers(render(request, "rollouts.html", nav="rollouts", rollouts=ro))


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(request: Request, rollout_id: str) -> Response:
    require_user(request)
    with _state(request).store.session() as s:
        detail = rolloutview.rollout_detail(s, rollout_id)
    if detail is None:
        return _security_headers(render(request, "error.html", status_code=404, title="No such rollout",
                                        message=f"There is no rollout {rollout_id}."))
    return _security_headers(render(request, "rollout.html", nav="rollouts", r=detail))


@router.get("/ui/api/rollouts/{rollout_id}")
def rollout_json(request: Request, rollout_id: str) -> JSONResponse:
    require_user(request)
    with _state(request).store.session() as s:
        detail = rolloutview.rollout_detail(s, rollout_id)
    if detail is None:
        return JSONResponse({"error": "not-found"}, status_code=404)
    return JSONResponse(json.loads(json.dumps(detail, default=str)))


@router.post("/rollouts/{rollout_id}/{action}", response_model=None)
async def rollout_action(request: Request, rollout_id: str, action: str) -> Response:
    user, _form = await require_operator(request)
    if action not in ("pause", "resume", "approve", "abort", "rollback"):
        return JSONResponse({"error": f"unknown action {action}"}, status_code=404)
    st = _state(request)
    try:
        message = await asyncio.to_thread(sources.rollout_action, st.ctx, rollout_id, action, f"user:{user.name}",
                                          engine=getattr(st.ctx, "rollout_engine", None))
        ok = True
        _shared.clear()
    except FleetError as exc:
        message, ok = f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""), False

        def refused() -> None:
            with st.store.session() as s:
                _audit(s, f"user:{user.name}", f"rollout.{action}.refused", rollout_id, {"message": message})

        await st.store.call(refused)  # an async route: the database work goes to the store's pool
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"ok": ok, "message": message}, status_code=200 if ok else 409)
    return RedirectResponse(f"/rollouts/{rollout_id}?" + urlencode({"msg": message}), status_code=303)


@router.get("/schedules", response_class=HTMLResponse)
def schedules_page(request: Request) -> Response:
    require_user(request)
    with _state(request).store.session() as s:
        nodeindex.sync(s)
        sched = sources.schedules(s)
    return _security_headers(render(request, "schedules.html", nav="schedules", schedules=sched))


# ---- server-sent events --------------------------------------------------------------------------

def _node_snapshot(s: Session, hostname: str) -> Any:
    """What makes a node page change (not last_seen: heartbeats would refresh it every few seconds)."""
    from sqlalchemy import func

    node = s.execute(select(Node.id, Node.status, Node.facts_updated_at).where(Node.hostname == hostname)).first()
    if node is None:
        return None
    jobs = s.execute(select(Job.id, Job.status).where(Job.node == hostname).order_by(desc(Job.created_at))
                     .limit(20)).all()
    last_event = s.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id.in_([j[0] for j in jobs]))) \
        if jobs else None
    return {"status": node[1], "facts_at": node[2], "jobs": [list(j) for j in jobs], "event": last_event,
            "verified": verification_views.last_recorded_at(s, hostname),
            "transitions": s.scalar(select(func.count()).select_from(NodeEvent).where(NodeEvent.node_id == node[0]))}


def _snapshot(st: WebState, topic: str) -> Any:
    with st.store.session() as s:
        if topic == "overview":
            ov = nodeindex.overview(s)
            return {"overview": ov, "rollouts": sources.rollouts(s, limit=5)}
        if topic == "nodes":
            return nodeindex.fingerprint(s)
        if topic.startswith("rollout:"):
            return rolloutview.rollout_detail(s, topic.split(":", 1)[1])
        if topic == "rollouts":
            return sources.rollouts(s)
        if topic.startswith("node:"):
            return _node_snapshot(s, topic.split(":", 1)[1])
        if topic == "schedules":
            nodeindex.sync(s)
            return sources.schedules(s)
    return None


_shared: dict[tuple[int, str], tuple[float, str]] = {}


def _snapshot_text(st: WebState, topic: str, *, fresh: bool = False) -> str:
    """The topic's snapshot as JSON; browsers watching the same topic share one computation a second
    (a new connection always computes its own first snapshot)."""
    key = (id(st), topic)
    hit = _shared.get(key)
    now = time.monotonic()
    if not fresh and hit is not None and now - hit[0] < SSE_POLL_SECONDS * 0.9:
        return hit[1]
    try:
        text = json.dumps(_snapshot(st, topic), default=str, sort_keys=True)
    except FleetError as exc:
        text = json.dumps({"error": exc.message})
    if len(_shared) > 1000:
        _shared.clear()
    _shared[key] = (now, text)
    return text


def _session_valid(st: WebState, cookie: str | None) -> bool:
    with st.store.session() as s:
        return resolve(s, cookie, st.session_policy, utcnow()) is not None


async def _events(request: Request, topic: str) -> AsyncIterator[str]:
    st = _state(request)
    started = last_sent_at = checked = time.monotonic()
    cookie = request.cookies.get(SESSION_COOKIE)
    last = None
    yield "retry: 2000\n\n"
    while not st.closing and time.monotonic() - started < SSE_MAX_SECONDS:
        if await request.is_disconnected():
            return
        if time.monotonic() - checked > SSE_SESSION_CHECK_SECONDS:  # logged out, user removed, expired...
            checked = time.monotonic()
            if await asyncio.to_thread(_session_valid, st, cookie) is False:
                return
        text = await asyncio.to_thread(_snapshot_text, st, topic, fresh=last is None)
        if text != last:
            last = text
            last_sent_at = time.monotonic()
            yield f"event: update\ndata: {text}\n\n"
        elif time.monotonic() - last_sent_at > SSE_KEEPALIVE_SECONDS:
            last_sent_at = time.monotonic()
            yield ": keepalive\n\n"
        await asyncio.sleep(SSE_POLL_SECONDS)


@router.get("/ui/events")
def events(request: Request, topic: str = "overview") -> StreamingResponse:
    require_user(request)
    return StreamingResponse(_events(request, topic), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# ---- metrics -------------------------------------------------------------------------------------

@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus scrapes with a bearer token: any user's API token (a ``metrics`` user's is the read-only
    scrape credential: it can read nothing else) or the admin token; a logged-in dashboard session works too."""
    st = _state(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        if not (st.admin_token and secrets.compare_digest(token.encode(), st.admin_token.encode())):
            try:
                authenticate_api_token(st.store, token)  # every role may scrape: metrics is the least
            except AuthError as exc:
                return JSONResponse({"error": "unauthenticated", "message": exc.message, "hint": exc.hint},
                                    status_code=401, headers={"WWW-Authenticate": 'Bearer realm="fleet-metrics"'})
    else:
        require_user(request)
    ca = getattr(st.ctx, "ca", None)  # a standalone dashboard (tests, screenshots) may have no CA
    body, content_type = render_metrics(st.store, ca.cert.not_valid_after_utc if ca is not None else None,
                                        _state_dir(st.ctx))
    return Response(body, media_type=content_type)


# ---- charts --------------------------------------------------------------------------------------

def _skew(seconds: float) -> str:
    """An agent's clock against the controller's: "1 h ahead", "12 s behind"."""
    return f"{_span(abs(seconds))} {'ahead' if seconds >= 0 else 'behind'}"


def chart_svg(points: list[dict[str, Any]], median: list[dict[str, Any]], width: int = 640,
              height: int = 220) -> str:
    """An inline SVG of TFLOP/s over time: this node (dots, red when failed), the fleet median for
    its GPU model (dashed) and the SDPA baseline (grey)."""
    import datetime as dt
    from html import escape

    def ts(v: Any) -> float:
        if isinstance(v, dt.datetime):
            return v.timestamp()
        return dt.datetime.fromisoformat(str(v)).timestamp()

    series = [(ts(p["at"]), p.get("tflops"), p.get("sdpa_tflops"), p.get("passed")) for p in points]
    med = [(ts(m["at"]), m.get("tflops")) for m in median]
    xs = [x for x, *_ in series] + [x for x, _ in med]
    ys = [y for _, y, *_ in series if y is not None] + [y for *_, y, _ in series if y is not None]
    ys += [y for _, y in med if y is not None]
    if not xs or not ys:
        return ""
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) * 1.1 or 1.0
    pad_l, pad_r, pad_t, pad_b = 48, 10, 10, 28

    def px(x: float) -> float:
        return pad_l + (0.5 if x1 == x0 else (x - x0) / (x1 - x0)) * (width - pad_l - pad_r)

    def py(y: float) -> float:
        return pad_t + (1 - y / y1) * (height - pad_t - pad_b)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="TFLOP/s over time">']
    for i in range(5):
        yv = y1 * i / 4
        out.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{py(yv):.1f}" y2="{py(yv):.1f}" class="grid"/>'
                   f'<text x="{pad_l - 4}" y="{py(yv) + 4:.1f}" class="axis" text-anchor="end">{yv:.0f}</text>')
    for label, x in (("first", x0), ("last", x1)):
        when = dt.datetime.fromtimestamp(x, dt.UTC).strftime("%m-%d %H:%M")
        anchor = "start" if label == "first" else "end"
        out.append(f'<text x="{px(x):.1f}" y="{height - 8}" class="axis" text-anchor="{anchor}">{when}</text>')

    def polyline(pts: list[tuple[float, float]], cls: str) -> None:
        if pts:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" class="{cls}"/>')

    polyline([(x, y) for x, y in med if y is not None], "median")
    polyline([(x, s) for x, _, s, _ in series if s is not None], "sdpa")
    polyline([(x, y) for x, y, _, _ in series if y is not None], "node")
    for x, y, _, passed in series:
        if y is not None:
            cls = "pass" if passed else "fail"
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" class="{cls}">'
                       f'<title>{escape(f"{y:.1f} TFLOP/s")}</title></circle>')
    out.append(f'<text x="{pad_l + 4}" y="{pad_t + 10}" class="legend">TFLOP/s — ● this node · '
               f'- - fleet median · ── SDPA</text></svg>')
    return "".join(out)


# ---- mounting ------------------------------------------------------------------------------------

def mount(app: FastAPI, ctx: Any, *, session_policy: SessionPolicy | None = None) -> None:
    """Add the dashboard to ``app`` (the controller's app), reading from ``ctx.store``."""
    _remove_retired_session_key(ctx)
    st = WebState(ctx, session_policy=session_policy)
    app.state.fleet_web = st
    app.include_router(router)
    app.mount("/static/web", StaticFiles(directory=str(HERE / "static")), name="web-static")

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        if exc.api:
            return JSONResponse({"error": "unauthenticated", "hint": "log in at /login"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="fleet-dashboard"'})
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": nxt}), status_code=303)

    async def forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forbidden)
        if _is_api(request) or "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"error": "forbidden", "message": exc.message}, status_code=403)
        return _security_headers(render(request, "error.html", status_code=403, title="Not allowed",
                                        message=exc.message))

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(Forbidden, forbidden)


def close(app: FastAPI) -> None:
    """End the dashboard's event streams (call on shutdown, so open browsers don't hold the server)."""
    st: WebState | None = getattr(app.state, "fleet_web", None)
    if st is not None:
        st.closing = True


def create_standalone_app(ctx: Any, **kw: Any) -> FastAPI:
    """A FastAPI app with only the dashboard (tests, screenshots, benchmarks)."""
    app = FastAPI(title="fleet dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    mount(app, ctx, **kw)
    return app

