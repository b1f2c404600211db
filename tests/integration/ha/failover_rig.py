"""Agent fail-over with real processes (issue 17; tests/integration/ha/test_agent_failover.py, benchmarks/failover.py).

Controllers: ``python -m fleetctl.controller.main serve`` processes (``ControllerProc``) on one PostgreSQL database
of their own (``fleet_failover_<random>``, dropped afterwards), sharing its CA (docs/ha.md: nothing copied). Agents:
``python -m fleetctl.agent.main run --controller A,B,C --simulate flash-attn-installed --executor simulated``
processes (JSON log lines), whose jobs take ``job_seconds``. Which controller an agent talks to is read from the
database (``agent_sessions.controller_id``: ``host:pid:nonce`` of the controller), its fail-over times from its own
log (``session N with controller X``) and from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.integration.rollout.controller_proc import ControllerProc, api, until

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


@contextlib.contextmanager
def failover_database() -> Iterator[str]:
    """A PostgreSQL database of its own (127.0.0.1:5432, trust auth), dropped afterwards: its SQLAlchemy URL."""
    name = f"fleet_failover_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(db_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows straight from the database (not through a controller)."""
    conninfo = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, connect_timeout=3) as conn:
        return conn.execute(sql, params).fetchall()


@dataclass
class AgentProc:
    hostname: str
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def sessions(self) -> list[tuple[dt.datetime, str]]:
        """(time, controller address) of every session this agent established, in order."""
        found = []
        for entry in self.log_lines():
            message = str(entry.get("message", ""))
            if message.startswith("session ") and " with controller " in message:
                address = message.split(" with controller ", 1)[1].split(" ", 1)[0]
                found.append((dt.datetime.fromisoformat(entry["time"]), address))
        return found

    def jobs_started(self) -> list[str]:
        """Job ids whose run started on this node, once per start (a job run twice shows twice)."""
        return [str(e["message"]).split()[1] for e in self.log_lines()
                if str(e.get("message", "")).startswith("job ") and str(e["message"]).endswith(") started")]


@dataclass
class FailoverRig:
    db_url: str
    tmp: Path
    controllers: int = 3
    heartbeat: float = 0.5
    missed: int = 4
    job_seconds: float = 6.0
    profile: str = "flash-attn-installed"  # its simulated verification passes: the node stays online, not degraded
    # the agents' command runs under this one (the DNS test: a mount namespace with /etc/hosts of its own)
    launcher: tuple[str, ...] = ()
    ctl: list[ControllerProc] = field(default_factory=list)
    agents: list[AgentProc] = field(default_factory=list)

    async def start_controllers(self) -> None:
        for i in range(self.controllers):
            cp = ControllerProc(self.tmp / f"ctl-{i}" / "controller", self.heartbeat, db=self.db_url,
                                missed=self.missed)
            cp.start()  # one CA for all: the database's (the first controller created it, the others load it)
            await cp.ready()
            self.ctl.append(cp)

    @property
    def controller_list(self) -> str:
        return ",".join(cp.address for cp in self.ctl)

    def by_address(self, address: str) -> ControllerProc:
        return next(cp for cp in self.ctl if address == cp.address)

    def controller_args(self) -> list[str]:
        """How the agents are told their controllers: every controller's agent and enrollment port, listed."""
        return ["--controller", self.controller_list,
                "--enroll-address", ",".join(f"{cp.host}:{cp.ports['enroll']}" for cp in self.ctl)]

    async def start_agents(self, hostnames: list[str], *extra: str) -> None:
        env = {**os.environ, "FLEET_SIM_JOB_SECONDS": json.dumps({"*": self.job_seconds})}
        for host in hostnames:
            token = (await api(self.ctl[0], "POST", "/tokens", {"ttl_seconds": 600, "hostname": host}))["token"]
            agent = AgentProc(host, self.tmp / "agents" / host, self.tmp / "agents" / f"{host}.log")
            agent.state_dir.mkdir(parents=True, exist_ok=True)
            agent.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "fleetctl.agent.main", "run", *self.controller_args(),
                 "--ca", str(self.ctl[0].state / "ca" / "ca.pem"), "--token", token, "--hostname", host,
                 "--state-dir", str(agent.state_dir), "--simulate", self.profile, "--executor", "simulated",
                 "--log-format", "json", "--connect-timeout", "60", *extra],
                stdout=agent.log_path.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.agents.append(agent)

    def holders(self) -> dict[str, int]:
        """Each node's session holder now, as the pid of the controller process (``host:pid:nonce``)."""
        rows = query(self.db_url, "SELECT n.hostname, s.controller_id FROM agent_sessions s "
                                  "JOIN nodes n ON n.id = s.node_id")
        return {host: int(holder.split(":")[1]) for host, holder in rows}

    def holder_of(self, host: str) -> ControllerProc | None:
        pid = self.holders().get(host)
        return next((cp for cp in self.ctl if cp.proc is not None and cp.proc.pid == pid), None)

    async def statuses(self) -> dict[str, dict[str, str]]:
        """Each live controller's view (its API): address → node → status."""
        out = {}
        for cp in self.ctl:
            if cp.proc is not None and cp.proc.poll() is None:
                nodes = (await api(cp, "GET", "/nodes"))["nodes"]
                out[cp.address] = {n["hostname"]: n["status"] for n in nodes}
        return out

    async def all_online_everywhere(self) -> bool:
        """Every agent's node online on the API of every live controller."""
        return all(view.get(a.hostname) == "online" for view in (await self.statuses()).values() for a in self.agents)

    async def wait_online(self, timeout: float = 60) -> None:
        try:
            await until(self.all_online_everywhere, timeout, interval=0.2)
        except AssertionError:
            raise AssertionError(f"not every node online on every live controller: {await self.statuses()}") from None

    async def submit_verify(self, via: ControllerProc) -> dict[str, str]:
        """A verify job on every node (``job_seconds`` long on the simulated executor): node → job id."""
        out = await api(via, "POST", "/verify", {"hosts": [a.hostname for a in self.agents], "mode": "quick"})
        return dict(out["jobs"])

    def job_rows(self, job_ids: list[str]) -> dict[str, tuple[str, dt.datetime | None]]:
        rows = query(self.db_url, "SELECT id, status, finished_at FROM jobs WHERE id = ANY(%s)", job_ids)
        return {job_id: (status, finished) for job_id, status, finished in rows}

    async def wait_running(self, job_ids: list[str], timeout: float = 30) -> None:
        async def running() -> bool:
            return all(status == "running" for status, _ in self.job_rows(job_ids).values())
        await until(running, timeout, interval=0.05)

    def stop(self) -> None:
        for agent in self.agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.terminate()
        for agent in self.agents:
            if agent.proc is not None:
                try:
                    agent.proc.wait(timeout=25)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait(timeout=5)
        for cp in self.ctl:
            cp.stop()


