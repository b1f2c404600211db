"""A simulated fleet at the job dispatcher's agent boundary: nodes registered from agent profiles,
agents that take jobs from ``JobDispatcher.stream_for``, report a ``fleet_job_started`` event
(``record_events``) and ``complete`` — the same calls the gRPC server makes for a real agent. What a
job does on a simulated node is simulated (its outcome comes from the node's scripted behaviour); the
store, dispatcher, resolver and engine are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.profiles import load_profile
from controller.artifacts import ArtifactStore, Provenance
from controller.jobs import JobDispatcher, JobEventRecord
from controller.rollout.engine import RolloutEngine
from controller.store import Store, open_store, utcnow
from controller.store.models import Job, Node
from fleet.errors import StoreError
from fleet.jobs import JobOutcome, JobSpec, JobStatus

DEFAULT_DELAYS: Mapping[str, float] = {"apt-keyring-fix": 0.02, "cuda-toolkit": 0.02, "build-from-source": 0.1,
                                       "install-wheel": 0.02, "verify": 0.02, "rollback": 0.02}


@dataclass
class SimFleet:
    store: Store
    jobs: JobDispatcher
    artifacts: ArtifactStore
    artifacts_dir: Path
    delays: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DELAYS))
    fail: dict[tuple[str, str], str] = field(default_factory=dict)  # (host, kind) → error text
    hang: set[tuple[str, str]] = field(default_factory=set)  # (host, kind): never answers
    verify_fail: dict[str, str] = field(default_factory=dict)  # host → reason
    no_verify: set[str] = field(default_factory=set)  # hosts whose agent has no verification runner
    # the agents' database calls on the store's pool, as the gRPC servicer makes them (the async variants), and
    # retried like a real agent's: a test that measures the event loop then measures the controller, not the sim
    off_loop: bool = False
    _agents: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _work: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def create(cls, tmp: Path, db_url: str | None = None) -> SimFleet:
        store = open_store(db_url or f"sqlite:///{tmp / 'controller.db'}")
        jobs = JobDispatcher(store)
        arts = ArtifactStore(tmp / "artifacts", store)
        return cls(store, jobs, arts, tmp / "artifacts")

    def engine(self, **kw: Any) -> RolloutEngine:
        kw.setdefault("tick", 0.05)
        kw.setdefault("lease_ttl", 5.0)
        return RolloutEngine(self.store, self.jobs, artifacts=self.artifacts, artifacts_dir=self.artifacts_dir, **kw)

    def register(self, host: str, profile: str, status: str = "online") -> None:
        facts = load_profile(profile, host)
        now = utcnow()
        with self.store.session() as s:
            s.add(Node(hostname=host, status=status, facts=facts.to_json(), extra={"profile": profile,
                                                                                    "simulated": True},
                       simulated=True, registered_at=now, facts_updated_at=now, last_seen=now,
                       status_changed_at=now))

    def start(self, *hosts: str) -> None:
        for h in hosts:
            if h not in self._agents:
                self._agents[h] = asyncio.create_task(self._agent(h), name=f"sim-agent-{h}")

    async def stop(self, *hosts: str) -> None:
        """The agent vanishes (its connection drops; jobs it had are never answered)."""
        for h in hosts or tuple(self._agents):
            t = self._agents.pop(h, None)
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def restart(self, host: str, held: Collection[str] = ()) -> None:
        """The agent process dies with its jobs and comes back at once, holding ``held`` (a fresh process: none)."""
        await self.stop(host)
        for w in [w for w in self._work if w.get_name().startswith(f"sim-job-{host}:")]:
            w.cancel()
        self._agents[host] = asyncio.create_task(self._agent(host, held), name=f"sim-agent-{host}")

    async def close(self) -> None:
        await self.stop()
        for w in list(self._work):
            w.cancel()
        self.store.close()

    async def _agent(self, host: str, held: Collection[str] | None = None) -> None:
        while True:
            try:
                async for spec in self.jobs.stream_for(host, held):
                    task = asyncio.create_task(self._run(host, spec), name=f"sim-job-{host}:{spec.job_id}")
                    self._work.add(task)
                    task.add_done_callback(self._work.discard)
                return
            except StoreError:
                if not self.off_loop:
                    raise
                await asyncio.sleep(0.2)  # the stream failed on the database: reconnect, as a real agent does

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """An agent's call: sent again (the same payload) while the controller answers with a database error."""
        for _ in range(40):
            try:
                await fn()
                return
            except StoreError:
                await asyncio.sleep(0.25)
        await fn()

    async def _started(self, host: str, spec: JobSpec) -> None:
        ev = [JobEventRecord(spec.job_id, 1, "fleet_job_started", {"kind": spec.kind}, utcnow())]
        if self.off_loop:
            await self._call(lambda: self.jobs.record_events_async(host, ev))
        else:
            self.jobs.record_events(host, ev)

    async def _complete(self, host: str, outcome: JobOutcome) -> None:
        if self.off_loop:
            await self._call(lambda: self.jobs.complete_async(host, outcome))
        else:
            self.jobs.complete(host, outcome)

    async def _run(self, host: str, spec: JobSpec) -> None:
        await self._started(host, spec)
        if (host, spec.kind) in self.hang:
            return
        await asyncio.sleep(self.delays.get(spec.kind, 0.01))
        if host not in self._agents:
            return  # vanished mid-job
        err = self.fail.get((host, spec.kind))
        if spec.kind == "verify" and host in self.no_verify:
            err = "unknown job kind 'verify'; known: apt-keyring-fix, cuda-toolkit, install-wheel, build-from-source"
        if err is not None:
            await self._complete(host, JobOutcome(spec.job_id, JobStatus.FAILED, 2, {}, err))
            return
        result: dict[str, Any] = {"stats": {"changed": 1}}
        if spec.kind == "build-from-source":
            key = str(spec.vars.get("build_key"))
            data = f"simulated wheel for {key}".encode()
            name = f"flash_attn-{spec.vars.get('flash_attn_version')}-sim{hashlib.sha1(key.encode()).hexdigest()[:8]}" \
                   "-cp311-cp311-linux_x86_64.whl"
            put = functools.partial(self.artifacts.put_bytes, data, name, kind="wheel",  # the agent's upload
                                    provenance=Provenance.build(spec.job_id, key, host))
            info = await asyncio.to_thread(put) if self.off_loop else put()
            result["built_wheel"] = {"sha256": info.sha256, "filename": info.filename}
        if spec.kind == "verify":
            reason = self.verify_fail.get(host)
            result["passed"] = reason is None
            result["reason"] = reason or "simulated verification"
        await self._complete(host, JobOutcome(spec.job_id, JobStatus.SUCCESSFUL, 0, result, None))

    def job_counts(self) -> dict[tuple[str, str], int]:
        with self.store.session() as s:
            out: dict[tuple[str, str], int] = {}
            for j in s.query(Job):
                out[(j.node, j.kind)] = out.get((j.node, j.kind), 0) + 1
            return out

    def jobs_of_kind(self, kind: str) -> list[str]:
        return sorted(h for (h, k), n in self.job_counts().items() if k == kind for _ in range(n))


async def wait_for(cond: Any, timeout: float = 20.0, step: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)
