"""The simulated executor of a simulated node (``fleet-agent run --simulate PROFILE --executor simulated``).

A simulated node has no GPU and usually no Debian root of its own, so what a playbook *does* there is
simulated: each job kind takes a while, succeeds or fails as the node's profile says, and changes the
node's (simulated) facts the way the real playbook changes a real node — ``install-wheel`` and
``build-from-source`` install the target flash-attn (replacing the one of its distribution; FA3 and FA4 go
beside an FA2, as pip puts them), ``rollback`` restores the previous one. A build
writes a small stand-in wheel and hands it back (``result["built_wheel"]``) and, when bound to the
agent, uploads it through the agent's real ``UploadArtifact`` RPC. ``verify`` returns the GPU model's
verification result (agent/verify/simulated.py). Everything is flagged ``simulated``.

Behaviour per node (profile facts ``extra`` or environment, JSON):

* ``job_faults`` / ``$FLEET_SIM_JOB_FAULTS``: ``{"install-wheel": "error text", …}`` → that job fails;
* ``job_seconds`` / ``$FLEET_SIM_JOB_SECONDS``: ``{"build-from-source": 5, "*": 0.5}`` durations.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from fleetctl.agent.verify.simulated import simulate_for_facts
from fleetctl.fleet.facts import FlashAttnFacts, NodeFacts, same_distribution, with_installed
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.verification import EXPECTS

DEFAULT_SECONDS: Mapping[str, float] = {"build-from-source": 4.0, "*": 0.6}


def rollback_result(before: FlashAttnFacts | None, now: FlashAttnFacts | None) -> dict[str, Any]:
    """rollback.yml's ``rollback`` result on a node whose flash-attn facts go back from ``now`` to ``before``:
    it acts on the distribution the install changed only (FA4's, with an FA2 beside it left alone) and restores
    what the node had of that one, or removes it (nothing changed since: the record's own is restored again)."""
    was = before.installed if before else ()
    changed = next((f.variant for f in (now.installed if now else ()) if f not in was), None)
    if changed is None:
        previous = was[0] if was else None
    else:
        previous = next((f for f in was if same_distribution(f.variant, changed)), None)
    return {"action": "restored" if previous else "removed",
            "restored_version": previous.version if previous else None}


class Uploader(Protocol):
    """``Agent.upload_artifact``: the controller accepts a build's wheel only with its job id."""

    def __call__(self, path: Path, kind: str = "other", *, job_id: str = "") -> Awaitable[str]: ...


def _json_env(name: str) -> dict[str, Any]:
    try:
        value = json.loads(os.environ.get(name) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class SimulatedJobRunner:
    def __init__(self, facts: Callable[[], NodeFacts], work_dir: Path) -> None:
        self.facts = facts()
        self.work_dir = work_dir
        extra = self.facts.extra if isinstance(self.facts.extra, Mapping) else {}
        self.faults: dict[str, str] = {**_json_env("FLEET_SIM_JOB_FAULTS"), **(extra.get("job_faults") or {})}
        self.seconds: dict[str, float] = {**DEFAULT_SECONDS, **_json_env("FLEET_SIM_JOB_SECONDS"),
                                          **(extra.get("job_seconds") or {})}
        self.uploader: Uploader | None = None
        # what rollback.yml's record on a real node holds: the flash-attn before the last install that changed
        # it (None inside: there was none); None: no install recorded, nothing to roll back
        self.before_install: tuple[FlashAttnFacts | None] | None = None
        self._load()

    # What a job installed (and rollback.yml's record) lives on a real node's disk and survives an agent
    # restart; kept in the work dir so a restarted (kill -9'ed) simulated agent does not fall back to its
    # profile's flash-attn and fail the verify of a node it installed (benchmarks/chaos_kill9.py).
    @property
    def _state_file(self) -> Path:
        return self.work_dir / "simulated-node.json"

    def _load(self) -> None:
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return  # never installed anything: the profile's facts

        def fa(v: Any) -> FlashAttnFacts | None:
            if not isinstance(v, dict):
                return None
            beside = tuple(FlashAttnFacts(str(b["version"]), str(b["variant"])) for b in v.get("beside") or [])
            return FlashAttnFacts(str(v["version"]), str(v["variant"]), beside)

        self.facts = replace(self.facts, flash_attn=fa(data.get("flash_attn")))
        before = data.get("before_install")
        self.before_install = (fa(before[0]),) if isinstance(before, list) and before else None

    def _save(self) -> None:
        def fa(v: FlashAttnFacts | None) -> dict[str, Any] | None:
            return {"version": v.version, "variant": v.variant,
                    "beside": [{"version": b.version, "variant": b.variant} for b in v.beside]} if v else None

        data = {"flash_attn": fa(self.facts.flash_attn),
                "before_install": [fa(self.before_install[0])] if self.before_install is not None else None}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._state_file)  # a kill mid-write leaves the old record, never half of one

    def bind(self, agent: Any) -> None:
        """Upload built wheels through this agent's ``upload_artifact``."""
        self.uploader = agent.upload_artifact

    def current_facts(self) -> NodeFacts:
        return self.facts

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        emit_event({"event": "playbook_on_task_start", "event_data": {"task": f"simulated {job.kind}",
                                                                       "simulated": True}})
        await asyncio.sleep(float(self.seconds.get(job.kind, self.seconds.get("*", 0.5))))
        fault = self.faults.get(job.kind)
        if fault:
            emit_event({"event": "runner_on_failed", "event_data": {"task": job.kind, "msg": fault}})
            return JobOutcome(job.job_id, JobStatus.FAILED, rc=2, result={"simulated": True}, error=str(fault))
        result: dict[str, Any] = {"simulated": True, "stats": {"changed": 1}}
        version = job.vars.get("flash_attn_version")
        if job.kind == "build-from-source":
            self.work_dir.mkdir(parents=True, exist_ok=True)
            key = str(job.vars.get("build_key") or "")
            tag = hashlib.sha256(key.encode()).hexdigest()[:8]
            dist = str(job.vars.get("dist_name") or "flash-attn").replace("-", "_")  # the controller checks it
            wheel = self.work_dir / f"{dist}-{version}+sim{tag}-cp3-none-linux_x86_64.whl"
            wheel.write_bytes(f"simulated flash-attn wheel, build key {key}\n".encode())
            sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if self.uploader is not None:
                sha = await self.uploader(wheel, "wheel", job_id=job.job_id)
            result["built_wheel"] = {"path": str(wheel), "sha256": sha, "filename": wheel.name}
        if job.kind in ("install-wheel", "build-from-source") and version:
            variant = str(job.vars.get("variant") or "fa2").split("-")[0]
            installed = with_installed(self.facts.flash_attn, FlashAttnFacts(str(version), variant))
            if self.facts.flash_attn != installed:
                self.before_install = (self.facts.flash_attn,)
            self.facts = replace(self.facts, flash_attn=installed)
            self._save()
        elif job.kind == "rollback":  # like rollback.yml: restore what the node's own record says
            if self.before_install is None:
                result["rollback"] = {"action": "none", "restored_version": None}
            else:
                (before,) = self.before_install
                result["rollback"] = rollback_result(before, self.facts.flash_attn)
                self.facts = replace(self.facts, flash_attn=before)
                self._save()
        elif job.kind == "verify":
            mode = str(job.vars.get("mode") or "quick")
            expect = job.vars.get("expect") if job.vars.get("expect") in EXPECTS else None
            result["verification"] = simulate_for_facts(self.facts, mode=mode if mode in ("quick", "full")
                                                        else "quick", expect=expect).to_json()
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result=result)
