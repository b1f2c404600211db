"""A node whose clock runs an hour ahead still shows its verification everywhere (issue 14), and does not hide a
later verification of a normal node: the controller's clock orders results, the agent's is shown as skew.

Real SQLite store, results recorded by verify_store as the controller does when a verify job finishes, the real
dashboard app through its test client."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetctl.agent.verify.simulated import simulate_verification
from fleetctl.controller.store.db import Store, open_store, utcnow
from fleetctl.controller.store.models import Node
from fleetctl.controller.verify_store import store as vs
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user

H100 = "NVIDIA H100 80GB HBM3"
PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path / 'controller.db'}")
    add_user(st, "vic", "viewer", PASSWORD)
    now = utcnow()
    with st.session() as s:
        for host in ("ahead", "normal"):
            s.add(Node(hostname=host, status="online", simulated=False, registered_at=now, facts_updated_at=now,
                       last_seen=now, extra={}, facts={"hostname": host, "gpus": [{"name": H100}],
                                                       "flash_attn": {"version": "2.8.3", "variant": "fa2-wheel"}}))
    yield st
    st.close()


@pytest.fixture
def client(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    import types

    from fleetctl.controller.web import nodeindex

    monkeypatch.setattr(nodeindex, "SYNC_EVERY_SECONDS", 0.0)  # each request sees what was stored before it

    ctx = types.SimpleNamespace(store=store, state_dir=tmp_path, admin_token="admintoken123")
    with TestClient(create_standalone_app(ctx)) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        c.post("/login", data={"username": "vic", "password": PASSWORD, "csrf_token": token.group(1), "next": "/"})
        yield c


def verified(store: Store, host: str, *, clock_ahead: dt.timedelta, job_id: str) -> None:
    """The agent measured on its own clock (``ahead`` of the controller's); the controller stores it now."""
    result = simulate_verification(H100, node=host, at=utcnow() + clock_ahead)
    with store.session() as s:
        vs.record(s, host, result, job_id=job_id)


def nodes(client: TestClient) -> dict[str, Any]:
    return {n["hostname"]: n for n in client.get("/ui/api/nodes", params={"per_page": 50}).json()["nodes"]}


def test_a_node_with_its_clock_an_hour_ahead_shows_its_verification(client: TestClient, store: Store) -> None:
    verified(store, "ahead", clock_ahead=dt.timedelta(hours=1), job_id="job-ahead")
    verified(store, "normal", clock_ahead=dt.timedelta(0), job_id="job-normal-1")
    overview = client.get("/ui/api/overview").json()
    by_verify = overview.get("overview", overview)["by_verify"]
    assert by_verify.get("passed") == 2 and "never" not in by_verify
    rows = nodes(client)
    assert rows["ahead"]["verify_result"] == "passed" and rows["normal"]["verify_result"] == "passed"
    # the table's time is the controller's: not an hour in the future
    ahead_at = dt.datetime.fromisoformat(rows["ahead"]["verify_at"])
    assert ahead_at.replace(tzinfo=ahead_at.tzinfo or dt.UTC) <= utcnow()
    page = client.get("/nodes/ahead").text
    assert 'id="clock-skew"' in page and re.search(r"clock is (59|60|61) min ahead relative to the controller", page)
    assert not re.search(r">in \d+ (s|min|h)<", page)  # no result "in 59 min"
    assert 'id="clock-skew"' not in client.get("/nodes/normal").text
    text = client.get("/metrics").text
    assert f'fleet_verifications{{gpu_model="{H100}",result="passed"}} 2.0' in text
    assert f'fleet_verification_tflops_median{{gpu_model="{H100}"}}' in text


def test_a_clock_ahead_does_not_hide_a_later_verification_of_a_normal_node(client: TestClient,
                                                                          store: Store) -> None:
    verified(store, "normal", clock_ahead=dt.timedelta(0), job_id="job-normal-1")
    verified(store, "ahead", clock_ahead=dt.timedelta(hours=1), job_id="job-ahead")
    assert nodes(client)["normal"]["verify_result"] == "passed"
    # the normal node fails later (on both clocks, earlier than the ahead node's agent time)
    from fleetctl.agent.verify.simulated import SimFaults

    result = simulate_verification(H100, node="normal", at=utcnow(), faults=SimFaults(nan=True))
    with store.session() as s:
        vs.record(s, "normal", result, job_id="job-normal-2")
    rows = nodes(client)
    assert rows["normal"]["verify_result"] == "failed" and rows["normal"]["rank"] == 0
    assert 'fleet_verifications{gpu_model="NVIDIA H100 80GB HBM3",result="failed"} 1.0' in client.get("/metrics").text
