"""Two rollout engines (as two controller processes would run them) on one database (SQLite, PostgreSQL) at
once: the rollout's lease (``rollout:<id>`` in ``leases``) lets one drive while the other stands by, and fences
every write of the one that drives — each (node, step) job is submitted exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import pytest

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.testing import FakeFleet
from tests.unit.rollout.wait import wait_for

pytestmark = pytest.mark.timeout(120)


async def test_two_engines_never_run_a_step_twice(db_url: str, tmp_path: Path) -> None:
    fleet = FakeFleet.create(tmp_path / "controller", db_url)
    nodes = [(f"l40s-{i}", "l40s") for i in range(4)] + [(f"a100-{i}", "a100") for i in range(6)] + \
        [(f"t4-{i}", "t4") for i in range(3)]
    await fleet.add_nodes(load_profile(profile, host) for host, profile in nodes)
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(batch="3,50%"))
    engines = [fleet.new_engine(owner=f"host-{i}:{i}:x", lease_ttl=2.0, tick=0.02) for i in range(2)]
    tasks = [asyncio.create_task(e.run()) for e in engines]
    try:
        await wait_for(lambda: not service.get_status(fleet.ctx.store, out["id"])["active"], timeout=90)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        st = service.get_status(fleet.ctx.store, out["id"])
        counts = Counter(fleet.job_counts())
        await fleet.close()
    assert st["status"] == "succeeded", st["reason"]
    assert all(v == 1 for v in counts.values()), counts
    assert sum(1 for (_, k) in counts if k == "build-from-source") == 2
    drivers = {t["actor"] for t in st["transitions"]}
    assert drivers <= {"engine", "admin"}
