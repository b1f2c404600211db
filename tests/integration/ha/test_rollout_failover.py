"""A rollout survives the kill -9 of the controller driving it: two controller processes on one PostgreSQL
database (one CA: B's state dir holds a copy of A's ``ca/``), the agents enrolled through A and given both
controllers (``--controller A,B``: they stay on A while it lives). Whichever controller's engine drives the rollout
is killed mid-rollout; when that is A its agents fail over to B by themselves, their running jobs kept. The other
controller takes the rollout over and finishes it: every node done, no step run twice, no job submitted twice for
a node and step."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

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

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(240)]

NODES = [("a100-1", "a100"), ("a100-2", "a100"), ("h100-1", "h100"), ("h100-2", "h100"), ("l40s-1", "l40s")]


async def test_rollout_moves_to_the_other_controller_after_kill9(pg_url: str, tmp_path: Path) -> None:
    script = Script(delays={"install-wheel": 1.5, "verify": 0.5})
    a = ControllerProc(tmp_path / "a" / "controller", db=pg_url)  # rollout lease TTL 5 s
    b = ControllerProc(tmp_path / "b" / "controller", db=pg_url)
    agents = []
    a.start()
    try:
        await a.ready()
        shutil.copytree(a.state / "ca", b.state / "ca")
        b.start()
        await b.ready()
        agents = await start_agents(a, NODES, script, tmp_path)
        both = f"127.0.0.1:{a.ports['grpc']},127.0.0.1:{b.ports['grpc']}"
        for agent, _, _ in agents:
            agent.cfg.controller = both  # read at each dial: from now on they know both controllers
        await until(lambda: all_online(b, len(NODES)), 30)

        rid = (await api(a, "POST", "/rollouts", {"canary": 0, "batch": "100%", "actor": "tester"}))["id"]

        async def installing() -> bool:
            st = await api(a, "GET", f"/rollouts/{rid}")
            return any(n["state"] == "install" and n["in_step"] for n in st["nodes"])

        await until(installing, 30)
        [(owner,)] = _query(pg_url, f"SELECT holder FROM leases WHERE name = 'rollout:{rid}'")
        assert a.proc is not None and b.proc is not None
        driver, other = (a, b) if f":{a.proc.pid}:" in owner else (b, a)
        loop = asyncio.get_running_loop()
        driver.kill9()  # when that is A, its agents fail over to B by themselves, holding their running jobs
        killed = loop.time()

        async def taken_over() -> bool:
            [(now_owner,)] = _query(pg_url, f"SELECT holder FROM leases WHERE name = 'rollout:{rid}'")
            return bool(now_owner) and now_owner != owner

        await until(taken_over, 30, interval=0.05)
        moved = loop.time() - killed
        reattached = "-"
        if driver is a:  # its agents now report to B: their session leases are held by B

            async def all_on_b() -> bool:
                holders = [h for (h,) in _query(pg_url, "SELECT controller_id FROM agent_sessions")]
                return len(holders) == len(NODES) and all(f":{b.proc.pid}:" in h for h in holders if b.proc)

            await until(all_on_b, 30, interval=0.05)
            reattached = f"{loop.time() - killed:.1f}s"

        async def finished() -> dict[str, Any] | None:
            st: dict[str, Any] = await api(other, "GET", f"/rollouts/{rid}")
            return st if not st["active"] else None

        st = await until(finished, 90)
        done = loop.time() - killed
    finally:
        await stop_agents(agents)
        b.stop()
        a.stop()
    assert st["status"] == "succeeded", json.dumps(st, indent=1)[:3000]
    jobs = _query(pg_url, "SELECT id, node, kind, status FROM jobs")
    ours = {job_id for job_id, _, _, _ in jobs}
    ran = Counter((h, k) for h, k, job_id in script.ran if job_id in ours)
    assert [k for k, n in ran.items() if n > 1] == [], ran  # no step ran twice on any node
    per = Counter((node, kind) for _, node, kind, status in jobs if status == "successful")
    assert [k for k, n in per.items() if n > 1] == [], per  # no step succeeded twice
    assert all(n["state"] == "done" for n in st["nodes"]), [(n["hostname"], n["state"]) for n in st["nodes"]]
    print(f"\nrollout driven by controller {'A' if driver is a else 'B'} (killed): taken over by the other "
          f"{moved:.1f}s after the kill (same host: a dead owner's pid is seen at once; across hosts the lease TTL, "
          f"5 s, runs out first), finished {done:.1f}s after it; its agents' sessions held by the other after "
          f"{reattached}")
