"""kill -9 of the controller in the middle of a built wheel's upload (64 MB): the agent keeps the wheel,
reconnects to the restarted controller, continues the upload from the bytes the controller kept (not from 0),
and the build — and every node waiting on it — succeeds, with the build run once.

Before durable uploads the upload was tried once: the kill failed the build (25 minutes on a real GPU node)
and every node of its build key, and left the partial file in the controller's state dir."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.client import Agent
from fleetctl.fleet.v1 import fleet_pb2 as pb
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

WHEEL_BYTES = 64 * 1024 * 1024
NODES = [("t4-1", "t4"), ("t4-2", "t4")]


async def test_controller_killed_mid_upload_agent_resumes_and_build_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    streams: list[tuple[int, int]] = []  # (first offset, bytes sent) per stream
    real = Agent._upload_stream

    async def paced(self: Agent, *a: Any, **k: Any) -> AsyncIterator[pb.ArtifactChunk]:
        # loopback moves 64 MB in a fraction of a second; pace it like a real link so the kill lands mid-upload
        n = 0
        async for chunk in real(self, *a, **k):
            if n == 0:
                streams.append((chunk.offset, 0))
            n += 1
            streams[-1] = (streams[-1][0], streams[-1][1] + len(chunk.data))
            if n % 8 == 0:
                await asyncio.sleep(0.02)
            yield chunk

    monkeypatch.setattr(Agent, "_upload_stream", paced)
    script = Script(delays={"build-from-source": 0.5, "install-wheel": 0.2, "verify": 0.2},
                    wheel_bytes=WHEEL_BYTES)
    async with controller_proc(tmp_path) as cp:
        agents = await start_agents(cp, NODES, script, tmp_path)
        tmp_dir = cp.state / "artifacts" / "tmp"
        try:
            await until(lambda: all_online(cp, len(NODES)), 30)
            rid = (await api(cp, "POST", "/rollouts", {"canary": 0, "batch": "100%", "actor": "tester"}))["id"]

            async def partial_grown() -> bool:
                return any(p.name.startswith("partial-") and p.stat().st_size > 16 * 1024 * 1024
                           for p in tmp_dir.glob("*"))

            await until(partial_grown, 60, interval=0.02)
            cp.kill9()
            held = max(p.stat().st_size for p in tmp_dir.glob("partial-*"))
            assert 0 < held < WHEEL_BYTES
            await asyncio.sleep(0.5)
            cp.start()
            await cp.ready()

            async def finished() -> dict[str, Any] | None:
                st: dict[str, Any] = await api(cp, "GET", f"/rollouts/{rid}")
                return st if not st["active"] else None

            st = await until(finished, 120)
        finally:
            await stop_agents(agents)
        log = (cp.state.parent / "controller-2.log").read_text(errors="replace")
        assert st["status"] == "succeeded", json.dumps(st, indent=1)[:3000] + log[-3000:]
        assert sum(1 for _, k, _ in script.ran if k == "build-from-source") == 1  # built once
        assert Counter(k for _, k, _ in script.ran)["install-wheel"] >= 1  # the waiting node got the wheel
        # the second stream continued where the controller's partial file ended: nothing resent from 0
        assert len(streams) >= 2 and streams[-1][0] > 0, streams
        assert streams[-1][0] + streams[-1][1] == WHEEL_BYTES
        assert "resumed at byte" in log
        arts = (await api(cp, "GET", "/artifacts"))["artifacts"]
        assert [a["size"] for a in arts if a["kind"] == "wheel"] == [WHEEL_BYTES]
        assert list(tmp_dir.glob("*")) == []  # no partial file left behind
