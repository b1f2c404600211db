"""kill -9 of the controller process mid-rollout, twice: on restart the rollout resumes where it was —
no finished step redone, no step run twice, the build job re-attached rather than resubmitted.

The controller runs as a real subprocess (`fleet-controller serve`, SQLite in a temp state dir); the
agents are real (in this process, over gRPC mTLS) with the simulated executor, and survive the
controller's death by reconnecting to the restarted one on the same ports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.client import Agent, AgentConfig
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = pytest.mark.timeout(240)

NODES = [("t4-1", "t4"), ("t4-2", "t4"), ("t4-3", "t4"), ("a100-1", "a100"), ("a100-2", "a100")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControllerProc:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.ports = {k: free_port() for k in ("grpc", "enroll", "http")}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def start(self) -> None:
        self.starts += 1
        log = (self.state.parent / f"controller-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.main", "serve", "--state-dir", str(self.state),
             "--grpc-listen", f"127.0.0.1:{self.ports['grpc']}", "--enroll-listen",
             f"127.0.0.1:{self.ports['enroll']}", "--http-listen", f"127.0.0.1:{self.ports['http']}",
             "--heartbeat-interval", "1", "--missed-heartbeats", "5"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "FLEET_ROLLOUT_LEASE_TTL": "5"},
            start_new_session=True)

    async def ready(self, timeout: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "controller exited"
            with contextlib.suppress(httpx.HTTPError):
                async with httpx.AsyncClient(timeout=2) as c:
                    if (await c.get(f"{self.url}/api/v1/health")).status_code == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError("controller did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def controller_proc(tmp: Path) -> AsyncIterator[ControllerProc]:
    cp = ControllerProc(tmp / "controller")
    cp.start()
    try:
        await cp.ready()
        yield cp
    finally:
        cp.stop()


async def api(cp: ControllerProc, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    token = (cp.state / "admin.token").read_text().strip()
    async with httpx.AsyncClient(base_url=cp.url, timeout=5, headers={"Authorization": f"Bearer {token}"}) as c:
        resp = await c.request(method, f"/api/v1{path}", json=body)
    assert resp.status_code < 400, resp.text
    return resp.json()


async def until(pred: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = await pred()
            if value:
                return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def test_kill9_mid_rollout_resumes(tmp_path: Path) -> None:
    script = Script(delays={"build-from-source": 6.0, "install-wheel": 1.0, "verify": 0.3})
    agents: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = []
    async with controller_proc(tmp_path) as cp:
        for host, profile in NODES:
            tok = (await api(cp, "POST", "/tokens", {"ttl_seconds": 600, "hostname": host}))["token"]
            runner = SimRunner.for_profile(host, profile, script, tmp_path / "work" / host)
            agent = Agent(AgentConfig(controller=f"127.0.0.1:{cp.ports['grpc']}",
                                      enroll_address=f"127.0.0.1:{cp.ports['enroll']}",
                                      state_dir=tmp_path / "agents" / host, facts=runner.current_facts,
                                      ca_file=cp.state / "ca" / "ca.pem", token=tok, runner=runner,
                                      backoff_initial=0.1,
                                      backoff_max=0.5))
            runner.agent = agent
            stop = asyncio.Event()
            agents.append((agent, stop, asyncio.create_task(agent.run(stop))))
        try:
            await until(lambda: _all_online(cp), 30)
            out = await api(cp, "POST", "/rollouts", {"canary": 0, "batch": "100%", "actor": "tester"})
            rid = out["id"]

            async def building() -> bool:
                st = await api(cp, "GET", f"/rollouts/{rid}")
                return any(n["state"] == "build" and n["in_step"] for n in st["nodes"])

            await until(building, 30)
            cp.kill9()  # 1: mid-build (the build job keeps running on its node)
            await asyncio.sleep(0.5)
            cp.start()
            await cp.ready()
            st = await api(cp, "GET", f"/rollouts/{rid}")
            assert st["status"] == "running", (st["reason"], [(n["hostname"], n["cause"]) for n in st["nodes"]])
            assert any(n["state"] == "build" and n["in_step"] for n in st["nodes"])  # visible mid-step

            async def installing() -> bool:
                st = await api(cp, "GET", f"/rollouts/{rid}")
                return any(n["state"] == "install" and n["in_step"] and n["hostname"].startswith("t4")
                           for n in st["nodes"])

            await until(installing, 60)
            cp.kill9()  # 2: while the built wheel is being installed on the waiting nodes
            await asyncio.sleep(0.3)
            cp.start()
            await cp.ready()

            async def finished() -> dict[str, Any] | None:
                st: dict[str, Any] = await api(cp, "GET", f"/rollouts/{rid}")
                return st if not st["active"] else None

            st = await until(finished, 90)
        finally:
            for _, stop, _ in agents:
                stop.set()
            await asyncio.wait([t for _, _, t in agents], timeout=10)
        assert st["status"] == "succeeded", json.dumps(st, indent=1)[:3000]
        ran = Counter((h, k) for h, k, _ in script.ran)
        assert [k for k, n in ran.items() if n > 1] == []  # no step ran twice on any node
        assert sum(1 for (_, k) in ran if k == "build-from-source") == 1  # built once, re-attached
        jobs = (await api(cp, "GET", "/jobs?limit=1000"))["jobs"]
        per = Counter((j["node"], j["kind"]) for j in jobs)
        assert [k for k, n in per.items() if n > 1] == []  # never resubmitted
        # the transition log of every node is a clean walk: no state entered twice
        for host, _ in NODES:
            seq = [t["to"] for t in st["transitions"] if t["hostname"] == host]
            assert len(seq) == len(set(seq)), (host, seq)
            assert seq[-1] == "done"


async def _all_online(cp: ControllerProc) -> bool:
    nodes = (await api(cp, "GET", "/nodes"))["nodes"]
    return len(nodes) == len(NODES) and all(n["status"] == "online" for n in nodes)
