"""The engine against the real controller (store, job dispatcher, registry, resolver, artifact store), with fake
agents at the dispatcher seam (controller.testing): enrolled, registered through the registry, reporting their
facts after every job as a real agent does."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.artifacts import Provenance
from fleetctl.controller.leases import Held, Lease, LeaseLost, acquire, db_now
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.engine import RolloutEngine, rollout_lease
from fleetctl.controller.rollout.models import Build, RolloutNode, RolloutTransition
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store.models import Job
from fleetctl.controller.testing import FakeFleet, JobScript
from fleetctl.fleet.errors import ConflictError, NotFoundError, UsageError
from fleetctl.fleet.facts import FlashAttnFacts
from tests.unit.rollout.wait import wait_for

pytestmark = pytest.mark.timeout(60)

FLEET = [("a100-1", "a100"), ("a100-2", "a100"), ("a100-3", "a100"), ("h100-1", "h100"), ("h100-2", "h100"),
         ("l40s-1", "l40s"), ("l40s-2", "l40s"), ("l40s-3", "l40s"), ("t4-1", "t4"), ("t4-2", "t4"),
         ("v100-1", "v100"), ("keyless-1", "apt-nopubkey")]
NO_VERIFY_RUNNER = JobScript(error="unknown job kind 'verify'; known: apt-keyring-fix, cuda-toolkit, install-wheel, "
                                   "build-from-source")


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FakeFleet]:
    f = FakeFleet.create(tmp_path / "controller", engine_tick=0.05, job_seconds=0.02)
    f.kind_seconds["build-from-source"] = 0.1  # a build takes longest: nodes waiting on it overlap with it
    await f.add_nodes(load_profile(profile, host) for host, profile in FLEET)
    yield f
    await f.close()


@contextlib.asynccontextmanager
async def running(engine: RolloutEngine) -> AsyncIterator[RolloutEngine]:
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def status(f: FakeFleet, rid: str) -> dict[str, Any]:
    return service.get_status(f.ctx.store, rid)


async def install_reported(f: FakeFleet, host: str, version: str | None) -> None:
    """The node's agent reports ``version`` of flash-attn installed (None: none)."""
    facts = f.agents[host].facts
    await f.change_facts(host, replace(facts, flash_attn=FlashAttnFacts(version, "fa2") if version else None))


def states(st: dict[str, Any]) -> dict[str, str]:
    return {n["hostname"]: n["state"] for n in st["nodes"]}


