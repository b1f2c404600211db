"""The ``verify`` job on a real node: ``run_verification`` in the node's target Python.

``VerifyJobRunner`` is the agent's ``JobRunner`` for job kind ``verify``. Job vars:
``mode`` (quick | full, default quick), ``expect`` (flash_attn | fa3 | fa4 | sdpa: what bench.py verifies),
``model_path`` (a local causal LM for the end-to-end check), ``python`` (override the target interpreter),
``timeout_s`` (the bench's outer timeout; default per mode, always below the job's own timeout). The job
succeeds whenever the verification produced a result — pass or not: the verdict is in ``result["verification"]`` (the
``fleet.verification`` JSON) and summarised in ``result["status"]`` / ``result["passed"]``; the
controller stores and judges it (controller.verify_store).

``CompositeRunner`` sends each job kind to its runner (``verify`` → ``VerifyJobRunner``, playbook kinds
→ ``AnsibleJobRunner``). The agent never imports torch: bench.py runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetctl.agent.jobs import JobRunner
from fleetctl.agent.verify.runner import DEFAULT_TIMEOUT_S, VerifyRequest, run_verification
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus

log = logging.getLogger(__name__)

PythonSource = Callable[[], str | None]


def target_env() -> dict[str, str]:
    """The agent's environment without PYTHONPATH: the target Python sees only its own packages (the agent's
    may come from a PYTHONPATH of carried wheels that must not shadow torch's dependencies)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@dataclass
class VerifyJobRunner:
    python: PythonSource  # the node's target interpreter (from --python or the probed facts)
    work_dir: Path | None = None

    def request(self, job: JobSpec) -> VerifyRequest:
        v = job.vars
        mode = str(v.get("mode") or "quick")
        python = str(v.get("python") or self.python() or sys.executable)
        timeout = v.get("timeout_s")
        if not isinstance(timeout, int | float) or timeout <= 0:
            timeout = DEFAULT_TIMEOUT_S.get(mode, 150.0)
        # the agent kills the job at job.timeout_s: leave room to report the bench's own timeout result
        timeout = max(5.0, min(float(timeout), job.timeout_s - 10.0))
        workdir = None
        if self.work_dir is not None:
            workdir = self.work_dir / job.job_id
            workdir.mkdir(parents=True, exist_ok=True)
        return VerifyRequest(python=python, mode=mode, model_path=str(v["model_path"]) if v.get("model_path")
                             else None, expect=str(v.get("expect") or "flash_attn"), timeout_s=timeout,
                             workdir=workdir, env=target_env())

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        try:
            req = self.request(job)
        except FleetError as exc:
            return JobOutcome(job.job_id, JobStatus.ERROR, rc=2, result={}, error=f"bad verify job: {exc.message}")
        emit_event({"event": "fleet_verify_started", "event_data": {"mode": req.mode, "python": req.python,
                                                                    "expect": req.expect}})
        result = await asyncio.to_thread(run_verification, req)
        emit_event({"event": "fleet_verify_finished", "event_data": {"status": result.status,
                                                                     "duration_s": result.duration_s}})
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0,
                          result={"verification": result.to_json(), "status": result.status,
                                  "passed": result.passed, "simulated": result.simulated})


class CompositeRunner:
    """Dispatch by job kind; anything without its own runner goes to ``default``."""

    def __init__(self, runners: Mapping[str, JobRunner], default: JobRunner) -> None:
        self.runners = dict(runners)
        self.default = default

    def bind(self, agent: Any) -> None:
        for r in (self.default, *self.runners.values()):
            if hasattr(r, "bind"):
                r.bind(agent)

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        return await self.runners.get(job.kind, self.default).run(job, emit_event)
