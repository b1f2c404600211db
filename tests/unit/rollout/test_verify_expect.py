"""A rollout verifies what its plan installs: the verify job's ``expect`` comes from the node's plan variant
(``fleet.verification.expect_for_variant``, the rule ``fleetctl verify`` uses too), so ``--fa4`` on a node that
has FA2 is judged on FA4 — the gap the real H200 run found (tests/fixtures/h200_attention_fa2: its verify job had
no ``expect`` and bench.py verified FA2). The simulated fleet installs FA4 beside the FA2 (facts
``flash_attn.beside``) and judges by ``expect`` as bench.py does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import select

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.rollout.core import State
from fleetctl.controller.rollout.engine import RolloutEngine
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store.models import Job
from fleetctl.controller.testing import FakeFleet, JobScript
from fleetctl.fleet.facts import FlashAttnFacts

pytestmark = pytest.mark.timeout(60)

FA2 = FlashAttnFacts("2.8.3", "fa2")


@pytest.mark.parametrize("variant,expect", [("fa2-wheel", "flash_attn"), ("fa2-source", "flash_attn"),
                                            ("fa1-source", "flash_attn"), ("fa3-source", "fa3"), ("fa4", "fa4")])
@pytest.mark.parametrize("verify_mode", [None, "full"])
def test_the_verify_job_expects_what_the_plan_installs(variant: str, expect: str, verify_mode: str | None) -> None:
    """``_job_vars`` as the engine calls it for the verify step of every variant a rollout installs (sdpa and
    blocked nodes are skipped: they never reach verify)."""
    node = SimpleNamespace(hostname="n1", attempt=1, build_key=None, previous=None,
                           plan={"python": "/opt/venv/bin/python", "variant": variant, "decision": {}})
    rollout = SimpleNamespace(id="r1", options={"verify_mode": verify_mode} if verify_mode else {})
    plan = SimpleNamespace(version="2.8.3", variant=variant)
    got = RolloutEngine._job_vars(cast(Any, SimpleNamespace(artifacts=None)), cast(Any, None), cast(Any, rollout),
                                  cast(Any, node), cast(Any, plan), State.VERIFY)
    assert got["expect"] == expect
    assert got.get("mode") == verify_mode  # the bench mode goes along as before, when the rollout names one


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FakeFleet]:
    f = FakeFleet.create(tmp_path / "controller", engine_tick=0.05, job_seconds=0.02)
    facts = load_profile("h100-cu130", "h100-fa2")  # torch 2.11 cu130: flash-attn-4 runs there
    await f.add_node(replace(facts, flash_attn=FA2))
    await f.start_engine()
    yield f
    await f.close()


async def _fa4_rollout(fleet: FakeFleet) -> tuple[dict[str, Any], dict[str, Any]]:
    """``fleetctl rollout flash-attn --fa4`` on the FA2 node; its status and its verify job."""
    rid = await fleet.start_rollout(RolloutRequest(nodes="h100-fa2", fa4=True, canary=0, batch="100%"))
    st = await fleet.wait_rollout(rid, "succeeded", "partial", "failed", "paused")
    with fleet.ctx.store.session() as s:
        (job_id,) = s.scalars(select(Job.id).where(Job.node == "h100-fa2", Job.kind == "verify")).all()
    return st, fleet.ctx.jobs.get(job_id)


async def test_fa4_beside_fa2_is_verified_on_fa4_and_passes_when_it_works(fleet: FakeFleet) -> None:
    st, job = await _fa4_rollout(fleet)
    (node,) = st["nodes"]
    assert (node["variant"], st["status"], node["state"]) == ("fa4", "succeeded", "done"), node["cause"]
    assert job["vars"]["expect"] == "fa4"
    verification = job["result"]["verification"]
    assert verification["expect"] == "fa4" and verification["passed"] is True
    assert verification["flash_attn"]["impl"] == "fa4" and verification["flash_attn"]["import_ok"] is True
    # FA2 is still there, beside it, and measured too; the node's facts say both
    found = {i["impl"]: (i["import_ok"], i["version"]) for i in verification["flash_attn_implementations"]}
    assert found["flash_attn"] == (True, "2.8.3") and found["fa4"][0] is True
    assert {e["impl"] for e in verification["speed"]} >= {"flash_attn", "fa4"}
    facts = fleet.agents["h100-fa2"].facts.flash_attn
    assert facts is not None and (facts.version, facts.variant) == ("2.8.3", "fa2")
    assert [b.variant for b in facts.beside] == ["fa4"]


async def test_fa4_that_does_not_import_fails_the_node_although_fa2_works(fleet: FakeFleet) -> None:
    error = "ModuleNotFoundError: No module named 'cutlass' (simulated)"
    fleet.script("h100-fa2", "verify", JobScript(import_error=error, import_error_of="fa4"))
    st, job = await _fa4_rollout(fleet)
    (node,) = st["nodes"]
    assert job["vars"]["expect"] == "fa4"
    assert node["state"] == "failed" and st["status"] != "succeeded"
    assert node["cause"].startswith("verification failed: fa4 (flash_attn.cute) import failed: ")
    assert "No module named 'cutlass'" in node["cause"]
    verification = job["result"]["verification"]
    found = {i["impl"]: i["import_ok"] for i in verification["flash_attn_implementations"]}
    assert found == {"flash_attn": True, "fa4": False}  # FA2 imports and runs: it does not save the FA4 rollout
    assert any(e["impl"] == "flash_attn" and e["status"] == "ok" for e in verification["speed"])