async def test_canary_batches_build_once_install_many(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(batch="2,50%", actor="alice"))
    rid = out["id"]
    # canaries: one per (GPU model, variant); the sdpa-only V100 is skipped, never a canary
    assert out["batches"][0] == out["canaries"]
    gpus = {n["hostname"]: (n["gpu"], n["variant"]) for n in out["nodes"]}
    assert len({gpus[h] for h in out["canaries"]}) == len(out["canaries"])
    assert "v100-1" not in [h for b in out["batches"] for h in b]
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
    assert st["status"] == "succeeded", st["reason"]
    s = states(st)
    assert s.pop("v100-1") == "skipped"
    assert set(s.values()) == {"done"}
    # exactly one build per build key, on one node of that key; every node of those keys (the builder too, after
    # its build) installed the built wheel once
    builds = fleet.jobs_of_kind("build-from-source")
    assert len(builds) == 2 and {b.split("-")[0] for b in builds} == {"l40s", "t4"}
    installs = fleet.jobs_of_kind("install-wheel")
    assert sorted(h for h in installs if h.startswith(("l40s", "t4"))) == sorted(
        h for h, p in FLEET if p in ("l40s", "t4"))
    assert fleet.jobs_of_kind("apt-keyring-fix") == ["keyless-1"]
    assert len(fleet.jobs_of_kind("verify")) == 11
    # every transition recorded with time and cause; batch order respected
    with fleet.ctx.store.session() as sess:
        trs = list(sess.scalars(select(RolloutTransition).where(RolloutTransition.rollout_id == rid)
                                .order_by(RolloutTransition.id)))
        batch_of = {n.hostname: n.batch for n in sess.scalars(select(RolloutNode))}
    assert all(t.cause and t.at for t in trs)
    started = [batch_of[t.hostname] for t in trs if t.from_state == "planned" and t.to_state != "skipped"]
    assert started == sorted(started)
    seq = [t.to_state for t in trs if t.hostname == "keyless-1"]
    assert seq == ["planned", "keyring", "install", "verify", "done"]
    seq = [t.to_state for t in trs if t.hostname == "l40s-3"]
    assert seq in (["planned", "build", "verify", "done"], ["planned", "waiting", "install", "verify", "done"],
                   ["planned", "install", "verify", "done"])
    audit = service.audit_entries(fleet.ctx.store, rid)
    assert audit[0]["actor"] == "alice" and audit[0]["action"] == "rollout.start"

    # a second rollout over L40S nodes picks the wheel the first one built (controller/local_wheels.py): the nodes
    # that joined since get a plain install by sha256 from the artifact store, no build; the first rollout's nodes
    # report the target installed (their agents sent fresh facts after the install), so they are only verified
    with fleet.ctx.store.session() as sess:
        built = {b.build_key: b.artifact_sha256 for b in sess.scalars(select(Build))}
    await fleet.add_nodes(load_profile("l40s", host) for host in ("l40s-4", "l40s-5"))
    out2 = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=L40S", canary=0, batch="100%"))
    assert out2["builds"] == []
    assert {n["hostname"]: (n["variant"], tuple(n["steps"])) for n in out2["nodes"]} == {
        **{h: ("fa2-wheel", ("verify",)) for h in ("l40s-1", "l40s-2", "l40s-3")},
        **{h: ("fa2-wheel", ("install-wheel", "verify")) for h in ("l40s-4", "l40s-5")}}
    async with running(fleet.new_engine()):
        st2 = await fleet.wait_rollout(out2["id"], "succeeded", "partial", "paused")
    assert st2["status"] == "succeeded"
    assert len(fleet.jobs_of_kind("build-from-source")) == 2
    with fleet.ctx.store.session() as sess:
        shas = {j.vars.get("wheel_sha256") for j in sess.scalars(select(Job).where(Job.kind == "install-wheel"))
                if j.vars.get("rollout_id") == out2["id"]}
    assert len(shas) == 1 and shas <= set(built.values())


async def test_budget_stop_then_resume(fleet: FakeFleet) -> None:
    fleet.script("a100-2", "install-wheel",
                 JobScript(error="ERROR: flash_attn-2.8.3...whl is not a supported wheel on this platform"))
    fleet.script("a100-3", "install-wheel", JobScript(error="No space left on device"))
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=A100,gpu=H100", canary=0, batch="1,2,10",
                                                                max_failures="1", actor="bob"))
    rid = out["id"]
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(rid, "paused", "succeeded", "partial")
        assert st["status"] == "paused"
        assert "failure budget exceeded: 2 failed" in st["reason"]
        failed = [n for n in st["nodes"] if n["state"] == "failed"]
        assert {n["hostname"] for n in failed} == {"a100-2", "a100-3"}
        assert all("install-wheel failed" in n["cause"] for n in failed)
        # later batches did not start
        assert all(n["state"] == "planned" for n in st["nodes"] if n["batch"] > st["current_batch"])
        with pytest.raises(ConflictError, match="would pause again"):
            service.resume(fleet.ctx.store, rid, "bob")
        fleet.scripts.clear()
        service.resume(fleet.ctx.store, rid, "bob", retry_failed=True)
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
    assert st["status"] == "succeeded", st["reason"]
    assert {n["attempt"] for n in st["nodes"] if n["hostname"] in ("a100-2", "a100-3")} == {2}
    actions = [(a["actor"], a["action"]) for a in service.audit_entries(fleet.ctx.store, rid)]
    assert actions == [("bob", "rollout.start"), ("engine", "rollout.pause"), ("bob", "rollout.resume"),
                       ("engine", "rollout.finish")]


