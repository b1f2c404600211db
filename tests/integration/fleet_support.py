"""Test helpers for a real controller and real agents on loopback (gRPC over mutual TLS).

Fixtures (registered in tests/integration/conftest.py):

- ``pg_url``: a PostgreSQL URL (127.0.0.1:5432, db ``test``) whose search_path is a fresh
  schema, dropped afterwards; skips when PostgreSQL is unreachable.
- ``db_url``: parametrized ``sqlite`` / ``postgres``: run a test on both backends.
- ``controller``: a ``RunningController`` in the test's event loop (free ports, SQLite
  unless the test also requests ``db_url``), heartbeat interval 1 s, offline after 2 missed.
- ``fleet``: a ``SimAgents`` factory: ``await fleet.start("node-1", "a100")`` enrolls and runs an
  in-process ``agent.client.Agent`` over real sockets; ``await fleet.stop_all()`` at teardown.

Helpers: ``enroll_creds(rc, hostname)`` (enroll only, returns agent Credentials),
``mtls_stub(rc, creds)`` (a raw ``AgentServiceAsyncStub`` with that identity),
``wait_for(predicate, timeout)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio

from fleetctl.agent.client import Agent, AgentConfig, Credentials, channel_options, enroll
from fleetctl.agent.jobs import JobRunner
from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.settings import ControllerSettings
from fleetctl.fleet.facts import NodeFacts
from fleetctl.fleet.v1 import fleet_pb2_grpc as pb_grpc

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
    else:
        with postgres_schema() as url:
            yield url


def controller_settings(state_dir: Path, db_url: str | None = None, **kw: Any) -> ControllerSettings:
    base: dict[str, Any] = {"state_dir": state_dir, "db_url": db_url, "grpc_listen": "127.0.0.1:0",
                            "enroll_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0",
                            "heartbeat_interval": 1.0, "missed_heartbeats": 2, "flush_interval": 0.5,
                            # plain HTTP, chosen explicitly: these controllers listen on loopback only, and the tests
                            # talk to them with bare httpx; HTTPS itself: tests/integration/fleet/test_https.py
                            "http_insecure": True}
    base.update(kw)
    return ControllerSettings(**base)


@pytest_asyncio.fixture
async def controller(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningController]:
    url = request.getfixturevalue("db_url") if "db_url" in request.fixturenames else None
    rc = await start_controller(controller_settings(tmp_path / "controller", url))
    try:
        yield rc
    finally:
        await rc.stop(grace=0.2)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def new_token(rc: RunningController, hostname: str | None = None, ttl: float = 300) -> str:
    token, _ = rc.ctx.enrollment.create_token(dt.timedelta(seconds=ttl), hostname)
    return token


class AgentProcess:
    """``fleet-agent run ARGS`` as its own process (own session) against ``rc``: enrolled with a one-time token
    on its first start, the same identity (``state_dir``) on every later one; start N logs to
    ``logs/agent-N.log``."""

    def __init__(self, rc: RunningController, hostname: str, state_dir: Path, logs: Path, args: Sequence[str],
                 env: Mapping[str, str] | None = None) -> None:
        self.rc = rc
        self.hostname = hostname
        self.state_dir = state_dir
        self.logs = logs
        self.args = list(args)
        self.env = dict(env or {})
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        assert self.rc.ctx.grpc_address and self.rc.ctx.enroll_address
        self.starts += 1
        env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "false", **self.env}
        if not (self.state_dir / "identity.json").exists():
            env["FLEET_AGENT_TOKEN"] = new_token(self.rc, self.hostname)
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"agent-{self.starts}.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "fleet-agent"), "run", "--controller", self.rc.ctx.grpc_address,
                "--enroll-address", self.rc.ctx.enroll_address, "--ca", str(self.rc.ctx.ca.ca_path),
                "--state-dir", str(self.state_dir), "--hostname", self.hostname, *self.args,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True)

    async def kill9(self) -> None:
        """SIGKILL the agent process alone (an OOM kill): no result, no goodbye."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 30)

    def log_tail(self, n: int = 40) -> str:
        text = "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("agent-*.log")))
        return "\n".join(text.splitlines()[-n:])

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def enroll_creds(rc: RunningController, hostname: str, token: str | None = None) -> Credentials:
    assert rc.ctx.enroll_address is not None
    return await enroll(rc.ctx.enroll_address, rc.ctx.ca.ca_pem, token or new_token(rc), hostname)


@contextlib.asynccontextmanager
async def mtls_stub(rc: RunningController, creds: Credentials,
                    address: str | None = None) -> AsyncIterator[pb_grpc.AgentServiceAsyncStub]:
    channel_creds = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem, private_key=creds.key_pem,
                                                 certificate_chain=creds.cert_pem)
    async with grpc.aio.secure_channel(address or rc.ctx.grpc_address or "", channel_creds,
                                       options=channel_options()) as ch:
        yield pb_grpc.AgentServiceStub(ch)


def profile_facts(profile: str, hostname: str) -> NodeFacts:
    from fleetctl.agent.profiles import load_profile

    return load_profile(profile, hostname)


@dataclass
class SimAgent:
    agent: Agent
    task: asyncio.Task[None]
    stop_event: asyncio.Event
    state_dir: Path

    async def stop(self) -> None:
        self.stop_event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, timeout=5)


@dataclass
class SimAgents:
    rc: RunningController
    root: Path
    agents: dict[str, SimAgent] = field(default_factory=dict)

    async def start(self, hostname: str, profile: str = "a100", *, runner: JobRunner | None = None,
                    facts: Callable[[], NodeFacts] | None = None, wait: bool = True,
                    address: str | None = None) -> SimAgent:
        """Enroll (first time) and run an agent for ``hostname``; waits until it is registered and heartbeating.

        ``address``: where the agent finds the controller's agent port (default: the port itself; a relay
        in front of it lets a test cut the connection). Up means ``online`` or ``degraded`` (both heartbeat):
        a job the agent takes at once may degrade the node before the first poll here — a verify job
        without a verification result does (verify_store).
        """
        state = self.root / hostname
        fixed = profile_facts(profile, hostname)
        assert self.rc.ctx.grpc_address and self.rc.ctx.enroll_address
        cfg = AgentConfig(controller=address or self.rc.ctx.grpc_address, enroll_address=self.rc.ctx.enroll_address,
                          state_dir=state, facts=facts or (lambda: fixed), ca_file=self.rc.ctx.ca.ca_path,
                          token=None if (state / "identity.json").exists() else new_token(self.rc, hostname),
                          backoff_initial=0.1, backoff_max=0.5)
        if runner is not None:
            cfg.runner = runner
        agent = Agent(cfg)
        stop = asyncio.Event()
        sim = SimAgent(agent, asyncio.create_task(agent.run(stop)), stop, state)
        self.agents[hostname] = sim
        if wait:
            await wait_for(lambda: (self.rc.ctx.registry.status_of(hostname) in ("online", "degraded")
                                    and agent.heartbeats > 0) or sim.task.done())
            if sim.task.done():
                sim.task.result()
        return sim

    async def stop_all(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents.values()))


@pytest_asyncio.fixture
async def fleet(controller: RunningController, tmp_path: Path) -> AsyncIterator[SimAgents]:
    agents = SimAgents(controller, tmp_path / "agents")
    try:
        yield agents
    finally:
        await agents.stop_all()
