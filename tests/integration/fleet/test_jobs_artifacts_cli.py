"""Jobs over the Jobs stream, artifacts over mTLS, and the fleetctl commands against a live controller."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.app import RunningController
from fleetctl.controller.cli import main as fleetctl
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from tests.integration.fleet_support import SimAgents, wait_for

pytestmark = pytest.mark.timeout(60)


class ScriptedRunner:
    """A JobRunner that emits a few events (and many, to overflow the bounded queue, if asked)."""

    def __init__(self, events: int = 3, delay: float = 0.0) -> None:
        self.events = events
        self.delay = delay
        self.jobs: list[JobSpec] = []

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        self.jobs.append(job)
        for i in range(self.events):
            emit_event({"event": "runner_on_ok", "event_data": {"task": f"t{i}"}})
        await asyncio.sleep(self.delay)
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={"echo": job.vars})


async def test_job_round_trip_with_events(controller: RunningController, fleet: SimAgents, db_url: str) -> None:
    runner = ScriptedRunner(events=3)
    await fleet.start("node-1", "a100", runner=runner)
    seen: list[str] = []
    controller.ctx.jobs.add_event_listener(lambda ev: seen.append(ev.event))
    job_id = await controller.ctx.jobs.submit_job("node-1", "install-wheel", {"wheel": "x.whl"}, timeout=30)
    outcome = await controller.ctx.jobs.wait(job_id, timeout=10)
    assert outcome.ok and outcome.rc == 0 and outcome.result == {"echo": {"wheel": "x.whl"}}
    job = controller.ctx.jobs.get(job_id)
    assert job["status"] == "successful" and job["finished_at"]
    events = [e["event"] for e in job["events"]]
    assert events == ["fleet_job_started", "runner_on_ok", "runner_on_ok", "runner_on_ok", "fleet_job_finished"]
    assert [e["counter"] for e in job["events"]] == [1, 2, 3, 4, 5]
    assert "runner_on_ok" in seen


async def test_default_executor_fails_jobs_clearly(controller: RunningController, fleet: SimAgents) -> None:
    await fleet.start("node-1", "t4")
    job_id = await controller.ctx.jobs.submit_job("node-1", "cuda-toolkit", {}, timeout=30)
    outcome = await controller.ctx.jobs.wait(job_id, timeout=10)
    assert outcome.status == "failed" and "no executor" in (outcome.error or "")


async def test_job_for_offline_agent_is_delivered_on_reconnect(controller: RunningController,
                                                               fleet: SimAgents) -> None:
    runner = ScriptedRunner(events=1)
    sim = await fleet.start("node-1", "a100", runner=runner)
    await sim.stop()
    job_id = await controller.ctx.jobs.submit_job("node-1", "verify", {"n": 1}, timeout=30)
    await asyncio.sleep(0.2)
    # pending, or dispatched into the stream of the agent that just went away: re-delivered either way
    assert controller.ctx.jobs.get(job_id)["status"] in ("pending", "dispatched")
    done: list[str] = []
    controller.ctx.jobs.add_done_callback(job_id, lambda o: done.append(o.status))
    await fleet.start("node-1", "a100", runner=runner)
    outcome = await controller.ctx.jobs.wait(job_id, timeout=10)
    assert outcome.ok and done == ["successful"]


async def test_event_flood_does_not_stall_the_runner(controller: RunningController, fleet: SimAgents) -> None:
    runner = ScriptedRunner(events=5000)
    await fleet.start("node-1", "a100", runner=runner)
    job_id = await controller.ctx.jobs.submit_job("node-1", "build-from-source", {}, timeout=30)
    outcome = await controller.ctx.jobs.wait(job_id, timeout=20)
    assert outcome.ok
    assert outcome.result.get("events_dropped", 0) > 0  # bounded queue: dropped, counted, never blocking


async def test_job_timeout_and_cancel(controller: RunningController, fleet: SimAgents) -> None:
    await fleet.start("node-1", "a100", runner=ScriptedRunner(events=0, delay=5))
    job_id = await controller.ctx.jobs.submit_job("node-1", "verify", {}, timeout=1)
    outcome = await controller.ctx.jobs.wait(job_id, timeout=10)
    assert outcome.status == "timeout"
    other = await controller.ctx.jobs.submit_job("node-1", "verify", {}, timeout=60)
    controller.ctx.jobs.cancel(other)
    assert (await controller.ctx.jobs.wait(other, timeout=1)).status == "canceled"


async def test_artifacts_upload_and_fetch_over_mtls(controller: RunningController, fleet: SimAgents,
                                                    tmp_path: Path) -> None:
    # an agent uploads only its own running build job's wheel (tests/integration/fleet/test_artifact_provenance.py)
    sim = await fleet.start("node-1", "a100", runner=ScriptedRunner(events=1, delay=5))
    job_id = await controller.ctx.jobs.submit_job("node-1", "build-from-source",
                                                  {"flash_attn_version": "2.8.3", "build_key": "k"}, timeout=30)
    await wait_for(lambda: controller.ctx.jobs.get(job_id, events=False)["status"] in ("dispatched", "running"))
    data = os.urandom(300_000)
    src = tmp_path / "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"
    src.write_bytes(data)
    sha = await sim.agent.upload_artifact(src, kind="wheel", job_id=job_id)
    assert sha == hashlib.sha256(data).hexdigest()
    info = controller.ctx.artifacts.get(sha)
    assert info.size == len(data) and info.filename == src.name and info.kind == "wheel"
    assert controller.ctx.artifacts.path_for(sha).read_bytes() == data
    got = await sim.agent.fetch_artifact(sha, tmp_path / "dl")
    assert got.name == src.name and got.read_bytes() == data
    from fleetctl.fleet.errors import ControllerUnavailable, FleetError

    with pytest.raises(FleetError) as err:
        await sim.agent.fetch_artifact("0" * 64, tmp_path / "dl")
    assert not isinstance(err.value, ControllerUnavailable)
    assert "no artifact" in err.value.message


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(fleetctl, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_fleetctl_nodes_node_tokens_job_revoke(controller: RunningController, fleet: SimAgents,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = str(controller.ctx.settings.state_dir)
    await fleet.start("sim-h100-01", "h100")
    await fleet.start("sim-t4-02", "t4")
    rc, out, _ = await _cli(capsys, "nodes", "--state-dir", state)
    assert rc == 0 and "sim-h100-01 (sim)" in out and "Tesla T4" in out and "2 online" in out
    rc, out, _ = await _cli(capsys, "nodes", "--json", "--state-dir", state)
    nodes = json.loads(out)["nodes"]
    assert [n["hostname"] for n in nodes] == ["sim-h100-01", "sim-t4-02"] and all(n["simulated"] for n in nodes)
    rc, out, _ = await _cli(capsys, "node", "sim-t4-02", "--json", "--state-dir", state)
    node = json.loads(out)
    assert node["facts"]["gpus"][0]["compute_capability"] == "7.5" and node["history"][0]["changed"] == ["*"]
    rc, out, _ = await _cli(capsys, "node", "sim-t4-02", "--state-dir", state)
    assert rc == 0 and "[SIMULATED]" in out and "facts history" in out
    rc, out, err = await _cli(capsys, "node", "nope", "--state-dir", state)
    assert rc == 4 and "no node named 'nope'" in err and "hint:" in err
    # tokens
    rc, out, _ = await _cli(capsys, "token", "create", "--ttl", "10m", "--hostname", "n9", "--state-dir", state)
    token = out.strip()
    assert rc == 0 and token.startswith("fleet_")
    rc, out, _ = await _cli(capsys, "token", "list", "--json", "--state-dir", state)
    listed = json.loads(out)["tokens"]
    assert token not in out and any(t["hostname"] == "n9" and t["state"] == "active" for t in listed)
    tid = next(t["id"] for t in listed if t["hostname"] == "n9")
    rc, out, _ = await _cli(capsys, "token", "revoke", str(tid), "--state-dir", state)
    assert rc == 0 and "revoked" in out
    # job
    job_id = await controller.ctx.jobs.submit_job("sim-t4-02", "verify", {}, timeout=30)
    await controller.ctx.jobs.wait(job_id, timeout=10)
    rc, out, _ = await _cli(capsys, "job", job_id, "--state-dir", state)
    assert rc == 0 and "failed" in out and "no executor" in out
    # revoke an agent: its next heartbeat is refused and the agent stops with an auth error
    rc, out, _ = await _cli(capsys, "agent", "revoke", "sim-t4-02", "--state-dir", state)
    assert rc == 0 and "revoked" in out
    sim = fleet.agents["sim-t4-02"]
    await wait_for(lambda: sim.task.done(), timeout=15)
    from fleetctl.fleet.errors import AuthError

    assert isinstance(sim.task.exception(), AuthError)
    # wrong admin token
    os.environ["FLEETCTL_TOKEN"] = "wrong"
    try:
        rc, _, err = await _cli(capsys, "nodes", "--state-dir", state)
    finally:
        del os.environ["FLEETCTL_TOKEN"]
    assert rc == 6 and "admin token" in err


async def test_fleetctl_without_controller_says_how_to_start_one(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetctl.controller.cli", "nodes", "--state-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 7
    assert b"controller-unavailable" in err and b"fleet-controller serve" in err