async def test_failed_canary_pauses_before_batches(fleet: FakeFleet) -> None:
    fleet.script("h100-1", "install-wheel", JobScript(error="boom"))
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100,gpu=A100", max_failures="50%"))
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "paused", "succeeded", "partial")
    assert st["status"] == "paused" and st["reason"].startswith("canary failed: h100-1")
    assert sum(n["state"] == "planned" for n in st["nodes"]) == 4  # a100-2, a100-3, h100-2, keyless-1


async def test_failed_build_fails_only_waiting_nodes(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=L40S,gpu=T4", canary=0,
                                                                batch="100%", max_failures="100%"))
    builder = next(b["builder"] for b in out["builds"] if "l40s" in b["builder"])
    fleet.script(builder, "build-from-source",
                 JobScript(error="nvcc fatal : Unsupported gpu architecture 'compute_89'"))
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "partial", "succeeded", "paused")
    s = states(st)
    assert {h: v for h, v in s.items() if h.startswith("l40s")} == {"l40s-1": "failed", "l40s-2": "failed",
                                                                    "l40s-3": "failed"}
    assert s["t4-1"] == s["t4-2"] == "done"
    waiting = [n for n in st["nodes"] if n["hostname"].startswith("l40s") and n["hostname"] != builder]
    assert all(f"on {builder} failed" in n["cause"] for n in waiting)
    assert fleet.jobs_of_kind("build-from-source").count(builder) == 1
    assert not any(h.startswith("l40s") for h in fleet.jobs_of_kind("install-wheel"))


async def test_disk_full_artifact_store_fails_build_clearly(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=T4", canary=0, batch="100%",
                                                                max_failures="100%", min_free_bytes=1 << 62))
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "partial", "succeeded", "paused")
    causes = {n["hostname"]: n["cause"] for n in st["nodes"]}
    assert all(st_ == "failed" for st_ in states(st).values())
    assert any("artifact store" in c and "is full" in c for c in causes.values())
    assert fleet.jobs_of_kind("build-from-source") == []


async def test_vanished_agent_fails_after_step_timeout(fleet: FakeFleet) -> None:
    await fleet.stop_agent("h100-2")
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%",
                                                                max_failures="1", step_timeouts={"install-wheel": 1}))
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "partial", "succeeded", "paused")
    assert st["status"] == "partial"
    bad = next(n for n in st["nodes"] if n["hostname"] == "h100-2")
    assert bad["state"] == "failed" and "no result for install-wheel within 1s" in bad["cause"]
    assert st["budget"]["failed"] == 1


class CrashingEngine(RolloutEngine):
    """An engine whose process 'dies': its rollout leases stay behind, nothing is cleaned up."""

    def _release(self, held: Sequence[Held]) -> None:
        return None


async def test_takeover_after_crash_reattaches_without_resubmitting(fleet: FakeFleet) -> None:
    fleet.kind_seconds["build-from-source"] = 1.5
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=T4", canary=0, batch="100%"))
    rid = out["id"]
    dead = CrashingEngine(fleet.ctx.store, fleet.ctx.jobs, artifacts=fleet.ctx.artifacts,
                          artifacts_dir=fleet.ctx.settings.state_dir / "artifacts", owner="another-host:1:dead",
                          lease_ttl=1.0, tick=0.05)
    task = asyncio.create_task(dead.run())

    def building() -> bool:
        return any(n["state"] == "build" and n["job_id"] for n in status(fleet, rid)["nodes"])

    await wait_for(building)
    task.cancel()  # the controller dies mid-build: the job keeps running on the node
    with contextlib.suppress(asyncio.CancelledError):
        await task
    st = status(fleet, rid)
    mid = next(n for n in st["nodes"] if n["state"] == "build")
    assert mid["in_step"] and st["leader"]["holder"] == "another-host:1:dead"  # visible as mid-step
    # worst case: the crash came after the job was submitted but before its id was recorded
    with fleet.ctx.store.session() as s:
        row = s.scalar(select(RolloutNode).where(RolloutNode.hostname == mid["hostname"]))
        assert row is not None
        row.job_id = None
    async with running(fleet.new_engine(lease_ttl=1.0)) as eng:
        await asyncio.sleep(0.3)
        assert status(fleet, rid)["leader"]["holder"] != eng.owner  # the live lease is respected
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
    assert st["status"] == "succeeded"
    assert fleet.jobs_of_kind("build-from-source") == [mid["hostname"]]  # not resubmitted
    with fleet.ctx.store.session() as s:
        b = s.scalars(select(Build)).one()
        assert b.status == "succeeded" and b.builder == mid["hostname"]


