"""Replay issue 8's end-to-end fixtures (tests/e2e_fixtures.py: layout) through the controller's store, the
verification store, the planner and the dashboard, so the shapes of a real H100 run stay supported.

Parametrized over every ``tests/fixtures/h100_e2e*`` directory: ``h100_e2e_rehearsal`` (made on a machine
without a GPU by tests/integration/e2e/test_rehearsal.py: meta.json ``simulated: true``, verification fails
there) and ``h100_e2e`` once the real run's files are dropped in (then rollout #1 must end ``succeeded`` with
the node ``done`` and a passing verification).
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetctl.controller.local_wheels import catalog_wheel_name
from fleetctl.controller.rollout.models import Build
from fleetctl.controller.rollout.service import RolloutRequest, get_status, plan_rollout
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import Artifact, ArtifactProvenance, Node
from fleetctl.controller.verify_store import store as vs
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user
from fleetctl.fleet.facts import parse_node
from fleetctl.fleet.verification import parse_result
from tests.e2e_fixtures import fixture_dirs, load_into, read

DIRS = fixture_dirs()
PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    yield st
    st.close()


def test_there_is_at_least_the_rehearsal() -> None:
    assert any(d.name == "h100_e2e_rehearsal" for d in DIRS)


@pytest.mark.parametrize("d", DIRS, ids=[d.name for d in DIRS])
def test_fixture_shapes(d: Path) -> None:
    meta = read(d, "meta.json")
    real = not meta["simulated"]
    assert d.name != "h100_e2e" or real, "tests/fixtures/h100_e2e holds the real run only"
    facts = parse_node(read(d, "facts.json"))
    assert facts.gpus and facts.gpus[0].compute_capability == "9.0"
    r1 = read(d, "rollout_status.json")
    (n1,) = r1["nodes"]
    assert n1["variant"] == "fa2-source"
    (b,) = r1["builds"]
    assert b["status"] == "succeeded" and re.fullmatch(r"[0-9a-f]{64}", b["artifact_sha256"])
    assert b["artifact_filename"].startswith(f"flash_attn-{r1['version']}-cp")  # pip's name, no local tag
    assert "archs=90" in b["build_key"]
    jobs = {j["id"]: j for j in (read(d, f"jobs/{p.name}") for p in (d / "jobs").glob("*.json"))}
    build_jobs = [j for j in jobs.values() if j["kind"] == "build-from-source"]
    assert len(build_jobs) == 1, "one build for both rollouts"
    bj = build_jobs[0]
    assert bj["status"] == "successful" and bj["result"]["built_wheel"]["artifact_sha256"] == b["artifact_sha256"]
    assert bj["vars"]["cuda_archs"] == "90" and int(bj["vars"]["max_jobs"]) >= 1
    assert bj["timeout_seconds"] >= 45 * 60
    v = parse_result(read(d, "verification.json"))
    if real:
        assert r1["status"] == "succeeded" and n1["state"] == "done", n1["cause"]
        assert v.passed and v.flash_attn.version == r1["version"] and not v.simulated
        assert facts.torch is not None and facts.torch.cuda is not None
    else:
        assert n1["state"] == "failed" and n1["cause"].startswith("verification failed")
    if (d / "rollout2_status.json").is_file():
        r2 = read(d, "rollout2_status.json")
        (n2,) = r2["nodes"]
        assert n2["variant"] == "fa2-wheel" and n2["build_key"] is None
        assert "build" not in [t["to"] for t in r2["transitions"]]
        iw = [j for j in jobs.values() if j["kind"] == "install-wheel"]
        assert iw and iw[-1]["vars"]["wheel_sha256"] == b["artifact_sha256"]
        if real:
            assert r2["status"] == "succeeded" and n2["state"] == "done", n2["cause"]
            took = (_t(r2["finished_at"]) - _t(r2["created_at"])).total_seconds()
            assert took < 60, f"rollout #2 took {took:.0f} s"


def _t(s: str) -> Any:
    import datetime as dt

    return dt.datetime.fromisoformat(s)


def _login(c: TestClient) -> None:
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    r = c.post("/login", data={"username": "olga", "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
               follow_redirects=False)
    assert r.status_code == 303


@pytest.mark.parametrize("d", DIRS, ids=[d.name for d in DIRS])
def test_replay_through_store_planner_and_dashboard(d: Path, store: Store, tmp_path: Path) -> None:
    loaded = load_into(store, d)
    host = loaded["node"]["hostname"]
    meta = read(d, "meta.json")
    r1 = loaded["rollouts"][0]
    # the controller's own views read it back
    st = get_status(store, r1["id"])
    assert st["nodes"][0]["variant"] == "fa2-source" and st["builds"][0]["status"] == "succeeded"
    # the verification, judged and stored like a live one
    verify_job = next(j for j in sorted(loaded["jobs"], key=lambda j: j["created_at"]) if j["kind"] == "verify")
    with store.session() as s:
        row = vs.record(s, host, parse_result(read(d, "verification.json")), job_id=verify_job["id"],
                        trigger="rollout", facts=parse_node(loaded["facts"]))
        assert row.passed is (not meta["simulated"])
    # a later rollout on this store picks the wheel rollout #1 built (facts without flash-attn, as after uninstall)
    version = r1["version"]
    with store.session() as s:
        node = s.query(Node).filter_by(hostname=host).one()
        facts = copy.deepcopy(node.facts)
        facts["flash_attn"] = None
        node.facts = facts
        b = s.get(Build, r1["builds"][0]["build_key"])
        assert b is not None
        b.params = {"wheel_name": catalog_wheel_name(parse_node(facts), version), "cuda_archs": ["90"],
                    "glibc": facts["os"]["glibc"]}
        s.add(Artifact(sha256=b.artifact_sha256, filename=b.artifact_filename, kind="wheel", size=1,
                       created=utcnow()))
        # uploaded by that build's own job (an agent's upload of anything else never enters the catalog)
        s.add(ArtifactProvenance(sha256=b.artifact_sha256, source="build", ref=str(b.job_id or "build-job"),
                                 detail={"build_key": b.build_key, "node": host}, created=utcnow()))
    (p,) = plan_rollout(store, RolloutRequest(version=version, nodes=host)).nodes
    assert p.plan.variant == "fa2-wheel" and p.to_json()["artifact_sha256"] == r1["builds"][0]["artifact_sha256"]
    # the dashboard shows the node, its rollouts and the simulated label when it was a rehearsal
    add_user(store, "olga", "operator", PASSWORD)
    ctx = types.SimpleNamespace(store=store, state_dir=tmp_path, admin_token="admintoken123")
    with TestClient(create_standalone_app(ctx)) as c:
        _login(c)
        page = c.get(f"/nodes/{host}")
        assert page.status_code == 200 and host in page.text
        if meta["simulated"]:
            assert "simulated" in page.text.lower()
        for r in loaded["rollouts"]:
            rp = c.get(f"/rollouts/{r['id']}")
            assert rp.status_code == 200 and host in rp.text and r["nodes"][0]["variant"] in rp.text
        assert r1["id"] in c.get("/rollouts").text
