"""The dashboard's SQL on both backends (SQLite and PostgreSQL): index sync, node table queries,
verification import, rollout detail, login."""

from __future__ import annotations

import re
import types

from fastapi.testclient import TestClient
from sqlalchemy import select

from controller.store.db import open_store, utcnow
from controller.store.models import Node
from controller.web import create_standalone_app, nodeindex, sample, verifications
from controller.web.auth import add_user


def test_dashboard_on_backend(db_url: str) -> None:
    store = open_store(db_url)
    try:
        hosts = sample.populate(store, 300, offline=0.1, degraded=0.05)
        sample.add_verifications(store, hosts[:50], days=3, regress=(hosts[20],))
        ro = sample.ScriptedRollout(store, hosts[:9], rollout_id="r-db", batch=4, fail=(hosts[3],))
        while ro.tick():
            pass
        with store.session() as s:
            assert nodeindex.sync(s) >= 300
            verifications.sync(s, force=True)
            page = nodeindex.query_nodes(s, nodeindex.NodeQuery(sort="torch", dir="desc", per_page=25, page=3))
            assert page.total == 300 and len(page.rows) == 25
            failing = nodeindex.query_nodes(s, nodeindex.NodeQuery(status="failing", per_page=200))
            assert hosts[20] in {r["hostname"] for r in failing.rows}
            q = nodeindex.query_nodes(s, nodeindex.NodeQuery(q="50%_", per_page=5))
            assert q.total == 0
            ov = nodeindex.overview(s)
            assert ov["total"] == 300 and ov["by_verify"]["failed"] >= 1
            assert verifications.fleet_median(s, "NVIDIA H100 80GB HBM3", simulated=True)
        with store.session() as s:
            node = s.scalars(select(Node).where(Node.hostname == hosts[0])).one()
            node.status, node.status_changed_at = "offline", utcnow()
        with store.session() as s:
            assert nodeindex.sync(s) == 1
        add_user(store, "olga", "operator", "password-123")
        with TestClient(create_standalone_app(types.SimpleNamespace(store=store))) as c:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
            assert token is not None
            c.post("/login", data={"username": "olga", "password": "password-123", "csrf_token": token.group(1)})
            detail = c.get("/ui/api/rollouts/r-db").json()
            assert detail["status"] == "partial" and detail["failures"][0]["hostname"] == hosts[3]
            assert c.get(f"/nodes/{hosts[20]}").status_code == 200
            assert 'fleet_nodes{status="offline"}' in c.get("/metrics").text
    finally:
        store.close()