async def test_an_engine_whose_lease_is_taken_over_stops_at_once_and_writes_nothing(fleet: FakeFleet) -> None:
    """SQLite (one controller, two engines): the fence is the database's write lock. On PostgreSQL, with a stalled
    renewal too: tests/integration/ha/test_rollout_fencing.py."""
    fleet.kind_seconds["install-wheel"] = 1.0
    rid = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%"))["id"]
    async with running(fleet.new_engine(owner="host-a:1:a", lease_ttl=5.0)) as a:
        await wait_for(lambda: all(n["in_step"] for n in status(fleet, rid)["nodes"]))
        held_a = a._terms[rid].held
        with fleet.ctx.store.session() as s:  # the lease expired, and another controller took it
            row = s.get(Lease, rollout_lease(rid))
            assert row is not None
            row.expires_at = db_now(s) - dt.timedelta(seconds=1)
        with fleet.ctx.store.session() as s:
            taken = acquire(s, rollout_lease(rid), "host-b:2:b", 30.0)
        assert taken is not None and taken.token == held_a.token + 1
        await wait_for(lambda: rid not in a._terms and not a._tasks, timeout=2)
        before = status(fleet, rid)
        with pytest.raises(LeaseLost):
            a._prepare(rid, "h100-1", held_a)
        with pytest.raises(LeaseLost):
            a._drive_db(rid, held_a, frozenset())
        after = status(fleet, rid)
        assert after["nodes"] == before["nodes"] and after["transitions"] == before["transitions"]
        async with running(fleet.new_engine(owner="host-b:2:b", lease_ttl=5.0)):
            st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
        assert rid not in a._terms
    assert st["status"] == "succeeded"
    assert all(n == 1 for n in fleet.job_counts().values()), fleet.job_counts()


async def test_a_clean_stop_releases_the_lease_for_the_next_engine(fleet: FakeFleet) -> None:
    fleet.kind_seconds["install-wheel"] = 1.0
    rid = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%"))["id"]
    async with running(fleet.new_engine(owner="host-a:1:a", lease_ttl=60.0)):
        await wait_for(lambda: any(n["in_step"] for n in status(fleet, rid)["nodes"]))
    assert status(fleet, rid)["leader"] is None  # released: no 60 s wait for whoever comes next
    async with running(fleet.new_engine(owner="host-b:2:b", lease_ttl=60.0)):
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused", timeout=30)
    assert st["status"] == "succeeded"
    assert all(n == 1 for n in fleet.job_counts().values()), fleet.job_counts()


async def test_rollback(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100,gpu=A100,gpu=V100", canary=0,
                                                                batch="100%"))
    rid = out["id"]
    async with running(fleet.new_engine()):
        await fleet.wait_rollout(rid, "succeeded")
        service.rollback(fleet.ctx.store, rid, "carol")
        st = await fleet.wait_rollout(rid, "rolled-back")
    s = states(st)
    assert s.pop("v100-1") == "skipped"
    assert set(s.values()) == {"rolled-back"}
    assert sorted(fleet.jobs_of_kind("rollback")) == sorted(s)
    assert [a["action"] for a in service.audit_entries(fleet.ctx.store, rid)] == ["rollout.start", "rollout.finish",
                                                                                  "rollout.rollback", "rollout.finish"]


