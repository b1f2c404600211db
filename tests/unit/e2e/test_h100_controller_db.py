"""The real H100 run's controller database (tests/fixtures/h100_e2e/controller.db.gz, a SQLite backup taken by
``scripts/device/e2e.sh collect``) opened by today's store, planner and dashboard.

It keeps three promises: a database a real controller wrote stays readable (migrations to head), it says what
the JSON the CLI printed on the device says, and every controller-side view plans the wheel rollout #1 built
(the rollout planner, the dashboard's current plan and the re-plan after a failed verification share one
catalog, ``controller.local_wheels.controller_catalog``).
"""

from __future__ import annotations

import copy
import gzip
import re
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from fleetctl.controller.local_wheels import catalog_wheel_name, controller_catalog
from fleetctl.controller.registry import record_of
from fleetctl.controller.rollout.service import RolloutRequest, get_status, node_rollouts, plan_rollout
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.store.models import Job, JobEvent, Node
from fleetctl.controller.verify_store import store as vs
from fleetctl.controller.verify_store.models import Verification
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user
from fleetctl.controller.web.sources import plan_for
from fleetctl.fleet.facts import parse_node
from tests.e2e_fixtures import FIXTURES, read

D = FIXTURES / "h100_e2e"
PASSWORD = "correct horse battery"
pytestmark = pytest.mark.skipif(not (D / "controller.db.gz").is_file(), reason="no real H100 run committed")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = tmp_path / "controller.db"
    with gzip.open(D / "controller.db.gz") as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    st = open_store(f"sqlite:///{db}")
    yield st
    st.close()


def test_the_database_says_what_the_cli_printed(store: Store) -> None:
    for name in ("rollout_status.json", "rollout2_status.json"):
        printed = read(D, name)
        now = get_status(store, printed["id"])
        for key in ("status", "version", "builds", "transitions", "counts"):
            assert now[key] == printed[key], (name, key)
        assert [(n["hostname"], n["variant"], n["state"]) for n in now["nodes"]] == \
            [(n["hostname"], n["variant"], n["state"]) for n in printed["nodes"]]
    node, facts = read(D, "node.json"), read(D, "facts.json")
    with store.session() as s:
        row = s.scalars(select(Node)).one()
        assert (row.hostname, row.simulated, row.facts) == (node["hostname"], False, facts)
        for p in (D / "jobs").glob("*.json"):
            job = read(D, f"jobs/{p.name}")
            stored = s.get(Job, job["id"])
            assert stored is not None and stored.status == job["status"] == "successful"
            n = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job["id"]))
            assert n == len(job["events"])
        rows = list(s.scalars(select(Verification).order_by(Verification.recorded_at)))
    assert [(r.mode, r.passed, r.simulated) for r in rows] == [("full", True, False), ("quick", True, False)]
    assert rows[0].duration_s == pytest.approx(read(D, "verification.json")["duration_s"], abs=0.01)
    with store.session() as s:  # what `fleetctl node vm` lists under rollouts
        mine = node_rollouts(s, "vm")
    assert [(r["rollout_id"], r["variant"], r["state"], r["rollout_status"]) for r in mine] == [
        (read(D, n)["id"], v, "done", "succeeded")
        for n, v in (("rollout2_status.json", "fa2-wheel"), ("rollout_status.json", "fa2-source"))]


def test_every_view_plans_the_wheel_rollout_1_built(store: Store, tmp_path: Path) -> None:
    build = read(D, "rollout_status.json")["builds"][0]
    with store.session() as s:
        facts = copy.deepcopy(s.scalars(select(Node)).one().facts)
    # installed: the dashboard's current plan is the built wheel, only verify
    with store.session() as s:
        shown = plan_for(s, record_of(s.scalars(select(Node)).one()), tmp_path)
    assert shown["variant"] == "fa2-wheel" and shown["steps"] == ["verify"], shown["reasons"]
    assert "(from artifact-store)" in shown["reasons"][0]
    # uninstalled (what rollout #2 saw): the rollout planner and the re-plan agree on install, no build
    facts["flash_attn"] = None
    with store.session() as s:
        (node,) = s.scalars(select(Node)).all()
        node.facts = facts
    (planned,) = plan_rollout(store, RolloutRequest(version="2.8.3.post1", nodes="vm"), state_dir=tmp_path).nodes
    assert planned.plan.variant == "fa2-wheel" and planned.plan.steps == ("install-wheel", "verify")
    assert planned.to_json()["artifact_sha256"] == build["artifact_sha256"]
    with store.session() as s:
        replanned = vs.replan(parse_node(facts), controller_catalog(s, tmp_path))
    assert replanned["variant"] == "fa2-wheel"
    assert replanned["artifact"] == catalog_wheel_name(parse_node(facts), "2.8.3.post1")


def test_the_dashboard_shows_the_real_node_done(store: Store, tmp_path: Path) -> None:
    add_user(store, "olga", "viewer", PASSWORD)
    ctx = types.SimpleNamespace(store=store, state_dir=tmp_path, admin_token="admintoken123")
    with TestClient(create_standalone_app(ctx)) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        c.post("/login", data={"username": "olga", "password": PASSWORD, "csrf_token": token.group(1), "next": "/"})
        node = c.get("/nodes/vm")
        assert node.status_code == 200
        text = node.text
        assert "NVIDIA H100 80GB HBM3" in text and "2.11.0+cu130" in text and "simulated" not in text.lower()
        assert "fa2-wheel" in text and "build-from-source" in text and "install-wheel" in text
        assert "passed" in text
        section = text[text.index('id="node-rollouts"'):text.index('id="verifications"')]
        for name in ("rollout2_status.json", "rollout_status.json"):  # newest first, this node done in each
            r = read(D, name)
            assert r["id"] in section and r["nodes"][0]["variant"] in section
        first, second = (read(D, n)["id"] for n in ("rollout_status.json", "rollout2_status.json"))
        assert section.index(second) < section.index(first)
        assert section.count('class="badge st-done"') == 2 and section.count('class="badge st-succeeded"') == 2
        for name in ("rollout_status.json", "rollout2_status.json"):
            r = read(D, name)
            page = c.get(f"/rollouts/{r['id']}")
            assert page.status_code == 200 and r["nodes"][0]["variant"] in page.text and "succeeded" in page.text