@dataclass(frozen=True)
class FailoverRun:
    """One kill -9 of a controller while its agents ran jobs: the seconds from the kill to each milestone."""

    killed: str  # the controller's address
    moved: list[str]  # its agents (hostnames)
    reconnected_s: float  # the last of them established a session with another controller (agent logs)
    lease_moved_s: float  # the last of their session leases held by another controller (database)
    results_s: float  # the last of their jobs' results recorded (database)
    job_left_s: float  # how much of the jobs' run was left at the kill (they ran on; not a fail-over cost)


async def kill_and_measure(rig: FailoverRig, job_ids: dict[str, str], victim: ControllerProc,
                           fault: str = "kill") -> FailoverRun:
    """kill -9 ``victim`` (``fault="kill"``: its port refuses at once) or freeze it (``"stop"``: SIGSTOP, a hung or
    cut-off controller whose connections stay open and silent; the caller resumes it with SIGCONT) while the jobs
    run; wait for its agents to report to another controller and for every job's result. Times are on this host's
    clock (controllers, agents and the test share it)."""
    moved = [host for host, pid in rig.holders().items() if victim.proc is not None and pid == victim.proc.pid]
    address = victim.address
    started = [t for (t,) in query(rig.db_url, "SELECT started_at FROM jobs WHERE id = ANY(%s)",
                                   [job_ids[h] for h in moved]) if t is not None]
    if fault == "kill":
        victim.kill9()
    else:
        assert victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGSTOP)
    killed = dt.datetime.now(dt.UTC)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def leases_moved() -> bool:
        holders = rig.holders()
        return all(holders.get(host) not in (None, victim.proc.pid if victim.proc else None) for host in moved)

    await until(leases_moved, 60, interval=0.05)
    lease_moved_s = loop.time() - t0
    ids = list(job_ids.values())

    async def finished() -> bool:
        return all(status != "running" and finished is not None for status, finished in rig.job_rows(ids).values())

    await until(finished, 120, interval=0.05)
    rows = rig.job_rows([job_ids[h] for h in moved])
    results_s = max(((f - killed).total_seconds() for _, f in rows.values() if f is not None), default=0.0)
    # each moved agent's first session after the kill (on another controller); the last of them
    firsts = [min((t for t, where in agent.sessions() if t > killed and where != address), default=None)
              for agent in rig.agents if agent.hostname in moved]
    reconnected_s = max(((t - killed).total_seconds() if t else float("inf") for t in firsts), default=0.0)
    job_left_s = max((rig.job_seconds - (killed - s).total_seconds() for s in started), default=0.0)
    return FailoverRun(address, moved, reconnected_s, lease_moved_s, results_s, job_left_s)
