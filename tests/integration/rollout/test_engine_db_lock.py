"""The rollout engine under an outside database lock (issue 13, docs/security.md "Availability and faults").

A rollout runs (real store, dispatcher, resolver and engine; fake agents of controller/testing.py, whose
database calls go through the pool as the gRPC servicer's do, sent again on a database error as an agent's
are) and another connection holds SQLite's ``BEGIN EXCLUSIVE`` for ~6 s while nodes are in their steps.
The engine's database work runs on the store's pool, so the event loop's longest stall stays under 1 s (it
was the 5 s lock timeout, once per blocked statement, when the engine's sessions ran on the loop);
afterwards the rollout completes with every step run once: no job lost, none submitted twice, no
transition recorded twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.loop_monitors import LoopLag
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.models import RolloutTransition
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import FakeFleet
from tests.integration.fleet.test_db_faults import hold_lock
from tests.unit.rollout.wait import wait_for

pytestmark = pytest.mark.timeout(120)

LOCK_SECONDS = 6.0
FLEET = [("a100-1", "a100"), ("a100-2", "a100"), ("a100-3", "a100"), ("h100-1", "h100"), ("h100-2", "h100"),
         ("l40s-1", "l40s"), ("l40s-2", "l40s")]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FakeFleet]:
    f = FakeFleet.create(tmp_path / "controller")
    # steps long enough that the lock lands while nodes are in them, short enough for a quick test
    f.kind_seconds.update({"install-wheel": 1.5, "verify": 1.5, "build-from-source": 1.5})
    await f.add_nodes(load_profile(profile, host) for host, profile in FLEET)
    yield f
    await f.close()


async def _status(f: FakeFleet, rid: str) -> dict[str, Any]:
    # off the loop: the test's own reads must not count as the controller's stall
    out: dict[str, Any] = await asyncio.to_thread(service.get_status, f.ctx.store, rid)
    return out


def _transitions(f: FakeFleet, rid: str) -> list[tuple[str, str, str]]:
    with f.ctx.store.session() as s:
        return [(t.hostname, t.from_state, t.to_state) for t in s.scalars(
            select(RolloutTransition).where(RolloutTransition.rollout_id == rid).order_by(RolloutTransition.id))]


async def test_outside_lock_stalls_no_loop_and_loses_no_step(fleet: FakeFleet) -> None:
    out = await asyncio.to_thread(service.start_rollout, fleet.ctx.store,
                                  RolloutRequest(nodes="gpu=A100,gpu=H100,gpu=L40S", canary=0, batch="100%"))
    rid = out["id"]
    lag = LoopLag(period=0.02)
    ticker = asyncio.create_task(lag.run(), name="loop-lag")
    engine = fleet.new_engine(tick=0.1)
    task = asyncio.create_task(engine.run(), name="rollout-engine")
    try:
        in_step: list[str] = []

        async def steps_running() -> bool:
            st = await _status(fleet, rid)
            in_step[:] = [n["hostname"] for n in st["nodes"] if n["in_step"] and n["job_id"]]
            return len(in_step) >= 2

        deadline = time.monotonic() + 30
        while not await steps_running():
            assert time.monotonic() < deadline, "no node reached a step"
            await asyncio.sleep(0.05)

        locked = threading.Event()
        holder = asyncio.create_task(asyncio.to_thread(hold_lock, fleet.ctx.store, locked, LOCK_SECONDS))
        await wait_for(locked.is_set, timeout=10)
        lag.reset()
        await holder  # the engine ticks, node steps finish and their results come in, all against the lock
        stall_ms = lag.summary().get("max_ms", 0.0)
        print(f"\nsqlite: lock held {LOCK_SECONDS:g}s with {len(in_step)} node(s) in steps; "
              f"event loop stall max {stall_ms:.0f} ms ({len(lag.samples)} samples)")
        assert stall_ms < 1000, f"the event loop stalled {stall_ms:.0f} ms during the lock: it waited on the database"

        st = await _status(fleet, rid)
        t_end = time.monotonic() + 60
        while st["status"] not in ("succeeded", "partial", "paused", "aborted"):
            assert time.monotonic() < t_end, f"rollout stuck after the lock: {st['status']}"
            await asyncio.sleep(0.1)
            st = await _status(fleet, rid)
    finally:
        task.cancel()
        ticker.cancel()
        for t in (task, ticker):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    assert st["status"] == "succeeded", st["reason"]
    assert {n["state"] for n in st["nodes"]} == {"done"}, {n["hostname"]: n["cause"] for n in st["nodes"]}
    counts = await asyncio.to_thread(fleet.job_counts)
    doubled = {k: v for k, v in counts.items() if v != 1}
    assert not doubled, f"steps submitted more than once: {doubled}"
    hosts = {n["hostname"] for n in st["nodes"]}
    assert {h for h, k in counts if k == "verify"} == hosts  # every node verified: nothing lost
    moves = await asyncio.to_thread(_transitions, fleet, rid)
    assert len(moves) == len(set(moves)), "a transition was recorded twice"
