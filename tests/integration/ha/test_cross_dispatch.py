"""A job submitted through one controller reaches an agent connected to another (controller/jobs.py
``claim_pending``): two controller processes on one PostgreSQL database, agents on A, ``fleetctl verify`` through
B. Each job is sent once, run once, its result recorded once (by A, which received it) and seen by B."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.ha.test_shared_liveness import _query
from tests.integration.rollout.controller_proc import (
    ControllerProc,
    all_online,
    api,
    start_agents,
    stop_agents,
    until,
)
from tests.integration.rollout.simrunner import Script

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(150)]

NODES = [("node-0", "a100"), ("node-1", "h100")]


async def test_job_submitted_on_b_reaches_the_agent_on_a_once(pg_url: str, tmp_path: Path) -> None:
    a = ControllerProc(tmp_path / "a" / "controller", db=pg_url)
    b = ControllerProc(tmp_path / "b" / "controller", db=pg_url)
    script = Script()
    agents = []
    a.start()
    b.start()
    try:
        await a.ready()
        await b.ready()
        agents = await start_agents(a, NODES, script, tmp_path)
        await until(lambda: all_online(b, len(NODES)), 30)

        loop = asyncio.get_running_loop()
        submitted = loop.time()
        out = await api(b, "POST", "/verify", {"hosts": [h for h, _ in NODES], "mode": "quick"})
        job_ids = list(out["jobs"].values())
        assert len(job_ids) == len(NODES), out

        async def finished_on_b() -> bool:
            jobs = [await api(b, "GET", f"/jobs/{job_id}") for job_id in job_ids]
            return all(j["status"] == "successful" for j in jobs)

        await until(finished_on_b, 60, interval=0.1)
        took = loop.time() - submitted
        ran = Counter(job_id for _, kind, job_id in script.ran if kind == "verify")
        assert sorted(ran) == sorted(job_ids) and set(ran.values()) == {1}, ran  # each sent and run once
        recorded = _query(pg_url, "SELECT job_id FROM verifications")
        assert sorted(j for (j,) in recorded) == sorted(job_ids), recorded  # recorded once each
        print(f"\n{len(job_ids)} verify jobs submitted through B, run by A's agents: succeeded on B after {took:.1f}s")
    finally:
        await stop_agents(agents)
        b.stop()
        a.stop()
