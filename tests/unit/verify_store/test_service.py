"""VerificationService without agents: which facts changes count as drift, no pile-up of verify jobs,
nodes held by an active rollout left alone by schedules and drift, offline nodes skipped by selectors."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from fleetctl.controller.context import ControllerContext
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.rollout.models import Rollout, RolloutNode
from fleetctl.controller.settings import ControllerSettings
from fleetctl.controller.store import utcnow
from fleetctl.controller.store.models import Job, Node
from fleetctl.controller.verify_store.service import VerificationService, drift_relevant
from fleetctl.fleet.errors import UsageError
from tests.unit.verify_store.conftest import add_node


@pytest.mark.parametrize(("changed", "relevant"), [
    (["driver.version"], ["driver.version"]), (["torch.version", "torch.cuda"], ["torch.version", "torch.cuda"]),
    (["toolkit.nvcc"], ["toolkit.nvcc"]), (["flash_attn"], ["flash_attn"]), (["flash_attn.version"],
                                                                             ["flash_attn.version"]),
    (["torch"], ["torch"]), (["*"], []), (["gpus[0].uuid", "apt.errors"], []), (["torch.cxx11abi"], ["torch.cxx11abi"]),
])
def test_drift_relevant(changed: list[str], relevant: list[str]) -> None:
    assert drift_relevant(changed) == relevant


@pytest.fixture
def ctx(tmp_path: Path) -> ControllerContext:
    c = ControllerContext(ControllerSettings(state_dir=tmp_path / "c"))
    for h in ("gpu-1", "gpu-2", "gpu-3"):
        add_node(c.store, h)
    c.registry.load()
    return c


async def test_no_pile_up_and_rollout_nodes_left_alone(ctx: ControllerContext) -> None:
    svc = VerificationService(ctx)
    first = (await svc.submit(["gpu-1"], mode="quick")).jobs
    again = (await svc.submit(["gpu-1", "gpu-2"], mode="quick")).jobs
    assert again["gpu-1"] == first["gpu-1"] and again["gpu-2"] != first["gpu-1"]
    with ctx.store.session() as s:
        now = utcnow()
        s.add(Rollout(id="r-1", version="2.8.3", status="running", created_by="t", created_at=now, updated_at=now))
        s.flush()
        s.add(RolloutNode(rollout_id="r-1", hostname="gpu-3", batch=0, plan={}, state="install", updated_at=now))
    scheduled = (await svc.submit(selector="gpu-*", mode="quick", trigger="schedule")).jobs
    assert sorted(scheduled) == ["gpu-1", "gpu-2"]  # gpu-3 is mid-rollout
    manual = (await svc.submit(["gpu-3"], mode="quick")).jobs
    assert list(manual) == ["gpu-3"]  # an operator may still verify it
    with ctx.store.session() as s:
        vars_ = {j.node: j.vars for j in s.scalars(select(Job).where(Job.kind == "verify"))}
    assert vars_["gpu-3"]["trigger"] == "manual" and vars_["gpu-1"]["mode"] == "quick"
    ctx.close()


async def test_offline_nodes_skipped_by_selectors(ctx: ControllerContext) -> None:
    svc = VerificationService(ctx)
    for h in ("gpu-1", "gpu-2", "gpu-3"):
        ctx.registry.set_status(h, NodeStatus.OFFLINE, "test")
    with pytest.raises(UsageError, match="offline"):
        await svc.submit(selector="gpu-*")
    assert list((await svc.submit(["gpu-2"])).jobs) == ["gpu-2"]  # named explicitly: queued for its return
    with pytest.raises(UsageError, match="unknown node"):
        await svc.submit(["nope"])
    ctx.close()


async def test_a_node_with_unreadable_facts_is_skipped_with_the_reason(ctx: ControllerContext) -> None:
    """Stored facts that no longer parse (an older version's row, corruption) leave nothing to expect of the
    node: a scheduled run and a manual one queue the other nodes and say why that one was skipped."""
    svc = VerificationService(ctx)
    with ctx.store.session() as s:
        node = s.scalars(select(Node).where(Node.hostname == "gpu-2")).one()
        node.facts = {**node.facts, "gpus": [{"name": "NVIDIA H100", "index": "zero"}]}
    done = await svc.submit(selector="gpu-*", mode="quick", trigger="schedule")
    assert sorted(done.jobs) == ["gpu-1", "gpu-3"]
    assert list(done.skipped) == ["gpu-2"] and "stored facts unreadable at gpus" in done.skipped["gpu-2"]
    jobs, note = await svc.submit_for_schedule("gpu-2", "quick", schedule_id=1, run_id=1)
    assert jobs == {} and note is not None and note.startswith("gpu-2 skipped: stored facts unreadable")
    with ctx.store.session() as s:
        assert sorted(s.scalars(select(Job.node).where(Job.kind == "verify"))) == ["gpu-1", "gpu-3"]
    ctx.close()