async def test_abort_skips_what_has_not_started(fleet: FakeFleet) -> None:
    fleet.kind_seconds["install-wheel"] = 0.5
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100,gpu=A100", canary=0, batch="1",
                                                                max_parallel=1))
    rid = out["id"]
    async with running(fleet.new_engine()):
        await wait_for(lambda: any(n["in_step"] for n in status(fleet, rid)["nodes"]))
        service.abort(fleet.ctx.store, rid, "dave")
        st = await fleet.wait_rollout(rid, "aborted")
    s = states(st)
    assert list(s.values()).count("skipped") >= 3
    assert len(fleet.jobs_of_kind("install-wheel")) <= 2


async def test_bad_inputs(fleet: FakeFleet) -> None:
    with pytest.raises(NotFoundError, match="not in the catalog") as exc:
        service.start_rollout(fleet.ctx.store, RolloutRequest(version="2.99.0"))
    assert exc.value.hint is not None and "2.8.3" in exc.value.hint
    with pytest.raises(UsageError, match="matches no node"):
        service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=B200"))
    with pytest.raises(UsageError, match="unknown selector key"):
        service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="rack=7"))
    first = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100"))
    with pytest.raises(ConflictError, match=f"already in active rollout {first['id']}"):
        service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100,gpu=A100"))
    # disjoint nodes are fine
    service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=A100"))
    dry = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=T4", dry_run=True))
    assert dry["dry_run"] and dry["batches"] and len(service.list_rollouts(fleet.ctx.store)) == 2


async def test_node_that_comes_back_is_reconciled(fleet: FakeFleet) -> None:
    fleet.kind_seconds["install-wheel"] = 0.4
    fleet.script("h100-1", "install-wheel", JobScript(hang=True))  # the agent takes the job, is never heard of again
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100,gpu=A100", canary=0, batch="2,1",
                                                                max_failures="2", step_timeouts={"install-wheel": 1}))
    rid = out["id"]
    async with running(fleet.new_engine()):
        await wait_for(lambda: states(status(fleet, rid))["h100-1"] == "failed")
        assert status(fleet, rid)["status"] == "running"
        # the node comes back, and its facts show the flash-attn the lost job installed
        fleet.scripts.clear()
        await install_reported(fleet, "h100-1", out["version"])
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
    assert st["status"] == "succeeded", st["reason"]
    seq = [t["to"] for t in st["transitions"] if t["hostname"] == "h100-1"]
    assert seq == ["planned", "install", "failed", "verify", "done"]
    assert any("reconciled" in t["cause"] for t in st["transitions"] if t["hostname"] == "h100-1")


async def test_dedicated_builder(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=L40S", canary=0, batch="1",
                                                                builders=("l40s-3",)))
    assert [b["builder"] for b in out["builds"]] == ["l40s-3"] and out["batches"][0] == ["l40s-1", "l40s-3"]
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "succeeded", "partial", "paused")
    assert st["status"] == "succeeded"
    assert fleet.jobs_of_kind("build-from-source") == ["l40s-3"]
    with pytest.raises(UsageError, match="--builder a100-1 does not build here"):
        service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=A100", builders=("a100-1",), dry_run=True))
    with pytest.raises(UsageError, match="not in the selection"):
        service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=A100", builders=("t4-1",), dry_run=True))


async def test_agent_killed_mid_build_fails_the_build_and_its_waiters(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=L40S,gpu=T4", canary=0, batch="100%",
                                                                max_failures="100%",
                                                                step_timeouts={"build-from-source": 1}))
    builder = next(b["builder"] for b in out["builds"] if b["builder"].startswith("l40s"))
    fleet.kind_seconds["build-from-source"] = 0.5
    async with running(fleet.new_engine()):
        await wait_for(lambda: any(n["hostname"] == builder and n["in_step"]
                                   for n in status(fleet, out["id"])["nodes"]))
        await fleet.stop_agent(builder)  # the agent dies mid-build
        st = await fleet.wait_rollout(out["id"], "partial", "succeeded", "paused")
    s = states(st)
    assert [h for h, v in s.items() if v == "failed"] == ["l40s-1", "l40s-2", "l40s-3"]
    assert s["t4-1"] == s["t4-2"] == "done"
    causes = {n["hostname"]: n["cause"] for n in st["nodes"]}
    assert "no result for build-from-source within 1s" in causes[builder]
    assert all(f"on {builder} failed" in c for h, c in causes.items() if h.startswith("l40s") and h != builder)



