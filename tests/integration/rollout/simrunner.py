"""A simulated executor for simulated nodes: what a playbook *does* on a node without a GPU (or
without a Debian root) is simulated here — how long it takes and whether it fails comes from a
script per node — while the agent, gRPC, artifact upload, controller, DB and engine are real.
A simulated build writes a small stand-in wheel and uploads it through the agent's real
``UploadArtifact`` RPC, exactly as the agent does with a real built wheel."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fleetctl.agent.client import Agent
from fleetctl.agent.profiles import load_profile
from fleetctl.agent.simexec import rollback_result
from fleetctl.agent.verify.simulated import simulate_for_facts
from fleetctl.fleet.facts import FlashAttnFacts, NodeFacts, with_installed
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.verification import EXPECTS


@dataclass
class Script:
    delays: dict[str, float] = field(default_factory=lambda: {"build-from-source": 0.6})
    default_delay: float = 0.1
    fail: dict[tuple[str, str], str] = field(default_factory=dict)  # (host, kind) → error text
    ran: list[tuple[str, str, str]] = field(default_factory=list)  # (host, kind, job id) started
    wheel_bytes: int = 0  # pad the stand-in wheel to this size (random bytes): uploads of a real wheel's size


@dataclass
class SimRunner:
    """One simulated node: its facts change as jobs install or roll back flash-attn, and its
    ``verify`` result comes from the GPU model (agent/verify/simulated.py), judged for real."""

    host: str
    script: Script
    workdir: Path
    agent: Agent | None = None
    facts: NodeFacts | None = None
    # rollback.yml's record: the flash-attn before the last install that changed it; None: nothing recorded
    before_install: tuple[FlashAttnFacts | None] | None = None

    @classmethod
    def for_profile(cls, host: str, profile: str, script: Script, workdir: Path) -> SimRunner:
        return cls(host, script, workdir, facts=load_profile(profile, host))

    def current_facts(self) -> NodeFacts:
        assert self.facts is not None
        return self.facts

    def _installed(self, job: JobSpec) -> None:
        if self.facts is not None and job.vars.get("flash_attn_version"):
            variant = str(job.vars.get("variant") or "fa2").split("-")[0]
            installed = with_installed(self.facts.flash_attn, FlashAttnFacts(str(job.vars["flash_attn_version"]),
                                                                             variant))
            if self.facts.flash_attn != installed:
                self.before_install = (self.facts.flash_attn,)
            self.facts = replace(self.facts, flash_attn=installed)

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        self.script.ran.append((self.host, job.kind, job.job_id))
        emit_event({"event": "playbook_on_task_start", "event_data": {"task": f"simulated {job.kind}"}})
        await asyncio.sleep(self.script.delays.get(job.kind, self.script.default_delay))
        err = self.script.fail.get((self.host, job.kind))
        if err is not None:
            return JobOutcome(job.job_id, JobStatus.FAILED, rc=2, error=err)
        result: dict[str, Any] = {"stats": {"changed": 1}, "simulated": True}
        if job.kind == "build-from-source":
            assert self.agent is not None
            self.workdir.mkdir(parents=True, exist_ok=True)
            wheel = self.workdir / f"flash_attn-{job.vars.get('flash_attn_version')}-cp311-cp311-linux_x86_64.whl"
            head = f"simulated wheel for {job.vars.get('build_key')}".encode()
            wheel.write_bytes(head + os.urandom(max(0, self.script.wheel_bytes - len(head))))
            sha = await self.agent.upload_artifact(wheel, "wheel", job_id=job.job_id)
            result["built_wheel"] = {"sha256": sha, "filename": wheel.name, "path": str(wheel)}
        if job.kind in ("install-wheel", "build-from-source"):
            self._installed(job)
        if job.kind == "rollback" and self.facts is not None and self.before_install is not None:
            (before,) = self.before_install  # like rollback.yml: what the node's own record says
            result["rollback"] = rollback_result(before, self.facts.flash_attn)
            self.facts = replace(self.facts, flash_attn=before)
        if job.kind == "verify":
            if self.facts is not None:
                expect = job.vars.get("expect") if job.vars.get("expect") in EXPECTS else None
                result["verification"] = simulate_for_facts(self.facts, mode="quick", expect=expect).to_json()
            else:
                result.update(passed=True, reason="simulated GPU model")
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result=result)
