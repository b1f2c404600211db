"""A controller as a real subprocess (`python -m fleetctl.controller.main serve`) on fixed free ports, so it can be
killed (-9) and restarted on the same addresses; plus a tiny async client for its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from fleetctl.agent.client import Agent, AgentConfig
from tests.integration.rollout.simrunner import Script, SimRunner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControllerProc:
    def __init__(self, state: Path, heartbeat: float = 1.0, *, db: str | None = None, missed: int = 5,
                 host: str = "127.0.0.1", ports: dict[str, int] | None = None, san: tuple[str, ...] = ()) -> None:
        self.state = state
        self.heartbeat = heartbeat
        self.db = db  # None: SQLite in the state dir
        self.missed = missed
        self.host = host  # every port listens on this address (127.0.0.2, 127.0.0.3…: the DNS fail-over test)
        self.ports = ports or {k: free_port() for k in ("grpc", "enroll", "http")}
        self.san = san  # more names for its server certificate (--san)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the controller process so far (Linux /proc)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.ports['http']}"

    @property
    def address(self) -> str:
        """Its agent port, as HOST:PORT."""
        return f"{self.host}:{self.ports['grpc']}"

    def start(self) -> None:
        self.starts += 1
        self.state.parent.mkdir(parents=True, exist_ok=True)
        log = (self.state.parent / f"controller-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetctl.controller.main", "serve", "--state-dir", str(self.state),
             "--grpc-listen", self.address, "--enroll-listen", f"{self.host}:{self.ports['enroll']}",
             "--http-listen", f"{self.host}:{self.ports['http']}",
             "--http-insecure",  # loopback only; the tests call the API with bare httpx
             "--heartbeat-interval", str(self.heartbeat), "--missed-heartbeats", str(self.missed),
             *(["--db", self.db] if self.db else []), *(arg for name in self.san for arg in ("--san", name))],
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
async def controller_proc(tmp: Path, heartbeat: float = 1.0) -> AsyncIterator[ControllerProc]:
    cp = ControllerProc(tmp / "controller", heartbeat)
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



async def all_online(cp: ControllerProc, count: int) -> bool:
    nodes = (await api(cp, "GET", "/nodes"))["nodes"]
    return len(nodes) == count and all(n["status"] == "online" for n in nodes)


AgentHandle = tuple[Agent, asyncio.Event, "asyncio.Task[None]"]


async def start_agents(cp: ControllerProc, nodes: list[tuple[str, str]], script: Script,
                       tmp: Path) -> list[AgentHandle]:
    """Real agents (this process, gRPC mTLS to the controller subprocess) with the simulated executor."""
    out: list[AgentHandle] = []
    for host, profile in nodes:
        tok = (await api(cp, "POST", "/tokens", {"ttl_seconds": 600, "hostname": host}))["token"]
        runner = SimRunner.for_profile(host, profile, script, tmp / "work" / host)
        agent = Agent(AgentConfig(controller=f"127.0.0.1:{cp.ports['grpc']}",
                                  enroll_address=f"127.0.0.1:{cp.ports['enroll']}",
                                  state_dir=tmp / "agents" / host, facts=runner.current_facts,
                                  ca_file=cp.state / "ca" / "ca.pem", token=tok, runner=runner,
                                  backoff_initial=0.1, backoff_max=0.5))
        runner.agent = agent
        stop = asyncio.Event()
        out.append((agent, stop, asyncio.create_task(agent.run(stop))))
    return out


async def stop_agents(agents: list[AgentHandle]) -> None:
    for _, stop, _ in agents:
        stop.set()
    if agents:
        await asyncio.wait([t for _, _, t in agents], timeout=10)