async def test_agent_restarted_mid_build_fails_the_build_at_once_and_a_retry_converges(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=L40S", canary=0, batch="100%",
                                                                max_failures="1"))
    rid = out["id"]
    builder = out["builds"][0]["builder"]
    # the build runs (its first event arrived) and never answers
    fleet.script(builder, "build-from-source", JobScript(hang=True))
    loop = asyncio.get_running_loop()

    def build_job() -> str | None:
        n = next(n for n in status(fleet, rid)["nodes"] if n["hostname"] == builder)
        if n["state"] == "build" and n["job_id"] and \
                fleet.ctx.jobs.get(n["job_id"], events=False)["status"] == "running":
            return str(n["job_id"])
        return None

    async with running(fleet.new_engine()):
        await wait_for(lambda: build_job() is not None)
        job_id = build_job()
        assert job_id is not None
        started = loop.time()
        await fleet.restart_agent(builder)  # the agent process is killed with its build and comes back at once
        st = await fleet.wait_rollout(rid, "paused", "partial", "succeeded")
        assert loop.time() - started < 10  # not the build step's deadline (at least an hour)
        # like any failed step: the builder fails, the nodes waiting on its build fail, the budget pauses the rollout
        assert st["status"] == "paused" and "failure budget exceeded: 3 failed" in st["reason"], st["reason"]
        causes = {n["hostname"]: n["cause"] for n in st["nodes"]}
        assert causes[builder].startswith(f"build-from-source failed: interrupted: the agent on {builder} restarted")
        assert all(f"on {builder} failed: build-from-source failed: interrupted" in c
                   for h, c in causes.items() if h != builder)
        job = fleet.ctx.jobs.get(job_id)
        assert job["status"] == "failed" and [e["event"] for e in job["events"]] == ["playbook_on_start",
                                                                                      "fleet_job_interrupted"]
        # the operator retries: the build runs again (the restarted agent takes it) and the rollout converges
        fleet.scripts.clear()
        service.resume(fleet.ctx.store, rid, "ops", retry_failed=True)
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
    assert st["status"] == "succeeded", st["reason"]
    assert len(fleet.jobs_of_kind("build-from-source")) == 2


async def test_agent_without_verify_runner_uses_the_floor(fleet: FakeFleet) -> None:
    for host in ("h100-1", "h100-2"):
        fleet.script(host, "verify", NO_VERIFY_RUNNER)
    version = service.plan_rollout(fleet.ctx.store, RolloutRequest(nodes="h100-1")).version
    # h100-1 reports the target installed; h100-2's install succeeds but its facts never show the target
    await install_reported(fleet, "h100-1", version)
    fleet.script("h100-2", "install-wheel", JobScript(installs=False))
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%",
                                                                max_failures="100%"))
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "partial", "succeeded", "paused")
    by = {n["hostname"]: n for n in st["nodes"]}
    assert by["h100-1"]["state"] == "done" and "floor only" in by["h100-1"]["cause"]
    assert by["h100-2"]["state"] == "failed" and "unknown job kind 'verify'" in by["h100-2"]["cause"]


