"""Issue 13: any enrolled agent could poison the catalog. Real controller, real gRPC (mTLS), real agents.

An agent may upload only the wheel of a build-from-source job assigned to it while it runs; everything else
is PERMISSION_DENIED, stores nothing and is audited (coalesced). What is stored carries its provenance,
shown by ``GET /api/v1/artifacts`` and ``fleetctl artifact list``; only trusted provenance enters the catalog.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.controller.app import RunningController
from fleetctl.controller.artifacts import Source
from fleetctl.controller.cli import main as fleetctl
from fleetctl.controller.local_wheels import local_wheel_entries
from fleetctl.controller.store.models import AuditLog
from fleetctl.fleet.errors import FleetError, ForbiddenError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from tests.integration.fleet_support import SimAgents

pytestmark = pytest.mark.timeout(60)

UPSTREAM_NAME = "flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp311-cp311-linux_x86_64.whl"
BUILT_NAME = "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl"
BUILD_VARS = {"flash_attn_version": "2.8.3", "variant": "fa2-source", "build_key": "fa2.8.3|test-key"}


def _refusals(rc: RunningController) -> list[AuditLog]:
    with rc.ctx.store.session() as s:
        rows = list(s.scalars(select(AuditLog).where(AuditLog.action == "artifact.upload.refused")))
        s.expunge_all()
        return rows


class HoldingRunner:
    """Runs a job until released; meanwhile the test uploads as this agent (``during``)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.jobs: list[JobSpec] = []

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        self.jobs.append(job)
        emit_event({"event": "runner_on_ok", "event_data": {"task": "compile"}})
        self.started.set()
        await self.release.wait()
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={})


async def test_agent_upload_without_a_job_is_refused_stores_nothing_and_is_audited(
        controller: RunningController, fleet: SimAgents, tmp_path: Path) -> None:
    sim = await fleet.start("node-1", "a100")
    src = tmp_path / UPSTREAM_NAME
    src.write_bytes(b"PK\x03\x04 a poisoned wheel named like the upstream one")
    with pytest.raises(ForbiddenError, match="names no build job"):
        await sim.agent.upload_artifact(src, kind="wheel")
    assert controller.ctx.artifacts.list_all() == []
    assert [p.name for p in (controller.ctx.artifacts.root / "tmp").glob("*")] == []
    (row,) = _refusals(controller)
    assert row.actor.startswith("agent:") and row.target == "node-1" and "no build job" in row.detail["reason"]
    # a flood is coalesced: one row per agent per window, carrying the count
    for _ in range(15):
        with pytest.raises(ForbiddenError):
            await sim.agent.upload_artifact(src, kind="wheel", job_id="no-such-job")
    assert len(_refusals(controller)) == 1
    with controller.ctx.store.session() as s:
        catalog = local_wheel_entries(s)
    assert catalog == []


async def test_upload_under_another_nodes_build_job_is_refused(controller: RunningController, fleet: SimAgents,
                                                               tmp_path: Path) -> None:
    runner = HoldingRunner()
    await fleet.start("node-2", "a100", runner=runner)
    intruder = await fleet.start("node-1", "a100")
    job_id = await controller.ctx.jobs.submit_job("node-2", "build-from-source", BUILD_VARS, timeout=30)
    await asyncio.wait_for(runner.started.wait(), 10)
    src = tmp_path / BUILT_NAME
    src.write_bytes(b"PK\x03\x04 node-1 pretends to be node-2's build")
    with pytest.raises(ForbiddenError, match="assigned to another node"):
        await intruder.agent.upload_artifact(src, kind="wheel", job_id=job_id)
    assert controller.ctx.artifacts.list_all() == []
    assert len(_refusals(controller)) == 1
    runner.release.set()
    assert (await controller.ctx.jobs.wait(job_id, timeout=10)).ok


