"""User labels on nodes and label selectors against a real controller (SQLite, real HTTP socket): ``fleetctl label``,
``-l`` on the commands that take nodes, the registry's ``labels_of``/``select``, the audit row, bad input refused
with nothing changed."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.audit import entries
from fleetctl.controller.cli import main as fleetctl_main
from fleetctl.controller.labels import parse_label_changes
from fleetctl.controller.rollout.core import selection_text
from fleetctl.controller.store.models import NodeLabel
from fleetctl.controller.web.auth import add_user
from tests.integration.fleet_support import controller_settings
from tests.unit.controller_core.util import add_identity, facts

pytestmark = pytest.mark.timeout(120)


@pytest_asyncio.fixture
async def labelled(tmp_path: Path) -> AsyncIterator[RunningController]:
    """A controller with nodes a, b, c registered (no agents: the registry is all these commands need)."""
    rc = await start_controller(controller_settings(tmp_path / "controller"))
    try:
        for host in ("a", "b", "c"):
            rc.ctx.registry.report_facts(add_identity(rc.ctx.store, host), facts(host))
        yield rc
    finally:
        await rc.stop(grace=0.2)


async def fleetctl(rc: RunningController, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(fleetctl_main, [*argv, "--state-dir", str(rc.ctx.settings.state_dir)])
    out, err = capsys.readouterr()
    return code, out, err


async def hosts(rc: RunningController, capsys: pytest.CaptureFixture[str], selector: str) -> list[str]:
    code, out, err = await fleetctl(rc, capsys, "nodes", "-l", selector, "-o", "json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return [n["hostname"] for n in data["nodes"]]


async def test_label_set_select_show_and_remove(labelled: RunningController,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = labelled
    for host, changes in (("a", ["env=prod", "zone=x", "example.com/rack=r12"]), ("b", ["env=dev"]),
                          ("c", ["env=prod", "canary="])):
        code, out, err = await fleetctl(rc, capsys, "label", host, *changes)
        assert code == 0, err
        assert out.startswith(f"{host}: ")
    assert await hosts(rc, capsys, "env=prod") == ["a", "c"]
    assert await hosts(rc, capsys, "env!=prod") == ["b"]
    assert await hosts(rc, capsys, "env in (prod,dev),!canary") == ["a", "b"]
    assert await hosts(rc, capsys, "env notin (dev),zone") == ["a"]
    assert await hosts(rc, capsys, "example.com/rack=r12") == ["a"]
    assert await hosts(rc, capsys, "env=test") == []  # listing: an empty answer, not an error
    assert rc.ctx.registry.labels_of("a") == {"env": "prod", "example.com/rack": "r12", "zone": "x"}
    assert [r.hostname for r in rc.ctx.registry.select("canary")] == ["c"]

    code, out, _ = await fleetctl(rc, capsys, "nodes", "-o", "wide")
    header, *rows = out.splitlines()
    assert "LABELS" in header
    assert "env=prod,example.com/rack=r12,zone=x" in next(r for r in rows if r.startswith("a "))
    code, out, _ = await fleetctl(rc, capsys, "node", "c")
    assert "  labels      canary=, env=prod" in out

    code, out, err = await fleetctl(rc, capsys, "label", "a", "zone-", "env=staging", "never-set-")
    assert code == 0, err
    assert rc.ctx.registry.labels_of("a") == {"env": "staging", "example.com/rack": "r12"}
    with rc.ctx.store.session() as s:
        audited = [e for e in entries(s, limit=50, newest_first=True) if e.action == "node.label"]
    assert audited[0].target == "a" and audited[0].detail["removed"] == ["zone", "never-set"]
    assert len(audited) == 4


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["label", "a", "bad key=1"], 2, "bad label"),
    (["label", "a", "env=x y"], 2, "not a name"),
    (["label", "a", "env"], 2, "neither KEY=VALUE nor KEY-"),
    (["label", "nosuch", "env=x"], 4, "no node named 'nosuch'"),
    (["nodes", "-l", "env in (a"], 2, "unclosed '('"),
    (["nodes", "-l", "Env_/x=1"], 2, "label selector"),
])
async def test_bad_labels_and_selectors_refused_and_nothing_changes(
        labelled: RunningController, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, says: str) -> None:
    rc = labelled
    assert (await fleetctl(rc, capsys, "label", "a", "env=prod"))[0] == 0
    got, _, err = await fleetctl(rc, capsys, *argv)
    assert got == code
    assert says in err and "hint:" in err
    assert rc.ctx.registry.labels_of("a") == {"env": "prod"}


async def test_the_server_refuses_bad_labels_a_client_did_not_check(labelled: RunningController) -> None:
    """The API validates with the same parser: a client that skipped the check changes nothing."""
    from fleetctl.controller.client import ControllerClient
    from fleetctl.fleet.errors import UsageError

    client = ControllerClient.discover(state_dir=labelled.ctx.settings.state_dir)
    with pytest.raises(UsageError, match="bad label"):
        await asyncio.to_thread(client.post, "/nodes/a/labels", {"set": {"ok": "1", "bad key": "1"}, "remove": []})
    with labelled.ctx.store.session() as s:
        assert list(s.scalars(select(NodeLabel))) == []
    with pytest.raises(UsageError, match="unclosed"):  # selectors too: the controller parses what it is sent
        await asyncio.to_thread(client.get, "/nodes", selector="env in (a")


async def test_selectors_reach_verify_schedules_and_rollout_plans(labelled: RunningController,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = labelled
    for host in ("a", "c"):
        assert (await fleetctl(rc, capsys, "label", host, "env=prod"))[0] == 0
    # verification: the service's node choice (one owner of selection: rollout.core over the registry's labels)
    assert await asyncio.to_thread(rc.ctx.verification.select, (), selection_text(None, "env=prod")) == ["a", "c"]
    assert await asyncio.to_thread(rc.ctx.verification.select, (), selection_text("a,b", "env=prod")) == ["a"]
    # schedules store the whole selection and show it
    code, out, err = await fleetctl(rc, capsys, "schedule", "add", "0 3 * * *", "-l", "env=prod", "--quick")
    assert code == 0, err
    assert "on all -l env=prod" in out
    # a rollout's dry run plans exactly the selected nodes
    code, out, err = await fleetctl(rc, capsys, "rollout", "flash-attn", "--dry-run", "-l", "env=prod", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert sorted(n["hostname"] for n in plan["nodes"]) == ["a", "c"] and plan["selector"] == "all -l env=prod"
    code, _, err = await fleetctl(rc, capsys, "rollout", "flash-attn", "--dry-run", "-l", "env=nowhere")
    assert code == 2 and "matches no node" in err


async def test_the_dashboard_node_page_shows_labels_over_https(tmp_path: Path) -> None:
    """The dashboard as a browser sees it: HTTPS verified with the controller's CA, a Secure session cookie, the
    node page's labels line."""
    rc = await start_controller(controller_settings(tmp_path / "controller", http_insecure=False))
    try:
        rc.ctx.registry.report_facts(add_identity(rc.ctx.store, "a"), facts("a"))
        rc.ctx.registry.set_labels("a", parse_label_changes(["env=prod", "example.com/rack=r12"]), "admin")
        add_user(rc.ctx.store, "olga", "viewer", "password-123")
        assert rc.ctx.http_url and rc.ctx.http_url.startswith("https://")
        verify = ssl.create_default_context(cafile=rc.ctx.settings.state_dir / "ca" / "ca.pem")
        async with httpx.AsyncClient(base_url=rc.ctx.http_url, verify=verify) as client:
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', (await client.get("/login")).text)
            assert csrf is not None
            login = await client.post("/login", data={"username": "olga", "password": "password-123",
                                                      "csrf_token": csrf.group(1)})
            assert login.status_code == 303
            session_cookie = next(c for c in login.headers.get_list("set-cookie") if "session" in c.lower())
            assert "secure" in session_cookie.lower() and "httponly" in session_cookie.lower()
            page = await client.get("/nodes/a")
        assert page.status_code == 200, page.text[:300]
        line = next(x for x in page.text.splitlines() if 'id="node-labels"' in x)
        assert "<code>env=prod</code>" in line and "<code>example.com/rack=r12</code>" in line
    finally:
        await rc.stop(grace=0.2)