async def test_nodes_in_active_rollouts(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100,gpu=V100"))
    assert service.nodes_in_active_rollouts(fleet.ctx.store) == {"h100-1": out["id"], "h100-2": out["id"]}


async def test_failed_rollback_is_rollback_failed_then_retried(fleet: FakeFleet) -> None:
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%"))
    rid = out["id"]
    error = ("Refuse a previous version whose wheel nobody has: cannot restore flash-attn 2.6.3: it was not "
             "installed by fleetctl, so the node keeps no wheel of it")
    async with running(fleet.new_engine()):
        await fleet.wait_rollout(rid, "succeeded")
        fleet.script("h100-1", "rollback", JobScript(error=error))
        service.rollback(fleet.ctx.store, rid, "carol")
        st = await fleet.wait_rollout(rid, "rollback-failed", "rolled-back")
        assert st["status"] == "rollback-failed"  # never rolled-back
        assert states(st) == {"h100-1": "failed", "h100-2": "rolled-back"}
        assert "h100-1: rollback failed: " in st["reason"] and "cannot restore flash-attn 2.6.3" in st["reason"]
        assert st["finished_at"] is not None and not st["active"]
        # rolling back again retries only the node that failed
        fleet.scripts.clear()
        service.rollback(fleet.ctx.store, rid, "carol")
        st = await fleet.wait_rollout(rid, "rolled-back", "rollback-failed")
    assert st["status"] == "rolled-back" and set(states(st).values()) == {"rolled-back"}
    assert sorted(fleet.jobs_of_kind("rollback")) == ["h100-1", "h100-1", "h100-2"]


async def test_rollback_job_vars_are_what_the_playbook_documents(fleet: FakeFleet, tmp_path: Path) -> None:
    """No ``previous`` (an Ansible extra var beats the playbook's own facts); the store's wheel of the version
    the node had before goes along as ``wheel_sha256`` when there is one for the node's Python."""
    from fleetctl.controller.rollout.core import State
    from fleetctl.controller.rollout.engine import plan_from_json
    from fleetctl.controller.rollout.models import Rollout

    await install_reported(fleet, "a100-2", "2.6.3")
    rid = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="a100-1,a100-2", canary=0, batch="100%"))["id"]
    wheel = tmp_path / "flash_attn-2.6.3-py3-none-any.whl"
    wheel.write_bytes(b"stand-in")
    sha = fleet.ctx.artifacts.put_file(wheel, "wheel", provenance=Provenance.user("carol")).sha256
    engine = fleet.new_engine()
    got = {}
    with fleet.ctx.store.session() as s:
        r = s.get(Rollout, rid)
        assert r is not None
        for n in s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == rid)):
            got[n.hostname] = engine._job_vars(s, r, n, plan_from_json(n.plan), State.ROLLING_BACK)
    python = got["a100-1"]["python"]
    assert python and python.startswith("/")
    assert got["a100-1"] == {"rollout_id": rid, "attempt": 1, "python": python}
    assert got["a100-2"] == {"rollout_id": rid, "attempt": 1, "python": got["a100-2"]["python"], "wheel_sha256": sha}


async def test_node_that_comes_back_after_the_rollout_ended_is_reconciled_and_retried(fleet: FakeFleet) -> None:
    fleet.script("h100-1", "install-wheel", JobScript(hang=True))  # the agent takes the job, is never heard of again
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%",
                                                                max_failures="1", step_timeouts={"install-wheel": 1}))
    rid = out["id"]
    engine = fleet.new_engine()
    engine.finished_reconcile_s = 0.2
    async with running(engine):
        st = await fleet.wait_rollout(rid, "partial", "succeeded", "paused")
        assert st["status"] == "partial"
        stale = next(n for n in st["nodes"] if n["hostname"] == "h100-1")["cause"]
        assert "no result for install-wheel within 1s" in stale
        with pytest.raises(ConflictError, match="only its failed nodes are left") as err:
            service.resume(fleet.ctx.store, rid, "op")  # a finished rollout resumes only to retry its failed nodes
        assert "--retry-failed" in (err.value.hint or "")
        # the node comes back after the end, with the target flash-attn the lost job installed after all
        fleet.scripts.clear()
        await install_reported(fleet, "h100-1", out["version"])
        await wait_for(lambda: "back online after the rollout ended" in
                       next(n for n in status(fleet, rid)["nodes"] if n["hostname"] == "h100-1")["cause"])
        st = status(fleet, rid)
        bad = next(n for n in st["nodes"] if n["hostname"] == "h100-1")
        assert st["status"] == "partial" and bad["state"] == "failed"  # nothing verified it yet: still failed
        assert bad["cause"].startswith(stale)
        assert (f"back online after the rollout ended (partial) with flash-attn {out['version']} (the target) "
                f"installed but not verified: `fleetctl rollout resume {rid} --retry-failed` retries it") \
            in bad["cause"]
        with fleet.ctx.store.session() as s:
            row = s.scalar(select(RolloutNode).where(RolloutNode.rollout_id == rid, RolloutNode.hostname == "h100-1"))
            assert row is not None and (row.result or {})["returned"]["flash_attn"] == out["version"]
        # the documented retry: the finished partial rollout runs its failed node again and succeeds
        resumed = service.resume(fleet.ctx.store, rid, "op", retry_failed=True)
        assert resumed["status"] == "running"
        st = await fleet.wait_rollout(rid, "succeeded", "partial", "paused")
    assert st["status"] == "succeeded", st["reason"]
    assert states(st) == {"h100-1": "done", "h100-2": "done"}
    with pytest.raises(ConflictError, match="succeeded, not paused"):
        service.resume(fleet.ctx.store, rid, "op", retry_failed=True)


