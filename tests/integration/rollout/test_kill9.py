"""kill -9 of the controller process mid-rollout, twice: on restart the rollout resumes where it was —
no finished step redone, no step run twice, the build job re-attached rather than resubmitted.

The controller runs as a real subprocess (`fleet-controller serve`, SQLite in a temp state dir); the
agents are real (in this process, over gRPC mTLS) with the simulated executor, and survive the
controller's death by reconnecting to the restarted one on the same ports."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.rollout.controller_proc import (
    all_online,
    api,
    controller_proc,
    start_agents,
    stop_agents,
    until,
)
from tests.integration.rollout.simrunner import Script

pytestmark = pytest.mark.timeout(240)

NODES = [("t4-1", "t4"), ("t4-2", "t4"), ("t4-3", "t4"), ("a100-1", "a100"), ("a100-2", "a100")]


async def test_kill9_mid_rollout_resumes(tmp_path: Path) -> None:
    script = Script(delays={"build-from-source": 6.0, "install-wheel": 1.0, "verify": 0.3})
    async with controller_proc(tmp_path) as cp:
        agents = await start_agents(cp, NODES, script, tmp_path)
        try:
            await until(lambda: all_online(cp, len(NODES)), 30)
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
            await stop_agents(agents)
        assert st["status"] == "succeeded", json.dumps(st, indent=1)[:3000]
        # only the rollout's jobs: the controller may also re-verify nodes on its own (drift after install)
        jobs = [j for j in (await api(cp, "GET", "/jobs?limit=1000"))["jobs"] if j["vars"].get("rollout_id") == rid]
        ours = {j["id"] for j in jobs}
        ran = Counter((h, k) for h, k, job_id in script.ran if job_id in ours)
        assert [k for k, n in ran.items() if n > 1] == []  # no step ran twice on any node
        assert sum(1 for (_, k) in ran if k == "build-from-source") == 1  # built once, re-attached
        per = Counter((j["node"], j["kind"]) for j in jobs)
        assert [k for k, n in per.items() if n > 1] == []  # never resubmitted
        # the transition log of every node is a clean walk: no state entered twice
        for host, _ in NODES:
            seq = [t["to"] for t in st["transitions"] if t["hostname"] == host]
            assert len(seq) == len(set(seq)), (host, seq)
            assert seq[-1] == "done"
