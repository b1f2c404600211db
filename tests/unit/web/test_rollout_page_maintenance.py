"""The rollout page shows the maintenance policy's state — awaiting approval (with an Approve button for operators),
a maintenance window that is closed, who approved — and never a webhook's full URL (it may carry a secret)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import FleetThread
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user

PASSWORD = "correct horse battery"
SECRET_HOOK = "https://hooks.example.com/services/T000/B000/s3cr3t-token"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    with FleetThread(state_dir=tmp_path / "controller") as ft:
        add_user(ft.fleet.ctx.store, "olga", "operator", PASSWORD)
        ft.call(ft.fleet.add_nodes(load_profile("a100", f"a100-{i}") for i in range(3)))
        yield ft


def login(c: TestClient) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
    assert token is not None
    r = c.post("/login", data={"username": "olga", "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
               follow_redirects=False)
    assert r.status_code == 303
    csrf = re.search(r'data-csrf="([^"]+)"', c.get("/").text)
    assert csrf is not None
    return csrf.group(1)


def test_awaiting_approval_approve_button_and_no_webhook_secret(fleet: FleetThread) -> None:
    rid = fleet.call(fleet.fleet.start_rollout(RolloutRequest(nodes="a100-*", canary=1, batch="100%",
                                                              pause_after_canary=True,
                                                              notify_webhooks=(SECRET_HOOK,))))
    fleet.call(fleet.fleet.start_engine())
    fleet.call(fleet.fleet.wait_rollout(rid, "awaiting-approval"))
    with TestClient(create_standalone_app(fleet.fleet.ctx)) as c:
        csrf = login(c)
        page = c.get(f"/rollouts/{rid}").text
        assert 'id="rollout-approval">Awaiting approval: canary batch finished: 1 done, 0 failed' in page
        assert 'data-action="approve"' in page
        assert "s3cr3t" not in page and "s3cr3t" not in c.get(f"/ui/api/rollouts/{rid}").text
        r = c.post(f"/rollouts/{rid}/approve", data={"csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303 and "approve+requested+by+user%3Aolga" in r.headers["location"]
        st = fleet.call(fleet.fleet.wait_rollout(rid, "succeeded"))
        assert st["approval"]["approved_by"] == "user:olga"
        assert "s3cr3t" not in str(st)
        page = c.get(f"/rollouts/{rid}").text
        assert 'id="rollout-approved">Canary batch approved by user:olga' in page
        assert 'data-action="approve"' not in page  # only while it awaits approval


def test_a_closed_window_shows_when_it_opens(fleet: FleetThread) -> None:
    day = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3)).strftime("%a")
    rid = fleet.call(fleet.fleet.start_rollout(RolloutRequest(nodes="a100-*", canary=0,
                                                              windows=(f"{day} 00:00-01:00",))))
    fleet.call(fleet.fleet.start_engine())
    fleet.call(fleet.fleet.wait_rollout(rid, until=lambda st: bool(st["waiting"])))
    with TestClient(create_standalone_app(fleet.fleet.ctx)) as c:
        login(c)
        page = c.get(f"/rollouts/{rid}").text
        assert re.search(r'id="rollout-hold">waiting for window \(opens in \dd\d+h\): ' + day, page), page