async def test_own_running_build_job_upload_is_accepted_as_build(controller: RunningController, fleet: SimAgents,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    runner = HoldingRunner()
    sim = await fleet.start("node-1", "a100", runner=runner)
    job_id = await controller.ctx.jobs.submit_job("node-1", "build-from-source", BUILD_VARS, timeout=30)
    await asyncio.wait_for(runner.started.wait(), 10)
    # not the job's output: an upstream-style name of another version, an sdist, another distribution
    for name, kind, why in ((UPSTREAM_NAME.replace("2.8.3", "2.7.4"), "wheel", "is version 2.7.4"),
                            ("flash_attn-2.8.3.tar.gz", "sdist", "not 'sdist'"),
                            ("torch-2.8.3-cp311-cp311-linux_x86_64.whl", "wheel", "a wheel of torch")):
        bad = tmp_path / name
        bad.write_bytes(b"not the build's wheel " + name.encode())
        with pytest.raises(ForbiddenError, match=why):
            await sim.agent.upload_artifact(bad, kind=kind, job_id=job_id)
    assert controller.ctx.artifacts.list_all() == []
    built = tmp_path / BUILT_NAME
    built.write_bytes(b"PK\x03\x04 the wheel node-1 built")
    sha = await sim.agent.upload_artifact(built, kind="wheel", job_id=job_id)
    info = controller.ctx.artifacts.get(sha)
    assert info.provenance.source == Source.BUILD and info.provenance.ref == job_id
    assert info.provenance.detail == {"build_key": BUILD_VARS["build_key"], "node": "node-1"}
    assert await sim.agent.upload_artifact(built, kind="wheel", job_id=job_id) == sha  # a retry: same bytes
    other = tmp_path / "flash_attn-2.8.3-cp311-cp311-manylinux_2_28_x86_64.whl"
    other.write_bytes(b"PK\x03\x04 a second file for the same job")
    with pytest.raises(ForbiddenError, match="already uploaded"):
        await sim.agent.upload_artifact(other, kind="wheel", job_id=job_id)
    runner.release.set()
    assert (await controller.ctx.jobs.wait(job_id, timeout=10)).ok
    # the finished job's window for a retried upload stays open briefly; a refused upload is still refused
    with pytest.raises(FleetError):
        await sim.agent.upload_artifact(other, kind="wheel", job_id=job_id)
    # provenance is shown by the API and fleetctl
    state = str(controller.ctx.settings.state_dir)
    rc = await asyncio.to_thread(fleetctl, ["artifact", "list", "--json", "--state-dir", state])
    listed = json.loads(capsys.readouterr().out)["artifacts"]
    assert rc == 0 and [(a["filename"], a["source"]) for a in listed] == [(BUILT_NAME, "build")]
    assert listed[0]["provenance"][0]["ref"] == job_id
    rc = await asyncio.to_thread(fleetctl, ["artifact", "list", "--state-dir", state])
    out = capsys.readouterr().out
    assert rc == 0 and " build " in out and BUILT_NAME in out
    # without a succeeded build record of that key the built wheel is no catalog entry
    with controller.ctx.store.session() as s:
        assert local_wheel_entries(s) == []


async def test_operator_added_wheel_is_user_and_enters_the_catalog(controller: RunningController, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    state = str(controller.ctx.settings.state_dir)
    src = tmp_path / UPSTREAM_NAME
    src.write_bytes(b"PK\x03\x04 the operator's copy of the upstream wheel")
    rc = await asyncio.to_thread(fleetctl, ["artifact", "add", str(src), "--json", "--state-dir", state])
    added = json.loads(capsys.readouterr().out)
    assert rc == 0 and added["source"] == "user" and added["provenance"][0]["ref"]  # the authenticated actor
    with controller.ctx.store.session() as s:
        assert [e["sha256"] for e in local_wheel_entries(s)] == [added["sha256"]]


def test_migration_marks_existing_artifacts_legacy_and_untrusted(db_url: str, tmp_path: Path) -> None:
    """An existing database (at the revision before provenance) upgrades; its artifacts become ``legacy``: not
    in the catalog by name, but a succeeded build's recorded wheel stays usable."""
    import datetime as dt

    from sqlalchemy import text

    from fleetctl.controller.artifacts import ArtifactStore
    from fleetctl.controller.rollout.models import Build
    from fleetctl.controller.store import Store, utcnow
    from fleetctl.controller.store.db import make_engine, migrate

    engine = make_engine(db_url)
    migrate(engine, "web_0004")
    hand, built = "a" * 64, "b" * 64
    with engine.begin() as conn:
        for sha, name in ((hand, UPSTREAM_NAME), (built, BUILT_NAME)):
            conn.execute(text("INSERT INTO artifacts (sha256, filename, kind, size, created) "
                              "VALUES (:s, :f, 'wheel', 3, :c)"),
                         {"s": sha, "f": name, "c": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})
    migrate(engine)
    store = Store(engine)
    arts = ArtifactStore(tmp_path / "artifacts", store)
    for sha in (hand, built):
        arts.path_for(sha).parent.mkdir(parents=True, exist_ok=True)
        arts.path_for(sha).write_bytes(b"old")
        info = arts.get(sha)
        assert info.provenance.source == Source.LEGACY and not info.vouched
    with store.session() as s:
        assert local_wheel_entries(s) == []  # the hand-added upstream-named one: unknown origin
        s.add(Build(build_key="k", status="succeeded", builder="vm", params={"wheel_name": UPSTREAM_NAME},
                    artifact_sha256=built, artifact_filename=BUILT_NAME, created_at=utcnow(), attempts=1))
    with store.session() as s:
        assert [e["sha256"] for e in local_wheel_entries(s)] == [built]
    listed = [a.to_json() for a in arts.list_all()]
    assert {a["source"] for a in listed} == {"legacy"}
    store.close()
