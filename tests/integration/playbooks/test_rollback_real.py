"""rollback.yml for real, with exactly the variables the rollout engine sends.

Every real rollback once failed (``object of type 'NoneType' has no attribute 'version'``): the engine sent a
``previous`` job variable, which as an Ansible extra var replaced the playbook's own ``previous`` fact, and the
simulated tests never sent it. Here the engine's own ``_job_vars`` for ``rolling-back`` makes the variables,
the real ``AnsibleJobRunner`` (connection ``local``, the node state dir in a tmp dir) runs the real playbooks
against a real target venv (``python -m venv``) with stand-in flash_attn wheels, and for the rollout-level
cases the real engine and job dispatcher drive it (the agent loop below stands in for gRPC; the wheel a
rollback needs from the artifact store is fetched by the real ``ArtifactJobRunner``). The controller is
controller.testing's: the node is enrolled and registered through the registry, its facts reported by its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.agent.artifact_jobs import ArtifactJobRunner
from fleetctl.agent.executor import AnsibleJobRunner
from fleetctl.agent.profiles import load_profile
from fleetctl.controller.artifacts import Provenance
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.core import State
from fleetctl.controller.rollout.engine import RolloutEngine, plan_from_json
from fleetctl.controller.rollout.expectation import expected_after_rollback
from fleetctl.controller.rollout.models import Rollout, RolloutNode
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import FakeFleet
from fleetctl.fleet.facts import FlashAttnFacts
from fleetctl.fleet.jobs import JobOutcome, JobSpec
from tests.integration.harness.wheels import build_wheel, sha256_file
from tests.unit.rollout.wait import wait_for

HOST = "gpu-real-1"


def _ansible() -> bool:
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return shutil.which("ansible-playbook", path=path) is not None


pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not _ansible(), reason="ansible-playbook not installed")]


class RealNode:
    """One real node: a target venv, the playbooks' state dir, an agent state dir, stand-in wheels."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.venv = tmp / "target-venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        self.python = str(self.venv / "bin" / "python")
        self.node_state = tmp / "node-state"
        self.wheels = tmp / "wheels"
        self.runner = AnsibleJobRunner(tmp / "agent", python_interpreter=sys.executable, node_state_dir=self.node_state)
        self.n = 0

    def wheel(self, version: str) -> Path:
        return build_wheel(self.wheels / version, version=version, requires=())

    def installed(self) -> str | None:
        out = subprocess.run([self.python, "-c", "from importlib import metadata\ntry:\n print(metadata.version("
                              "'flash-attn'))\nexcept metadata.PackageNotFoundError:\n print('')"],
                             check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        return out.stdout.strip() or None

    def record(self, which: str) -> dict[str, Any] | None:
        p = self.node_state / f"flash-attn-{which}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def pip_install(self, wheel: Path) -> None:
        """An install fleetctl did not do (the node had it before fleetctl came)."""
        subprocess.run([self.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--disable-pip-version-check", str(wheel)], check=True, env={**os.environ, "PYTHONPATH": ""})

    async def run(self, kind: str, variables: dict[str, Any]) -> JobOutcome:
        self.n += 1
        return await self.runner.run(JobSpec(f"job-{self.n}", kind, variables, timeout_s=240), lambda e: None)

    async def install(self, wheel: Path) -> None:
        out = await self.run("install-wheel", {"wheel_path": str(wheel), "wheel_sha256": sha256_file(wheel),
                                               "python": self.python})
        assert out.status == "successful", out.error


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FakeFleet]:
    f = FakeFleet.create(tmp_path / "controller")
    yield f
    await f.close()


async def register(fleet: FakeFleet, node: RealNode, before: str | None) -> str:
    """The node in the controller with its facts at rollout start (``before``: its flash-attn then), and a
    rollout of it that is done (what a rollback starts from)."""
    facts = load_profile("h100", HOST)
    await fleet.add_node(replace(facts, python=replace(facts.python, executable=node.python),
                                 flash_attn=FlashAttnFacts(before, "fa2") if before else None))
    # the real agent loop below takes the node's jobs: the fake one must not
    await fleet.stop_agent(HOST)
    rid = str(service.start_rollout(fleet.ctx.store, RolloutRequest(nodes=HOST, canary=0, batch="100%"))["id"])
    with fleet.ctx.store.session() as s:  # the rollout ran (the install is done below, for real)
        r = s.get(Rollout, rid)
        n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == rid))
        assert r is not None and n is not None
        r.status, n.state = "succeeded", "done"
    return rid


