"""fleetctl's conventions against a live controller with real agents: the agents' versions arrive over gRPC and
show in `nodes -o wide` and `node`; -o yaml/json; global options before the subcommand; `version` asks the
controller."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import yaml

from fleetctl.controller.app import RunningController
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.web.auth import add_user
from fleetctl.fleet.version import package_version
from tests.integration.fleet_support import SimAgents

pytestmark = pytest.mark.timeout(60)


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(fleetctl, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_agent_versions_and_output_formats(controller: RunningController, fleet: SimAgents,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = str(controller.ctx.settings.state_dir)
    await fleet.start("sim-h100-01", "h100")
    await fleet.start("sim-t4-02", "t4")
    rc, out, _ = await _cli(capsys, "--state-dir", state, "nodes", "-o", "wide")  # global option first
    assert rc == 0
    header, *rows = out.splitlines()
    assert {"AGENT", "VERIFICATION", "LABELS"} <= set(header.split())  # wide's columns (labels: test_node_labels)
    assert all(package_version() in row for row in rows[:2])
    rc, out, _ = await _cli(capsys, "nodes", "--state-dir", state)  # the plain table has no agent column
    assert rc == 0 and "AGENT" not in out.splitlines()[0]
    rc, out, _ = await _cli(capsys, "--state-dir", state, "nodes", "-o", "yaml")
    nodes = yaml.safe_load(out)["nodes"]
    assert [(n["hostname"], n["agent_version"]) for n in nodes] == [("sim-h100-01", package_version()),
                                                                     ("sim-t4-02", package_version())]
    rc, out, _ = await _cli(capsys, "node", "sim-t4-02", "--state-dir", state, "-o", "json")
    assert rc == 0 and json.loads(out)["agent_version"] == package_version()
    rc, out, _ = await _cli(capsys, "node", "sim-t4-02", "--state-dir", state)
    assert rc == 0 and f"version {package_version()}" in out
    rc, out, _ = await _cli(capsys, "--state-dir", state, "version")
    base = json.loads((controller.ctx.settings.state_dir / "controller.json").read_text())["http"]
    assert rc == 0 and f"controller {package_version()} at {base}" in out


async def test_dashboard_node_page_shows_the_agent_version(controller: RunningController, fleet: SimAgents) -> None:
    await fleet.start("sim-h100-01", "h100")
    state = controller.ctx.settings.state_dir
    base = json.loads((state / "controller.json").read_text())["http"]
    add_user(controller.ctx.store, "olga", "viewer", "password-123")
    async with httpx.AsyncClient(base_url=base) as client:
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', (await client.get("/login")).text)
        assert csrf is not None
        await client.post("/login", data={"username": "olga", "password": "password-123",
                                          "csrf_token": csrf.group(1)})
        page = await client.get("/nodes/sim-h100-01")
    assert page.status_code == 200, page.text[:300]
    assert f'<span id="agent-version">agent {package_version()}</span>' in page.text