async def test_returning_node_of_a_finished_rollout_taken_on_by_a_later_one_is_left_alone(fleet: FakeFleet) -> None:
    fleet.script("h100-1", "install-wheel", JobScript(hang=True))
    first = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100", canary=0, batch="100%",
                                                                  max_failures="1", step_timeouts={"install-wheel": 1}))
    engine = fleet.new_engine()
    engine.finished_reconcile_s = 0.2
    async with running(engine):
        assert (await fleet.wait_rollout(first["id"], "partial", "succeeded", "paused"))["status"] == "partial"
        fleet.scripts.clear()
        later = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="hostname=h100-1", canary=0, batch="100%"))
        assert (await fleet.wait_rollout(later["id"], "succeeded", "partial", "paused"))["status"] == "succeeded"
        await fleet.change_facts("h100-1", fleet.agents["h100-1"].facts)  # the node is heard of again
        await asyncio.sleep(0.6)
        bad = next(n for n in status(fleet, first["id"])["nodes"] if n["hostname"] == "h100-1")
        assert "back online" not in bad["cause"]  # the later rollout's outcome is the node's news, not this
        with pytest.raises(ConflictError, match="no failed node to retry"):
            service.resume(fleet.ctx.store, first["id"], "op", retry_failed=True)


async def test_a_node_with_unreadable_facts_is_skipped_with_the_reason(fleet: FakeFleet) -> None:
    """Stored facts that no longer parse (an older version's row, corruption): the node is in the selection but
    planned as skipped with the registry's reason; the rollout runs on the others."""
    from fleetctl.controller.store.models import Node

    with fleet.ctx.store.session() as s:
        node = s.scalars(select(Node).where(Node.hostname == "h100-2")).one()
        node.facts = {**node.facts, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "index": "zero"}]}
    plan = service.plan_rollout(fleet.ctx.store, RolloutRequest(nodes="h100-*")).to_json()
    skips = {n["hostname"]: n["skip"] for n in plan["nodes"]}
    assert skips["h100-1"] is None
    assert skips["h100-2"].startswith("stored facts unreadable at gpus") and "restart its agent" in skips["h100-2"]
    # a selector on what the facts say cannot match the unreadable node
    by_gpu = service.plan_rollout(fleet.ctx.store, RolloutRequest(nodes="gpu=H100")).nodes
    assert [n.plan.hostname for n in by_gpu] == ["h100-1"]
    out = service.start_rollout(fleet.ctx.store, RolloutRequest(nodes="h100-*", canary=0, batch="100%"))
    async with running(fleet.new_engine()):
        st = await fleet.wait_rollout(out["id"], "partial", "succeeded", "paused")
    assert states(st) == {"h100-1": "done", "h100-2": "skipped"}
