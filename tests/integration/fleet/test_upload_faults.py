"""Durable builds: a built wheel's upload survives a full disk and a database error on the controller.

A real controller and a real agent (gRPC mTLS on loopback) run a ``build-from-source`` job whose
"playbook" writes a wheel; the agent's ``ArtifactJobRunner`` uploads it. Faults are injected at the
controller's boundary: the partial upload's file write raising ENOSPC, the database failing the commit.
Before durable uploads either one failed the whole build (and left the partial file behind)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.artifact_jobs import ArtifactJobRunner
from fleetctl.agent.client import Agent
from fleetctl.controller.app import RunningController
from fleetctl.controller.artifacts import ArtifactStore
from fleetctl.controller.uploads import PartialWriter
from fleetctl.fleet.errors import StoreError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.v1 import fleet_pb2 as pb
from tests.integration.fleet_support import SimAgents, wait_for

pytestmark = pytest.mark.timeout(120)

VERSION = "2.8.3"
WHEEL = f"flash_attn-{VERSION}-cp311-cp311-linux_x86_64.whl"
SIZE = 6 * 1024 * 1024 + 123


class FakeBuild:
    """The build playbook's part: a wheel on the node's disk, reported as ``built_wheel``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sha256 = ""

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        self.workdir.mkdir(parents=True, exist_ok=True)
        wheel = self.workdir / WHEEL
        data = os.urandom(SIZE)
        wheel.write_bytes(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={"built_wheel": {
            "path": str(wheel), "sha256": self.sha256, "filename": WHEEL}})


async def build_node(fleet: SimAgents, tmp_path: Path) -> tuple[ArtifactJobRunner, FakeBuild, Agent]:
    inner = FakeBuild(tmp_path / "build")
    runner = ArtifactJobRunner(inner, tmp_path / "agent-cache" / "artifacts")
    sim = await fleet.start("builder-1", "t4", runner=runner)
    runner.bind(sim.agent)
    return runner, inner, sim.agent


def sent_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the bytes the agent streams (to tell a commit-only retry from a resend)."""
    counts: list[int] = []
    real = Agent._upload_stream

    async def counting(self: Agent, *a: Any, **k: Any) -> AsyncIterator[pb.ArtifactChunk]:
        counts.append(0)
        async for chunk in real(self, *a, **k):
            counts[-1] += len(chunk.data)
            yield chunk

    monkeypatch.setattr(Agent, "_upload_stream", counting)
    return counts


async def run_build(controller: RunningController) -> tuple[str, JobOutcome]:
    job_id = await controller.ctx.jobs.submit_job("builder-1", "build-from-source",
                                                  {"build_key": "fa2-t4-cu124", "flash_attn_version": VERSION},
                                                  timeout=600)
    return job_id, await controller.ctx.jobs.wait(job_id, timeout=90)


def events(controller: RunningController, job_id: str, name: str) -> list[dict[str, Any]]:
    return [e["data"] for e in controller.ctx.jobs.get(job_id)["events"] if e["event"] == name]


async def test_disk_full_mid_upload_clear_error_no_partial_retried_later(
        controller: RunningController, fleet: SimAgents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner, build, _ = await build_node(fleet, tmp_path)
    tmp_dir = controller.ctx.artifacts.root / "tmp"
    state: dict[str, Any] = {"full": True, "failures": 0}
    real_init = PartialWriter.__init__

    class FullDisk:
        """The partial file on a disk that fills up after 2 MiB."""

        def __init__(self, f: Any) -> None:
            self._f, self._n = f, 0

        def write(self, data: bytes) -> int:
            if self._n + len(data) > 2 * 1024 * 1024:
                state["failures"] += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            self._n += len(data)
            return int(self._f.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

    def init(self: PartialWriter, *a: Any, **k: Any) -> None:
        real_init(self, *a, **k)
        if state["full"]:
            self._file = FullDisk(self._file)  # type: ignore[assignment]

    monkeypatch.setattr(PartialWriter, "__init__", init)
    asyncio_task = asyncio.create_task(run_build(controller))
    await wait_for(lambda: state["failures"] >= 2, timeout=30)  # refused, and retried while still full
    assert [p.name for p in tmp_dir.iterdir()] == []  # no partial file left taking the space
    state["full"] = False  # an operator freed space
    job, outcome = await asyncio_task
    assert outcome.status == "successful", outcome.error
    retries = events(controller, job, "fleet_artifact_upload_retry")
    assert len(retries) >= 2
    assert "is full (No space left on device)" in retries[0]["reason"], retries[0]
    assert "bytes free" in retries[0]["reason"]
    assert controller.ctx.artifacts.get(build.sha256).size == SIZE
    assert [p.name for p in tmp_dir.iterdir()] == []
    # kept on the builder until confirmed, then moved into its cache (the install there downloads nothing)
    assert not list((runner.cache_dir.parent / "outbox").glob("*/*"))
    assert (runner.cache_dir / build.sha256 / WHEEL).is_file()


async def test_database_error_at_commit_is_retried_without_resending(
        controller: RunningController, fleet: SimAgents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, build, _ = await build_node(fleet, tmp_path)
    counts = sent_bytes(monkeypatch)
    store = controller.ctx.store
    real_session = store.session
    committing = threading.local()
    failed = {"n": 0}

    def session(*a: Any, **k: Any) -> Any:
        if getattr(committing, "on", False) and failed["n"] == 0:
            failed["n"] += 1
            raise StoreError("database error: OperationalError: database is locked", hint="check the database")
        return real_session(*a, **k)

    real_adopt = ArtifactStore._adopt

    def adopt(self: ArtifactStore, *a: Any, **k: Any) -> Any:
        committing.on = True
        try:
            return real_adopt(self, *a, **k)
        finally:
            committing.on = False

    monkeypatch.setattr(store, "session", session)
    monkeypatch.setattr(ArtifactStore, "_adopt", adopt)
    job, outcome = await run_build(controller)
    assert outcome.status == "successful", outcome.error
    assert failed["n"] == 1
    retries = events(controller, job, "fleet_artifact_upload_retry")
    assert len(retries) == 1 and "database is locked" in retries[0]["reason"], retries
    assert controller.ctx.artifacts.get(build.sha256).size == SIZE
    assert sum(counts) == SIZE, counts  # the retry sent no data again: only the commit
    assert [p.name for p in (controller.ctx.artifacts.root / "tmp").iterdir()] == []
