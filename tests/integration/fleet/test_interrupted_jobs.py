"""A job whose agent process dies is failed as interrupted as soon as the agent is back; one whose agent
merely reconnects is not (controller/jobs.py: held jobs on the ``Jobs`` stream).

Real controller (gRPC over mutual TLS on loopback). The kill test runs ``fleet-agent run --simulate a100
--executor simulated`` as its own process and SIGKILLs it mid-build; the reconnect tests run the agent in
this process behind a TCP relay whose connections the test cuts (a network blip) or refuses for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.app import RunningController
from fleetctl.controller.cli import main as fleetctl
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from tests.integration.fleet_support import AgentProcess, SimAgent, SimAgents, wait_for

pytestmark = pytest.mark.timeout(90)

INTERRUPTED_EVENT = "fleet_job_interrupted"
BUILD_TIMEOUT = 5400  # a build-from-source job's deadline: what the watchdog would wait for


class TcpRelay:
    """Loopback TCP relay to ``target``: ``cut()`` drops every connection (a network blip); while ``refuse``
    is set, new connections are closed at once (the controller unreachable)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.refuse = False
        self.address = ""
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer, pair), self._pump(up_reader, writer, pair))
        finally:
            self._pairs.discard(pair)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        for w in pair:  # one side ended: the whole connection ends
            w.transport.abort()

    def cut(self) -> None:
        for pair in list(self._pairs):
            for w in pair:
                w.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()


class GatedRunner:
    """Emits one event, then runs until ``release`` is set, then succeeds."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        emit_event({"event": "runner_on_ok", "event_data": {"task": "first task"}})
        await self.release.wait()
        self.finished.set()
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={"finished": job.job_id})


def status(rc: RunningController, job_id: str) -> str:
    return str(rc.ctx.jobs.get(job_id, events=False)["status"])


def event_names(rc: RunningController, job_id: str) -> list[str]:
    return [e["event"] for e in rc.ctx.jobs.get(job_id)["events"]]


def spy_held(rc: RunningController, monkeypatch: pytest.MonkeyPatch) -> list[frozenset[str]]:
    """What each Jobs stream of an agent said it holds, as the controller's dispatcher got it."""
    seen: list[frozenset[str]] = []
    real = rc.ctx.jobs.interrupt_unheld_async

    async def spy(node: str, held: Any) -> list[str]:
        seen.append(frozenset(held))
        return await real(node, held)

    monkeypatch.setattr(rc.ctx.jobs, "interrupt_unheld_async", spy)
    return seen


@dataclass
class RelayedJob:
    """An in-process agent behind a ``TcpRelay``, running a gated build job (``runner.release`` ends it)."""

    relay: TcpRelay
    runner: GatedRunner
    sim: SimAgent
    job_id: str
    sessions: int  # the agent's Jobs sessions so far
    held: list[frozenset[str]]  # spy_held


@contextlib.asynccontextmanager
async def relayed_running_job(controller: RunningController, fleet: SimAgents,
                              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RelayedJob]:
    assert controller.ctx.grpc_address
    relay = TcpRelay(controller.ctx.grpc_address)
    await relay.start()
    held = spy_held(controller, monkeypatch)
    runner = GatedRunner()
    try:
        sim = await fleet.start("node-1", "a100", runner=runner, address=relay.address)
        job_id = await controller.ctx.jobs.submit_job("node-1", "build-from-source", {}, timeout=BUILD_TIMEOUT)
        await wait_for(lambda: status(controller, job_id) == "running")
        yield RelayedJob(relay, runner, sim, job_id, sim.agent.sessions, held)
    finally:
        await relay.close()


# ---- a restart: the job is failed at once ----------------------------------------------------------------------


