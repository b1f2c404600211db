"""Issue 19 in a rollout: a Windows node's plan is for a person, an MI300X node's build goes out as a ROCm build.

A real controller (rollout service and engine) with fake agents at the dispatcher seam (controller.testing):
the Windows node is ``skipped`` from the start with the cause ``manual: run these commands by hand …`` and gets no
job; its commands — the resolver's, unchanged — are in the status JSON (what ``fleetctl rollout status --json``
prints) and in the rollout page's data, while every other node's list is empty. The MI300X node's build job
carries ``gpu_backend rocm-ck`` and ``gpu_archs gfx942`` and no ``cuda_archs`` (build-from-source.yml's ROCm
variables, tests/integration/playbooks/test_build_rocm.py runs them).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.rollout.core import MANUAL_CAUSE
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store.models import Job
from fleetctl.controller.testing import FleetThread
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user

PASSWORD = "correct horse battery"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetThread]:
    with FleetThread(state_dir=tmp_path / "controller") as ft:
        add_user(ft.fleet.ctx.store, "vic", "viewer", PASSWORD)
        yield ft


def test_windows_node_is_manual_with_its_commands_and_mi300x_builds_for_rocm(fleet: FleetThread) -> None:
    facts = [load_profile(p, f"sim-{p}") for p in ("h100", "windows-rtx4090", "mi300x")]
    h100, win, amd = fleet.call(fleet.fleet.add_nodes(facts))
    expected = list(resolve(facts[1], builtin_catalog(), Policy()).commands)
    assert any("--no-build-isolation" in c for c in expected)

    rid = fleet.call(fleet.fleet.start_rollout(RolloutRequest(nodes=f"{h100},{win},{amd}", actor="user:demo",
                                                              canary=0)))
    fleet.call(fleet.fleet.start_engine())
    st = fleet.call(fleet.fleet.wait_rollout(rid, "succeeded", "partial", "paused", "aborted"))
    assert st["status"] == "succeeded", st
    nodes = {n["hostname"]: n for n in st["nodes"]}
    assert nodes[win]["state"] == "skipped" and nodes[win]["cause"].startswith(MANUAL_CAUSE)
    assert "11 commands for fa2-source 2.8.3.post1" in nodes[win]["cause"] and "not executed by the agent" in \
        nodes[win]["cause"]
    assert nodes[win]["commands"] == expected and len(expected) == 11
    assert (nodes[h100]["state"], nodes[h100]["commands"]) == ("done", [])
    assert (nodes[amd]["state"], nodes[amd]["commands"]) == ("done", [])
    counts = fleet.fleet.job_counts()
    assert not any(host == win for host, _ in counts)  # the agent was given nothing to run

    with fleet.fleet.ctx.store.session() as s:
        [build_vars] = s.scalars(select(Job.vars).where(Job.node == amd, Job.kind == "build-from-source")).all()
    assert (build_vars["gpu_backend"], build_vars["gpu_archs"]) == ("rocm-ck", "gfx942")
    assert "cuda_archs" not in build_vars

    with TestClient(create_standalone_app(fleet.fleet.ctx)) as c:
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
        assert token is not None
        c.post("/login", data={"username": "vic", "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
               follow_redirects=False)
        page = {n["hostname"]: n for n in c.get(f"/ui/api/rollouts/{rid}").json()["nodes"]}
        assert page[win]["commands"] == expected and page[win]["error"].startswith(MANUAL_CAUSE)
        assert page[h100]["commands"] == []
