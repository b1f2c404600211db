"""Busy GPUs (docs/rollout.md, "Busy GPUs"): a real process holds a simulated GPU (its pid in the simulated node's
``simulated-gpu-use/gpu<N>.pid``), and rollouts and verifications wait, skip or fail as their policy says.

A real controller (gRPC mTLS, HTTP, engine, SQLite), real agents over sockets whose runner is the agent's own
``BusyGuard`` around a simulated executor (tests/integration/rollout/simrunner.py), fleetctl as a process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fleetctl.agent.busy_guard import BusyGuard
from fleetctl.agent.gpu_use import SimulatedGpuUse, hold_simulated_gpu
from fleetctl.controller.app import RunningController
from fleetctl.controller.rollout import service
from tests.integration.fleet_support import AgentProcess, SimAgents, wait_for
from tests.integration.rollout.simrunner import Script, SimRunner
from tests.integration.rollout.test_rollout_cli import fleetctl

pytestmark = pytest.mark.timeout(240)


@pytest_asyncio.fixture
async def holder() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Real processes that hold simulated GPUs (``sleep``); killed at the end whatever happened."""
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for p in procs:
        if p.returncode is None:
            p.kill()
            await p.wait()


async def hold(procs: list[asyncio.subprocess.Process], fleet: SimAgents, host: str, gpu: int) -> int:
    proc = await asyncio.create_subprocess_exec("sleep", "300")
    procs.append(proc)
    hold_simulated_gpu(fleet.root / host, gpu, proc.pid)
    return proc.pid


async def start(fleet: SimAgents, script: Script, tmp: Path, hosts: list[str], profile: str = "a100") -> None:
    for host in hosts:
        runner = SimRunner.for_profile(host, profile, script, tmp / "work" / host)
        facts = runner.current_facts()
        guard = BusyGuard(runner, SimulatedGpuUse(fleet.root / host, [g.index for g in facts.gpus]), poll_s=0.2)
        sim = await fleet.start(host, profile, runner=guard, facts=runner.current_facts)
        runner.agent = sim.agent


def status(rc: RunningController, rid: str) -> dict[str, Any]:
    return service.get_status(rc.ctx.store, rid)


def node(st: dict[str, Any], host: str) -> dict[str, Any]:
    return next(n for n in st["nodes"] if n["hostname"] == host)


async def rollout(rc: RunningController, *args: str) -> str:
    code, out, err = await fleetctl(rc, "rollout", "flash-attn", "--canary", "0", "--batch", "100%", "--detach",
                                    *args)
    assert code == 0, out + err
    return out.split()[1]


async def test_wait_holds_the_step_until_the_process_exits(controller: RunningController, fleet: SimAgents,
                                                           tmp_path: Path,
                                                           holder: list[asyncio.subprocess.Process]) -> None:
    script = Script()
    await start(fleet, script, tmp_path, ["busy-1", "idle-1"])
    pid = await hold(holder, fleet, "busy-1", 3)
    rid = await rollout(controller, "--when-busy", "wait", "--busy-timeout", "120")
    # the idle node finishes; the busy one sits in its install step, its job not run
    st = await wait_for(lambda: (s := status(controller, rid)) and node(s, "idle-1")["state"] == "done" and s,
                        timeout=60)
    assert node(st, "busy-1")["state"] == "install"
    assert not [k for h, k, _ in script.ran if h == "busy-1"]
    job_id = node(st, "busy-1")["job_id"] or await wait_for(lambda: node(status(controller, rid), "busy-1")["job_id"])
    waiting = await wait_for(lambda: [e for e in controller.ctx.jobs.get(job_id)["events"]
                                      if e["event"] == "fleet_gpu_busy"])
    assert f"pid {pid} (sleep)" in waiting[0]["data"]["reason"]
    assert waiting[0]["data"]["reason"].endswith("(simulated GPUs)")
    # `fleetctl rollout status` says why the node is not moving
    await wait_for(lambda: "waiting, GPU(s) busy: GPU 3: pid" in node(status(controller, rid), "busy-1")["cause"])

    holder[0].kill()
    await holder[0].wait()
    st = await wait_for(lambda: (s := status(controller, rid))["status"] == "succeeded" and s, timeout=60)
    assert controller.ctx.jobs.get(job_id)["result"]["busy_wait_s"] > 0
    assert [k for h, k, _ in script.ran if h == "busy-1"] == ["install-wheel", "verify"]