async def test_agent_killed_mid_build_and_restarted_fails_the_job_within_seconds(
        controller: RunningController, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = "sim-a100-k"
    agent = AgentProcess(controller, host, tmp_path / "agent-state", tmp_path / "logs",
                         ["--simulate", "a100", "--executor", "simulated"],
                         env={"FLEET_SIM_JOB_SECONDS": json.dumps({"build-from-source": 600, "*": 0.2})})
    try:
        await agent.start()
        await wait_for(lambda: controller.ctx.jobs.connected(host), timeout=60)
        job_id = await controller.ctx.jobs.submit_job(host, "build-from-source", {"flash_attn_version": "2.8.3"},
                                                      timeout=BUILD_TIMEOUT)
        try:
            await wait_for(lambda: status(controller, job_id) == "running", timeout=20)
        except AssertionError:
            raise AssertionError(f"build never ran: {agent.log_tail()}") from None

        await agent.kill9()  # no result, no goodbye
        await wait_for(lambda: not controller.ctx.jobs.connected(host), timeout=15)
        await asyncio.sleep(0.5)
        assert status(controller, job_id) == "running"  # nothing tells the controller until the agent is back

        loop = asyncio.get_running_loop()
        back = loop.time()
        await agent.start()  # same state dir: the same identity, a new process holding no jobs
        try:
            outcome = await controller.ctx.jobs.wait(job_id, timeout=30)
        except TimeoutError:
            raise AssertionError(f"job still {status(controller, job_id)}: {agent.log_tail()}") from None
        assert loop.time() - back < 30  # seconds after the agent is back, not the job's 90-minute deadline
        assert outcome.status == "failed" and outcome.result == {"interrupted": True}
        assert outcome.error and outcome.error.startswith(f"interrupted: the agent on {host} restarted"), outcome
        assert f"fleetctl job {job_id}" in outcome.error

        # `fleetctl job ID` shows why, as the last event after the agent's own
        rc = await asyncio.to_thread(fleetctl, ["job", job_id, "--json", "--state-dir",
                                                str(controller.ctx.settings.state_dir)])
        shown = json.loads(capsys.readouterr().out)
        assert rc == 0 and shown["status"] == "failed" and shown["error"] == outcome.error
        names = [e["event"] for e in shown["events"]]
        assert names[0] == "fleet_job_started" and names[-1] == INTERRUPTED_EVENT
        assert shown["events"][-1]["data"]["node"] == host

        # the node works: the next job runs on the new process
        nxt = await controller.ctx.jobs.submit_job(host, "install-wheel", {"flash_attn_version": "2.8.3"}, timeout=60)
        assert (await controller.ctx.jobs.wait(nxt, timeout=30)).ok, agent.log_tail()
    finally:
        await agent.close()


# ---- a reconnect: the job is left alone ------------------------------------------------------------------------


async def test_agent_that_reconnects_keeps_its_running_job(controller: RunningController, fleet: SimAgents,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async with relayed_running_job(controller, fleet, monkeypatch) as r:
        relay, runner, sim, job_id, sessions, held = r.relay, r.runner, r.sim, r.job_id, r.sessions, r.held

        relay.cut()  # a network blip: the agent process and its job go on
        await wait_for(lambda: sim.agent.sessions > sessions and len(held) >= 2
                       and controller.ctx.jobs.connected("node-1"))
        assert held[-1] == {job_id}  # the reconnecting agent said it still runs the job...
        await asyncio.sleep(0.3)
        assert status(controller, job_id) == "running"  # ...so it was left alone
        assert INTERRUPTED_EVENT not in event_names(controller, job_id)

        runner.release.set()
        outcome = await controller.ctx.jobs.wait(job_id, timeout=10)
        assert outcome.ok and outcome.result == {"finished": job_id}
        assert event_names(controller, job_id)[-1] == "fleet_job_finished"


async def test_result_of_a_job_finished_while_disconnected_is_delivered_on_reconnect(
        controller: RunningController, fleet: SimAgents, monkeypatch: pytest.MonkeyPatch) -> None:
    async with relayed_running_job(controller, fleet, monkeypatch) as r:
        relay, runner, sim, job_id, sessions, held = r.relay, r.runner, r.sim, r.job_id, r.sessions, r.held

        relay.refuse = True
        relay.cut()  # the controller is unreachable for a while...
        await wait_for(lambda: not controller.ctx.jobs.connected("node-1"))
        runner.release.set()  # ...and the job finishes meanwhile: its result waits in the agent
        await runner.finished.wait()
        await asyncio.sleep(0.5)
        assert status(controller, job_id) == "running"
        assert sim.agent.held_job_ids() == [job_id]

        relay.refuse = False
        outcome = await controller.ctx.jobs.wait(job_id, timeout=15)
        assert outcome.ok and outcome.result == {"finished": job_id}
        assert sim.agent.sessions > sessions
        # the new stream opened while the result was still on its way: the agent named the job as held
        await wait_for(lambda: len(held) >= 2)
        assert job_id in held[1]
        await wait_for(lambda: sim.agent.held_job_ids() == [])
        assert status(controller, job_id) == "successful"
        names = event_names(controller, job_id)
        assert names[-1] == "fleet_job_finished" and INTERRUPTED_EVENT not in names
