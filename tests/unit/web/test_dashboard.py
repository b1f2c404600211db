"""Dashboard unit tests (FastAPI TestClient, SQLite in a temp dir): auth, CSRF, roles, pagination, SSE, metrics."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.dashboard_sessions import SESSION_COOKIE, DashboardSession, SessionPolicy
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store.db import Store, utcnow
from fleetctl.controller.store.models import Node
from fleetctl.controller.testing import CUDA_MISMATCH_LOG, FleetThread, JobScript
from fleetctl.controller.web import app as web_app
from fleetctl.controller.web import create_standalone_app, nodeindex
from fleetctl.controller.web.auth import add_user, hash_password, verify_password
from fleetctl.controller.web.models import DashboardNode

PASSWORD = "correct horse battery"
# one simulated node of each profile in turn: 120 nodes make 15 of each GPU model
PROFILES = ("h100", "a100", "l40s", "t4", "rtx4090", "a10", "l4", "h200")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    """A real controller (store, registry, job dispatcher, rollout engine, verification) with fake agents."""
    with FleetThread(state_dir=tmp_path / "controller") as ft:
        yield ft


@pytest.fixture
def store(fleet: FleetThread) -> Store:
    st = fleet.fleet.ctx.store
    add_user(st, "olga", "operator", PASSWORD)
    add_user(st, "vic", "viewer", PASSWORD)
    return st


@pytest.fixture
def ctx(fleet: FleetThread, store: Store) -> Any:
    return fleet.fleet.ctx


def add_nodes(fleet: FleetThread, n: int, *, offline: tuple[int, ...] = (),
              profiles: tuple[str, ...] = PROFILES) -> list[str]:
    """``n`` simulated nodes ``sim-node-00000``… enrolled and registered by their (fake) agents; the nodes at
    the ``offline`` indexes lose their agent."""
    facts = [load_profile(profiles[i % len(profiles)], f"sim-node-{i:05d}") for i in range(n)]
    hosts = fleet.call(fleet.fleet.add_nodes(facts))
    for i in offline:
        fleet.call(fleet.fleet.set_offline(hosts[i]))
    return hosts


def start_rollout(fleet: FleetThread, hosts: list[str], **options: Any) -> str:
    """``fleetctl rollout start --nodes HOSTS`` (the engine moves it once started: ``run_engine``)."""
    return fleet.call(fleet.fleet.start_rollout(RolloutRequest(nodes=",".join(hosts), actor="user:demo", **options)))


def run_engine(fleet: FleetThread) -> None:
    fleet.call(fleet.fleet.start_engine())


def rollout_status(store: Store, rollout_id: str) -> str:
    return str(service.get_status(store, rollout_id)["status"])


@pytest.fixture
def client(ctx: Any) -> Iterator[TestClient]:
    with TestClient(create_standalone_app(ctx)) as c:
        yield c


def login(c: TestClient, user: str, password: str = PASSWORD, next_: str = "/") -> Any:
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    return c.post("/login", data={"username": user, "password": password, "csrf_token": token.group(1),
                                  "next": next_}, follow_redirects=False)


def csrf_of(c: TestClient) -> str:
    m = re.search(r'data-csrf="([^"]+)"', c.get("/").text)
    assert m is not None
    return m.group(1)


def test_scrypt_hash_roundtrip() -> None:
    h = hash_password("s3cret-pass")
    assert h.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-pass", h)
    assert not verify_password("s3cret-pasS", h)
    assert not verify_password("x", "garbage")
    assert hash_password("s3cret-pass") != h  # salted


@pytest.mark.parametrize("path", ["/", "/nodes", "/nodes/x", "/rollouts", "/rollouts/r1", "/schedules"])
def test_pages_redirect_to_login(client: TestClient, path: str) -> None:
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=")


@pytest.mark.parametrize("path", ["/ui/api/nodes", "/ui/api/overview", "/ui/events", "/metrics"])
def test_api_is_401(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthenticated"


def test_post_without_session_is_refused(client: TestClient) -> None:
    r = client.post("/rollouts/r1/pause", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_login_wrong_password_and_csrf(client: TestClient) -> None:
    assert login(client, "olga", "wrong password").status_code == 401
    assert login(client, "nobody").status_code == 401
    r = client.post("/login", data={"username": "olga", "password": PASSWORD, "csrf_token": "forged"})
    assert r.status_code == 403
    assert SESSION_COOKIE not in client.cookies


def test_login_then_pages(client: TestClient) -> None:
    r = login(client, "olga", next_="/nodes")
    assert r.status_code == 303 and r.headers["location"] == "/nodes"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax") and "Max-Age=" in cookie
    for path in ("/", "/nodes", "/rollouts", "/schedules"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert "olga" in page.text and "Content-Security-Policy" in page.headers


def test_open_redirect_refused(client: TestClient) -> None:
    r = login(client, "olga", next_="//evil.example/x")
    assert r.headers["location"] == "/"


@pytest.mark.parametrize("column", ["expires_at", "idle_expires_at"])
def test_session_expires(ctx: Any, store: Store, column: str) -> None:
    app = create_standalone_app(ctx, session_policy=SessionPolicy.of_seconds(60, 30))
    with TestClient(app) as c:
        r = login(c, "olga")
        assert r.status_code == 303 and "Max-Age=60" in r.headers["set-cookie"]  # the browser drops it then too
        assert c.get("/", follow_redirects=False).status_code == 200
        with store.session() as s:  # the row's end passes (as if the lifetime or the idle window ran out)
            s.execute(update(DashboardSession).values({column: utcnow() - dt.timedelta(seconds=1)}))
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_tampered_cookie_refused(client: TestClient) -> None:
    login(client, "olga")
    value = client.cookies[SESSION_COOKIE]
    client.cookies.set(SESSION_COOKIE, value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert client.get("/", follow_redirects=False).status_code == 303


def test_password_change_ends_sessions(client: TestClient, store: Store) -> None:
    login(client, "olga")
    assert client.get("/", follow_redirects=False).status_code == 200
    add_user(store, "olga", "operator", "another password", replace=True)
    assert client.get("/", follow_redirects=False).status_code == 303


def test_logout_needs_csrf(client: TestClient) -> None:
    login(client, "olga")
    assert client.post("/logout", data={"csrf_token": "nope"}).status_code == 403
    token = csrf_of(client)
    r = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


def test_a_copied_cookie_is_refused_after_logout(client: TestClient, store: Store) -> None:
    """The session is a row: logging out deletes it, so a copy of the cookie kept elsewhere stops working too."""
    login(client, "olga")
    copied = client.cookies[SESSION_COOKIE]
    with store.session() as s:
        [stored] = s.scalars(select(DashboardSession)).all()
        assert copied not in (stored.token_hash, str(stored.id))  # only a hash of the secret is kept
    client.post("/logout", data={"csrf_token": csrf_of(client)})
    client.cookies.set(SESSION_COOKIE, copied)
    assert client.get("/ui/api/overview").status_code == 401
    with store.session() as s:
        assert s.scalars(select(DashboardSession)).all() == []


def test_viewer_cannot_act(client: TestClient, store: Store, fleet: FleetThread) -> None:
    rid = start_rollout(fleet, add_nodes(fleet, 4), batch="2")
    login(client, "vic")
    page = client.get(f"/rollouts/{rid}")
    assert page.status_code == 200
    assert 'data-action="pause"' not in page.text and "viewer role" in page.text
    token = csrf_of(client)
    r = client.post(f"/rollouts/{rid}/pause", data={"csrf_token": token})
    assert r.status_code == 403 and "viewer" in r.text
    assert rollout_status(store, rid) == "running"


def test_operator_needs_csrf_then_pauses(client: TestClient, store: Store, fleet: FleetThread) -> None:
    rid = start_rollout(fleet, add_nodes(fleet, 4), batch="2")
    login(client, "olga")
    assert client.post(f"/rollouts/{rid}/pause", data={}).status_code == 403
    assert client.post(f"/rollouts/{rid}/pause", data={"csrf_token": "forged"}).status_code == 403
    token = csrf_of(client)
    r = client.post(f"/rollouts/{rid}/pause", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303
    assert rollout_status(store, rid) == "paused"
    # pausing twice: the service refuses, the page says why
    r = client.post(f"/rollouts/{rid}/pause", headers={"X-CSRF-Token": token, "Accept": "application/json"})
    assert r.status_code == 409 and "not running" in r.json()["message"]
    r = client.post(f"/rollouts/{rid}/resume", headers={"X-CSRF-Token": token, "Accept": "application/json"})
    assert r.status_code == 200 and r.json()["ok"]


def test_pagination_sort_filter_search(client: TestClient, store: Store, fleet: FleetThread) -> None:
    add_nodes(fleet, 120, offline=tuple(range(5, 120, 10)))
    login(client, "vic")
    r = client.get("/ui/api/nodes", params={"per_page": 50, "sort": "hostname"}).json()
    assert r["total"] == 120 and r["pages"] == 3 and len(r["nodes"]) == 50
    assert r["nodes"][0]["hostname"] == "sim-node-00000"
    last = client.get("/ui/api/nodes", params={"per_page": 50, "sort": "hostname", "page": 3}).json()
    assert len(last["nodes"]) == 20 and last["nodes"][-1]["hostname"] == "sim-node-00119"
    beyond = client.get("/ui/api/nodes", params={"per_page": 50, "page": 99}).json()
    assert beyond["page"] == 3
    desc = client.get("/ui/api/nodes", params={"sort": "hostname", "dir": "desc", "per_page": 5}).json()
    assert desc["nodes"][0]["hostname"] == "sim-node-00119"
    # failing nodes come first by default
    default = client.get("/ui/api/nodes", params={"per_page": 200}).json()["nodes"]
    ranks = [n["rank"] for n in default]
    assert ranks == sorted(ranks) and default[0]["status"] == "offline"
    offline = client.get("/ui/api/nodes", params={"status": "offline", "per_page": 200}).json()
    assert offline["total"] > 0 and all(n["status"] == "offline" for n in offline["nodes"])
    t4 = client.get("/ui/api/nodes", params={"gpu": "Tesla T4", "per_page": 200}).json()
    assert t4["total"] == 15 and all(n["gpu"] == "Tesla T4" for n in t4["nodes"])
    found = client.get("/ui/api/nodes", params={"q": "node-0004"}).json()
    assert found["total"] == 10
    weird = client.get("/ui/api/nodes", params={"q": "%_\\", "sort": "nope", "per_page": -3}).json()
    assert weird["total"] == 0 and weird["sort"] == "rank" and weird["per_page"] == 1
    html = client.get("/nodes", params={"status": "offline", "sort": "gpu"}).text
    assert "page 1 of" in html and "sim-node-" in html and "simulated" in html


def test_index_follows_facts_and_status(client: TestClient, store: Store, fleet: FleetThread) -> None:
    add_nodes(fleet, 3)
    login(client, "vic")
    client.get("/ui/api/nodes")
    with store.session() as s:
        node = s.scalars(select(Node).where(Node.hostname == "sim-node-00001")).one()
        facts = dict(node.facts)
        facts["flash_attn"] = {"version": "9.9.9", "variant": "fa2-wheel"}
        node.facts, node.facts_updated_at, node.status = facts, utcnow(), "degraded"
    rows = {n["hostname"]: n for n in client.get("/ui/api/nodes").json()["nodes"]}
    assert rows["sim-node-00001"]["fa_version"] == "9.9.9" and rows["sim-node-00001"]["status"] == "degraded"
    with store.session() as s:
        s.delete(s.scalars(select(Node).where(Node.hostname == "sim-node-00002")).one())
    assert client.get("/ui/api/nodes").json()["total"] == 2
    with store.session() as s:
        assert nodeindex.sync(s) == 0
        assert s.scalar(select(DashboardNode.rank).where(DashboardNode.hostname == "sim-node-00001")) == 0


def test_node_page_shows_diagnosis(client: TestClient, store: Store, fleet: FleetThread) -> None:
    hosts = add_nodes(fleet, 3)
    facts = load_profile(PROFILES[1], hosts[1])  # its driver was upgraded since it registered
    assert facts.driver is not None
    fleet.call(fleet.fleet.change_facts(hosts[1], dataclasses.replace(
        facts, driver=dataclasses.replace(facts.driver, version="999.1.2"))))
    for step in ("build-from-source", "install-wheel"):  # whichever its plan has first fails
        fleet.fleet.script(hosts[1], step, JobScript(error=f"{step} failed (rc 2)", log=CUDA_MISMATCH_LOG))
    rid = start_rollout(fleet, hosts, batch="2", max_failures="2")
    run_engine(fleet)
    fleet.call(fleet.fleet.wait_rollout(rid, "succeeded", "partial", "paused", "aborted"))
    login(client, "vic")
    page = client.get(f"/nodes/{hosts[1]}").text
    assert "nvcc_torch_cuda_major_mismatch" in page and "What to do" in page
    assert "driver.version" in page and "Current plan" in page and "runner_on_failed" in page
    detail = client.get(f"/ui/api/rollouts/{rid}").json()
    assert detail["status"] == "partial" and detail["failures"][0]["hostname"] == hosts[1]
    first = client.get("/ui/api/nodes", params={"per_page": 1}).json()["nodes"][0]
    assert first["hostname"] == hosts[1] and first["job_status"] == "failed" and first["rank"] == 0
    assert f"{first['job_kind']} failed" in client.get("/nodes", params={"status": "failing"}).text
    assert client.get("/nodes/no-such-host").status_code == 404


def test_sse_sends_snapshot(client: TestClient, fleet: FleetThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_app, "SSE_MAX_SECONDS", 0.5)
    monkeypatch.setattr(web_app, "SSE_POLL_SECONDS", 0.1)
    add_nodes(fleet, 5)
    login(client, "vic")
    with client.stream("GET", "/ui/events", params={"topic": "overview"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    assert "event: update" in body and '"total": 5' in body


def test_metrics(client: TestClient, ctx: Any, fleet: FleetThread) -> None:
    hosts = add_nodes(fleet, 6, profiles=("h100", "a100"))  # both install a released wheel
    for host in hosts:  # the canaries' installs never end: the rollout stays at its first batch
        fleet.fleet.script(host, "install-wheel", JobScript(hang=True))
    rid = start_rollout(fleet, hosts, batch="1,5")
    run_engine(fleet)
    st = fleet.call(fleet.fleet.wait_rollout(rid, until=lambda st: any(n["state"] == "install" for n in st["nodes"])))
    installing = sum(n["state"] == "install" for n in st["nodes"])  # the canaries: one per GPU model
    r = client.get("/metrics", headers={"Authorization": f"Bearer {ctx.admin_token}"})
    assert r.status_code == 200
    text = r.text
    assert 'fleet_nodes{status="online"}' in text
    assert f'fleet_rollout_nodes{{rollout="{rid}",state="install"}} {installing:.1f}' in text
    assert "fleet_node_last_heartbeat_timestamp_seconds" in text and "fleet_job_duration_seconds" in text
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_chart_svg() -> None:
    pts = [{"at": "2026-11-20T00:00:00+00:00", "tflops": 350.0, "sdpa_tflops": 300.0, "passed": True},
           {"at": "2026-11-21T00:00:00+00:00", "tflops": 120.0, "sdpa_tflops": 290.0, "passed": False}]
    med = [{"at": "2026-11-20T00:00:00+00:00", "tflops": 340.0}, {"at": "2026-11-21T00:00:00+00:00", "tflops": 345.0}]
    svg = web_app.chart_svg(pts, med)
    assert svg.startswith("<svg") and 'class="median"' in svg and 'class="fail"' in svg and 'class="sdpa"' in svg


def record_verifications(store: Store, hosts: list[str], *, days: int, broken: tuple[str, ...] = ()) -> None:
    """A daily simulated verification of each node, stored by verify_store as the controller does when a verify
    job finishes (``recorded_at``: that day on the controller's clock); ``broken`` nodes output NaN on the last
    two days (a correctness failure)."""
    import datetime as dt

    from fleetctl.agent.verify.simulated import SimFaults, simulate_verification
    from fleetctl.controller.verify_store import store as vs

    now = utcnow()
    with store.session() as s:
        gpus = {n.hostname: n.facts["gpus"][0]["name"] for n in s.scalars(select(Node).where(Node.hostname.in_(hosts)))}
        for host in hosts:
            for d in range(days, 0, -1):
                at = now - dt.timedelta(days=d - 1, hours=2)
                faults = SimFaults(nan=True) if host in broken and d <= 2 else None
                result = simulate_verification(gpus[host], node=host, at=at, faults=faults)
                vs.record(s, host, result, job_id=f"job-verify-{host}-{d}", recorded_at=at)


def test_verifications_flow_into_table_chart_and_metrics(client: TestClient, store: Store,
                                                          fleet: FleetThread) -> None:
    hosts = add_nodes(fleet, 16)
    record_verifications(store, hosts, days=4, broken=(hosts[0],))
    login(client, "vic")
    rows = {n["hostname"]: n for n in client.get("/ui/api/nodes", params={"per_page": 50}).json()["nodes"]}
    assert rows[hosts[0]]["verify_result"] == "failed" and rows[hosts[0]]["rank"] == 0
    assert rows[hosts[1]]["verify_result"] == "passed" and rows[hosts[1]]["verify_tflops"] > 0
    first = client.get("/ui/api/nodes", params={"per_page": 1}).json()["nodes"][0]
    assert first["hostname"] == hosts[0]  # failing first
    page = client.get(f"/nodes/{hosts[0]}").text
    assert '<svg class="chart"' in page and 'class="median"' in page and 'class="sdpa"' in page
    assert "NaN/Inf" in page and page.count("badge v-failed") >= 2  # its two failed days (no FA speed to chart)
    assert client.get("/ui/api/nodes", params={"verify": "failed"}).json()["total"] == 1
    text = client.get("/metrics").text
    assert 'fleet_verifications{gpu_model="NVIDIA H100 80GB HBM3",result="passed"}' in text
    assert "fleet_verification_tflops_median" in text


def test_schedules_page(client: TestClient, store: Store, fleet: FleetThread) -> None:
    import datetime as dt

    schedules = pytest.importorskip("fleetctl.controller.verify_store.schedules")
    hosts = add_nodes(fleet, 4)
    record_verifications(store, hosts, days=1, broken=(hosts[1],))
    sched = schedules.add_schedule(store, "0 3 * * *", "gpu=*H100*", mode="quick", actor="user:olga")
    run = schedules.claim(store, sched["id"], utcnow() - dt.timedelta(hours=1), "test")
    assert run is not None
    schedules.set_run_jobs(store, run, {h: f"job-verify-{h}-1" for h in hosts[:2]} | {"x": "job-pending"}, None)
    login(client, "vic")
    page = client.get("/schedules").text
    assert "0 3 * * *" in page and "gpu=*H100*" in page and "quick" in page
    assert "1 passed" in page and "1 failed" in page and "1 running" in page and hosts[1] in page


ABI_ERROR = ("ImportError: /venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
             "undefined symbol: _ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traits"
             "IcESaIcEEE")


def test_node_page_shows_verification_health(client: TestClient, store: Store, fleet: FleetThread) -> None:
    # a node whose flash-attn stopped importing: verify_store judges its verification and degrades the node with
    # the diagnosis of the import error and the resolver's re-plan on its facts; the page shows that
    hosts = fleet.call(fleet.fleet.add_nodes([load_profile("flash-attn-installed", "sim-node-00000"),
                                               load_profile("flash-attn-installed", "sim-node-00001")]))
    fleet.fleet.script(hosts[0], "verify", JobScript(import_error=ABI_ERROR))
    fleet.call(fleet.fleet.verify(hosts))
    login(client, "vic")
    page = client.get(f"/nodes/{hosts[0]}").text
    assert "degraded" in page and "flash_attn import failed" in page and "abi_mismatch_cxx11" in page
    assert "What to do: Pick the wheel whose cxx11abi tag" in page and "Re-plan on the current facts" in page
    assert "verify-health" not in client.get(f"/nodes/{hosts[1]}").text


def test_login_throttle(client: TestClient) -> None:
    for _ in range(5):
        assert login(client, "olga", "bad password").status_code == 401
    r = login(client, "olga")  # even the right password waits now
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert login(client, "vic").status_code == 303  # other users are not affected