async def test_skip_and_fail(controller: RunningController, fleet: SimAgents, tmp_path: Path,
                             holder: list[asyncio.subprocess.Process]) -> None:
    script = Script()
    await start(fleet, script, tmp_path, ["busy-1", "busy-2", "idle-1"])
    await hold(holder, fleet, "busy-1", 0)
    pid = await hold(holder, fleet, "busy-2", 5)

    rid = await rollout(controller, "--when-busy", "skip", "--nodes", "busy-1,idle-1", "--max-failures", "0")
    st = await wait_for(lambda: (s := status(controller, rid))["active"] is False and s, timeout=60)
    assert st["status"] == "partial"  # not succeeded: a node is left to do; not paused: nothing failed
    assert node(st, "idle-1")["state"] == "done"
    skipped = node(st, "busy-1")
    assert skipped["state"] == "skipped-busy"
    assert "install-wheel skipped, GPU(s) busy (--when-busy skip): GPU 0: pid" in skipped["cause"]
    assert st["counts"].get("failed", 0) == 0
    code, out, _ = await fleetctl(controller, "rollout", "status", rid)
    assert code == 0 and "skipped-busy" in out

    rid = await rollout(controller, "--when-busy", "fail", "--nodes", "busy-2", "--max-failures", "1")
    st = await wait_for(lambda: (s := status(controller, rid))["active"] is False and s, timeout=60)
    failed = node(st, "busy-2")
    assert failed["state"] == "failed"
    assert f"GPU 5: pid {pid} (sleep)" in failed["cause"] and "--when-busy fail" in failed["cause"]
    assert not [k for h, k, _ in script.ran if h.startswith("busy-")]  # nothing ran on a busy node



async def test_verify_measures_idle_gpus_and_says_which(controller: RunningController, fleet: SimAgents,
                                                         tmp_path: Path,
                                                         holder: list[asyncio.subprocess.Process]) -> None:
    script = Script()
    await start(fleet, script, tmp_path, ["node-1"])
    for gpu in (0, 2, 3, 4, 5, 6, 7):
        await hold(holder, fleet, "node-1", gpu)
    code, out, err = await fleetctl(controller, "verify", "node-1", "--quick", "--gpus", "idle", "--json")
    v = json.loads(out)["verifications"][0]
    assert v["gpus"] == [1], out + err
    code, out, err = await fleetctl(controller, "verify", "node-1", "--quick", "--gpus", "0", "--when-busy", "skip",
                                    "--json")
    assert code == 9
    v = json.loads(out)["verifications"][0]
    assert v["status"] == "skipped-busy" and "GPU 0: pid" in v["reasons"][0]
    code, out, err = await fleetctl(controller, "node", "node-1")
    assert "GPU 1" in out


async def test_fleet_agent_run_checks_its_simulated_gpus(controller: RunningController, tmp_path: Path,
                                                         holder: list[asyncio.subprocess.Process]) -> None:
    """The same through `fleet-agent run --simulate a100 --executor simulated` as a process: its own wiring
    (agent/commands/run.py) puts the busy check in front of the simulated executor."""
    agent = AgentProcess(controller, "proc-1", tmp_path / "agent", tmp_path / "logs",
                         ["--simulate", "a100", "--executor", "simulated", "--busy-poll", "0.2"])
    await agent.start()
    try:
        await wait_for(lambda: controller.ctx.registry.status_of("proc-1") == "online", timeout=60)
        proc = await asyncio.create_subprocess_exec("sleep", "300")
        holder.append(proc)
        hold_simulated_gpu(tmp_path / "agent", 3, proc.pid)
        code, out, err = await fleetctl(controller, "verify", "proc-1", "--quick", "--gpus", "3", "--when-busy",
                                        "fail", "--json")
        v = json.loads(out)["verifications"][0]
        assert code == 9 and v["status"] == "busy", out + err + agent.log_tail()
        assert f"GPU 3: pid {proc.pid} (sleep)" in v["reasons"][0] and "(simulated GPUs)" in v["reasons"][0]
        code, out, err = await fleetctl(controller, "verify", "proc-1", "--quick", "--gpus", "idle", "--json")
        assert json.loads(out)["verifications"][0]["gpus"] == [0, 1, 2, 4, 5, 6, 7], out + err
    finally:
        await agent.close()