def engine_rollback_vars(fleet: FakeFleet, rid: str) -> dict[str, Any]:
    """Exactly what the engine sends for the node's rollback step: its own ``_job_vars``."""
    engine = fleet.new_engine()
    with fleet.ctx.store.session() as s:
        r = s.get(Rollout, rid)
        n = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == rid, RolloutNode.hostname == HOST))
        assert r is not None and n is not None
        return engine._job_vars(s, r, n, plan_from_json(n.plan), State.ROLLING_BACK)


async def test_none_before_rollback_removes(fleet: FakeFleet, tmp_path: Path) -> None:
    node = RealNode(tmp_path)
    rid = await register(fleet, node, None)
    await node.install(node.wheel("2.8.3"))
    assert node.installed() == "2.8.3" and node.record("previous") == {"dist": "flash-attn", "version": None,
                                                                        "wheel": None, "sha256": None}
    variables = engine_rollback_vars(fleet, rid)
    assert "previous" not in variables and "wheel_sha256" not in variables
    out = await node.run("rollback", variables)
    assert out.status == "successful", out.error
    assert node.installed() is None and node.record("current") is None
    assert out.result["rollback"]["action"] == "removed" and out.result["rollback"]["restored_version"] is None
    again = await node.run("rollback", variables)  # idempotent
    assert again.status == "successful" and again.result["stats"]["changed"] == 0, again.result


async def test_previous_fleetctl_install_restores_that_wheel(fleet: FakeFleet, tmp_path: Path) -> None:
    node = RealNode(tmp_path)
    old, new = node.wheel("2.6.3"), node.wheel("2.8.3")
    await node.install(old)  # an earlier rollout installed 2.6.3: the node keeps that wheel
    rid = await register(fleet, node, "2.6.3")
    await node.install(new)
    previous = node.record("previous")
    assert node.installed() == "2.8.3" and previous is not None and previous["sha256"] == sha256_file(old)
    variables = engine_rollback_vars(fleet, rid)
    assert "wheel_sha256" not in variables  # not in the store: the node's kept wheel is the one
    out = await node.run("rollback", variables)
    assert out.status == "successful", out.error
    assert node.installed() == "2.6.3"
    current = node.record("current")
    assert current is not None and current["sha256"] == sha256_file(old)  # that exact wheel
    assert out.result["rollback"] == {"dist": "flash-attn", "action": "restored", "restored_version": "2.6.3",
                                      "wheel_source": "kept"}
    again = await node.run("rollback", variables)
    assert again.status == "successful" and again.result["stats"]["changed"] == 0, again.result
    assert node.installed() == "2.6.3"


async def test_previous_not_from_fleetctl_without_a_stored_wheel_fails_clearly(fleet: FakeFleet,
                                                                               tmp_path: Path) -> None:
    node = RealNode(tmp_path)
    node.pip_install(node.wheel("2.6.3"))  # there before fleetctl: no wheel kept
    rid = await register(fleet, node, "2.6.3")
    await node.install(node.wheel("2.8.3"))
    assert node.record("previous") == {"dist": "flash-attn", "version": "2.6.3", "wheel": None, "sha256": None}
    out = await node.run("rollback", engine_rollback_vars(fleet, rid))
    assert out.status == "failed"
    assert out.error and "cannot restore flash-attn 2.6.3" in out.error and "not installed by fleetctl" in out.error
    assert "fleetctl artifact add" in out.error
    assert node.installed() == "2.8.3"  # nothing changed


