"""Two controller processes on one PostgreSQL database judge every node's liveness the same way (issue 17).

The reported bug: controller B started on A's database heard no heartbeat (every agent is connected to A), so
its sweep turned every node ``offline`` in ``nodes``; A, whose memory still said online, never wrote them back:
A's CLI said online, its ``/metrics`` offline, and every rollout refused the nodes — minutes later. Liveness is
now an agent-session lease in the database (``agent_sessions``), renewed by the controller that hears the
agent and judged by the database's clock, so B leaves alone the nodes A holds.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.rollout.controller_proc import (
    ControllerProc,
    all_online,
    api,
    start_agents,
    stop_agents,
    until,
)
from tests.integration.rollout.simrunner import Script

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

HEARTBEAT = 0.5
MISSED = 4  # offline after 2 s without a heartbeat
OFFLINE_AFTER = HEARTBEAT * MISSED
NODES = [(f"node-{i}", "a100") for i in range(5)]


def _pg(url: str) -> tuple[str, str]:
    """(libpq conninfo, schema) of a pg_url fixture URL."""
    schema = url.rsplit("search_path%3D", 1)[1]
    return "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3", schema


def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` in the test's schema, read straight from PostgreSQL (not through a controller)."""
    conninfo, schema = _pg(url)
    with psycopg.connect(conninfo, options=f"-csearch_path={schema}") as conn:
        return conn.execute(sql).fetchall()


def db_statuses(url: str) -> dict[str, str]:
    return dict(_query(url, "SELECT hostname, status FROM nodes"))


async def metrics_nodes(cp: ControllerProc) -> dict[str, float]:
    token = (cp.state / "admin.token").read_text().strip()
    async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {token}"}) as c:
        text = (await c.get(f"{cp.url}/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("fleet_nodes{status="):
            label, value = line.split("} ")
            out[label.split('"')[1]] = float(value)
    return out


async def test_second_controller_starting_and_stopping_leaves_nodes_online(pg_url: str, tmp_path: Path) -> None:
    a = ControllerProc(tmp_path / "a" / "controller", HEARTBEAT, db=pg_url, missed=MISSED)
    b = ControllerProc(tmp_path / "b" / "controller", HEARTBEAT, db=pg_url, missed=MISSED)
    a.start()
    agents = []
    try:
        await a.ready()
        agents = await start_agents(a, NODES, Script(), tmp_path)
        await until(lambda: all_online(a, len(NODES)), 30)

        b.start()
        await b.ready()
        # B hears no agent: give it three offline windows past its own start-up grace window to get it wrong
        await asyncio.sleep(OFFLINE_AFTER * 4)
        assert await all_online(b, len(NODES)), "controller B judges A's nodes offline"
        assert set(db_statuses(pg_url).values()) == {"online"}, db_statuses(pg_url)
        b.stop()
        await asyncio.sleep(OFFLINE_AFTER * 2)

        assert db_statuses(pg_url) == {h: "online" for h, _ in NODES}
        assert await all_online(a, len(NODES)), (await api(a, "GET", "/nodes"))["nodes"]
        counts = await metrics_nodes(a)
        assert counts.get("online") == len(NODES) and counts.get("offline") == 0, counts
        plan = await api(a, "POST", "/rollouts", {"dry_run": True})
        assert "node offline at rollout start" not in json.dumps(plan), plan
    finally:
        await stop_agents(agents)
        b.stop()
        a.stop()


async def _statuses(cp: ControllerProc) -> dict[str, str]:
    return {n["hostname"]: n["status"] for n in (await api(cp, "GET", "/nodes"))["nodes"]}


async def test_kill9_of_the_holder_offlines_its_nodes_only_once_their_leases_expire(pg_url: str,
                                                                                    tmp_path: Path) -> None:
    """Controller A (holding every agent's session) is killed with SIGKILL: controller B turns the nodes offline
    once their leases have expired — never within an offline window of their last heartbeat — and when the
    agents come back through B (same CA: B's state dir holds a copy of A's ``ca/``, docs/ha.md) they are online
    again. Prints the fail-over figures docs/ha.md quotes."""
    a = ControllerProc(tmp_path / "a" / "controller", HEARTBEAT, db=pg_url, missed=MISSED)
    b = ControllerProc(tmp_path / "b" / "controller", HEARTBEAT, db=pg_url, missed=MISSED)
    a.start()
    agents = []
    try:
        await a.ready()
        shutil.copytree(a.state / "ca", b.state / "ca")
        b.start()
        await b.ready()
        agents = await start_agents(a, NODES, Script(), tmp_path)
        await until(lambda: all_online(a, len(NODES)), 30)
        await until(lambda: all_online(b, len(NODES)), 30)

        loop = asyncio.get_running_loop()
        a.kill9()
        killed = loop.time()
        await stop_agents(agents)  # their controller is gone; they come back through B below
        agents = []

        async def all_offline() -> bool:
            return set((await _statuses(b)).values()) == {"offline"}

        await until(all_offline, 30, interval=0.05)
        offline_after_kill = loop.time() - killed
        reasons = [r for (r,) in _query(pg_url, "SELECT reason FROM node_events WHERE new_status = 'offline'")]
        assert len(reasons) == len(NODES), reasons  # each node turned offline once
        assert all("session lease of controller" in r and "expired" in r for r in reasons), reasons
        # heartbeats ran up to the kill: a node judged offline sooner than one window after it was judged too early
        assert offline_after_kill >= OFFLINE_AFTER, offline_after_kill

        back = loop.time()
        agents = await start_agents(b, NODES, Script(), tmp_path)
        await until(lambda: all_online(b, len(NODES)), 30, interval=0.05)
        online_again = loop.time() - back
        holders = [h for (h,) in _query(pg_url, "SELECT DISTINCT controller_id FROM agent_sessions")]
        assert b.proc is not None and [h.split(":")[1] for h in holders] == [str(b.proc.pid)], holders
        print(f"\nfail-over figures (heartbeat {HEARTBEAT}s × {MISSED}, flush 2s): nodes offline "
              f"{offline_after_kill:.1f}s after the kill of their controller; online through the other "
              f"{online_again:.1f}s after their agents reconnected")
    finally:
        await stop_agents(agents)
        b.stop()
        a.stop()
