"""The dashboard's SQL on both backends (SQLite and PostgreSQL): index sync, node table queries,
verifications, rollout detail, login — over a real controller with fake agents (controller.testing)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import CUDA_MISMATCH_LOG, FleetThread, JobScript
from fleetctl.controller.verify_store import views
from fleetctl.controller.web import create_standalone_app, nodeindex
from fleetctl.controller.web.auth import add_user

PROFILES = ("h100", "a100", "l40s", "t4", "rtx4090", "a10", "l4", "h200")


def test_dashboard_on_backend(db_url: str, tmp_path: Path) -> None:
    with FleetThread(state_dir=tmp_path / "controller", db_url=db_url) as ft:
        fleet, store = ft.fleet, ft.fleet.ctx.store
        hosts = ft.call(fleet.add_nodes(load_profile(PROFILES[i % len(PROFILES)], f"sim-node-{i:05d}")
                                        for i in range(300)))
        for host in hosts[::10]:
            ft.call(fleet.set_offline(host))
        fleet.script(hosts[21], "verify", JobScript(error="verification did not finish within 300 s"))
        ft.call(fleet.verify(hosts[11:20] + hosts[21:30]))
        for step in ("build-from-source", "install-wheel"):  # not a canary (hosts[1] is the A100s'): no pause
            fleet.script(hosts[9], step, JobScript(error=f"{step} failed (rc 2)", log=CUDA_MISMATCH_LOG))
        rid = ft.call(fleet.start_rollout(RolloutRequest(nodes=",".join(hosts[1:10]), batch="4", max_failures="2")))
        ft.call(fleet.start_engine())
        ft.call(fleet.wait_rollout(rid, "succeeded", "partial", "paused", "aborted"))
        with store.session() as s:
            assert nodeindex.sync(s) >= 300
            page = nodeindex.query_nodes(s, nodeindex.NodeQuery(sort="torch", dir="desc", per_page=25, page=3))
            assert page.total == 300 and len(page.rows) == 25
            failing = nodeindex.query_nodes(s, nodeindex.NodeQuery(status="failing", per_page=200))
            assert {hosts[21], hosts[9], hosts[0]} <= {r["hostname"] for r in failing.rows}
            q = nodeindex.query_nodes(s, nodeindex.NodeQuery(q="50%_", per_page=5))
            assert q.total == 0
            ov = nodeindex.overview(s)
            assert ov["total"] == 300 and ov["by_verify"]["failed"] >= 1
            assert views.fleet_median(s, "NVIDIA H100 80GB HBM3", simulated=True)
        ft.call(fleet.set_offline(hosts[1]))
        with store.session() as s:
            assert nodeindex.sync(s) == 1
        add_user(store, "olga", "operator", "password-123")
        with TestClient(create_standalone_app(fleet.ctx)) as c:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
            assert token is not None
            c.post("/login", data={"username": "olga", "password": "password-123", "csrf_token": token.group(1)})
            detail = c.get(f"/ui/api/rollouts/{rid}").json()
            assert detail["status"] == "partial" and detail["failures"][0]["hostname"] == hosts[9]
            assert c.get(f"/nodes/{hosts[21]}").status_code == 200
            assert 'fleet_nodes{status="offline"}' in c.get("/metrics").text