# ---- the rollout level: the real engine and dispatcher, the real runner on the node -----------------------------


class StoreClient:
    """The agent's FetchArtifact, straight from the controller's artifact store (the gRPC hop left out)."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    async def fetch_artifact(self, sha256: str, dest_dir: Path) -> Path:
        artifacts = self.fleet.ctx.artifacts
        info = artifacts.get(sha256)
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifacts.path_for(sha256), dest_dir / info.filename)
        return dest_dir / info.filename

    async def upload_artifact(self, path: Path, kind: str = "other", **_: Any) -> str:
        return self.fleet.ctx.artifacts.put_file(path, kind, provenance=Provenance.user("test-store-client")).sha256


@contextlib.asynccontextmanager
async def real_agent_and_engine(fleet: FakeFleet, node: RealNode) -> AsyncIterator[RolloutEngine]:
    runner = ArtifactJobRunner(node.runner, node.tmp / "agent" / "artifacts", StoreClient(fleet))

    async def agent() -> None:
        async for spec in fleet.ctx.jobs.stream_for(HOST):
            fleet.ctx.jobs.complete(HOST, await runner.run(spec, lambda e: None))

    engine = fleet.new_engine()
    tasks = [asyncio.create_task(agent()), asyncio.create_task(engine.run())]
    try:
        yield engine
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def rollout(fleet: FakeFleet, rid: str) -> dict[str, Any]:
    return service.get_status(fleet.ctx.store, rid)


async def test_rollout_rollback_failed_then_fixed_with_a_stored_wheel(fleet: FakeFleet, tmp_path: Path) -> None:
    node = RealNode(tmp_path)
    old = node.wheel("2.6.3")
    node.pip_install(old)  # there before fleetctl
    rid = await register(fleet, node, "2.6.3")
    await node.install(node.wheel("2.8.3"))
    async with real_agent_and_engine(fleet, node):
        service.rollback(fleet.ctx.store, rid, "carol")
        await wait_for(lambda: rollout(fleet, rid)["status"] not in ("rolling-back",), timeout=240)
        st = rollout(fleet, rid)
        assert st["status"] == "rollback-failed", st  # never rolled-back
        (n,) = st["nodes"]
        assert n["state"] == "failed" and "cannot restore flash-attn 2.6.3" in n["cause"]
        assert HOST in st["reason"] and "cannot restore flash-attn 2.6.3" in st["reason"]
        assert node.installed() == "2.8.3"

        # the fix the error names: a wheel of 2.6.3 in the artifact store; rolling back again retries the node
        fleet.ctx.artifacts.put_file(old, "wheel", provenance=Provenance.user("carol"))
        service.rollback(fleet.ctx.store, rid, "carol")
        await wait_for(lambda: rollout(fleet, rid)["status"] not in ("rolling-back",), timeout=240)
        st = rollout(fleet, rid)
    assert st["status"] == "rolled-back", st
    assert node.installed() == "2.6.3"
    current = node.record("current")
    assert current is not None and current["sha256"] == sha256_file(old)
    with fleet.ctx.store.session() as s:
        expected = expected_after_rollback(s, HOST)
    assert expected is not None and expected.flash_attn == "2.6.3" and expected.verify_expect == "flash_attn"


async def test_rollout_rollback_to_nothing_expects_no_flash_attn(fleet: FakeFleet, tmp_path: Path) -> None:
    node = RealNode(tmp_path)
    rid = await register(fleet, node, None)
    await node.install(node.wheel("2.8.3"))
    async with real_agent_and_engine(fleet, node):
        service.rollback(fleet.ctx.store, rid, "carol")
        await wait_for(lambda: rollout(fleet, rid)["status"] not in ("rolling-back",), timeout=240)
    st = rollout(fleet, rid)
    assert st["status"] == "rolled-back", st
    assert node.installed() is None
    with fleet.ctx.store.session() as s:
        expected = expected_after_rollback(s, HOST)
    assert expected is not None and expected.flash_attn is None and expected.verify_expect == "sdpa"
