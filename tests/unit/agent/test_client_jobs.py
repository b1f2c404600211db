"""The agent's job bookkeeping (agent/client.py) against a scripted stub: which jobs it holds, and results
that survive a session ending in the middle of the call that delivers them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import pytest

from fleetctl.agent.client import Agent, AgentConfig
from fleetctl.agent.profiles import load_profile
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.v1 import fleet_pb2 as pb

pytestmark = pytest.mark.timeout(30)


class CuttingStub:
    """Answers like the controller, except that the first ``cuts[rpc]`` calls of an RPC end the way grpc.aio
    ends a call whose channel is closed under it (the session ended because the controller went away):
    ``asyncio.CancelledError`` in a task nobody cancelled."""

    def __init__(self, cuts: dict[str, int]) -> None:
        self.cuts = dict(cuts)
        self.events: list[pb.JobEvent] = []
        self.results: list[pb.JobResult] = []
        self.held_at_complete: list[list[str]] = []
        self.agent: Agent | None = None

    def _cut(self, rpc: str) -> None:
        if self.cuts.get(rpc, 0) > 0:
            self.cuts[rpc] -= 1
            raise asyncio.CancelledError()

    async def ReportJobEvents(self, batch: Iterable[pb.JobEvent], timeout: float | None = None) -> pb.JobEventsAck:
        items = list(batch)
        await asyncio.sleep(0)
        self._cut("ReportJobEvents")
        self.events.extend(items)
        return pb.JobEventsAck(received=len(items))

    async def CompleteJob(self, msg: pb.JobResult, timeout: float | None = None) -> pb.JobResultAck:
        await asyncio.sleep(0)
        assert self.agent is not None
        self.held_at_complete.append(self.agent.held_job_ids())
        self._cut("CompleteJob")
        self.results.append(msg)
        return pb.JobResultAck()


class Gate:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        emit_event({"event": "runner_on_ok", "event_data": {"task": "t"}})
        await self.release.wait()
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={"ok": True})


def connected_agent(tmp_path: Path, stub: CuttingStub, runner: Gate) -> Agent:
    facts = load_profile("a100", "n1")
    agent = Agent(AgentConfig(controller="127.0.0.1:1", state_dir=tmp_path, facts=lambda: facts, runner=runner,
                              backoff_initial=0.01, backoff_max=0.02))
    stub.agent = agent
    agent._stub = cast(Any, stub)  # a live session
    agent._connected.set()
    return agent


async def test_result_cut_off_mid_delivery_is_sent_again_and_the_job_held_until_then(tmp_path: Path) -> None:
    stub = CuttingStub({"ReportJobEvents": 2, "CompleteJob": 2})
    runner = Gate()
    agent = connected_agent(tmp_path, stub, runner)
    agent._held.add("j1")  # as the Jobs stream does when the job arrives
    task = asyncio.create_task(agent._run_job(JobSpec("j1", "install-wheel")))
    await asyncio.sleep(0.05)
    assert agent.held_job_ids() == ["j1"]  # running: the next Jobs stream names it
    runner.release.set()
    await asyncio.wait_for(task, 5)
    assert [r.status for r in stub.results] == ["successful"]  # delivered in the end, not lost
    assert stub.held_at_complete == [["j1"]] * 3  # still held while its result was on its way
    assert [e.event for e in stub.events] == ["fleet_job_started", "runner_on_ok", "fleet_job_finished"]
    assert agent.held_job_ids() == []


async def test_stopping_the_agent_still_cancels_a_job(tmp_path: Path) -> None:
    stub = CuttingStub({})
    agent = connected_agent(tmp_path, stub, Gate())
    agent._held.add("j2")
    task = asyncio.create_task(agent._run_job(JobSpec("j2", "build-from-source")))
    await asyncio.sleep(0.05)
    task.cancel()  # what Agent.run does on SIGTERM
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stub.results == [] and agent.held_job_ids() == []
