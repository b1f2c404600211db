"""The ``verify`` job on a real node: ``run_verification`` in the node's target Python.

``VerifyJobRunner`` is the agent's ``JobRunner`` for job kind ``verify``. Job vars:
``mode`` (quick | full, default quick), ``expect`` (flash_attn | fa3 | fa4 | sdpa: what bench.py verifies),
``model_path`` (a local causal LM for the end-to-end check), ``python`` (override the target interpreter),
``timeout_s`` (the bench's outer timeout; default per mode, always below the job's own timeout), ``gpu_indices``
(set by the agent's busy check, agent/busy_guard.py: the idle GPUs to measure, one bench each, one after the
other, sharing the timeout; the result lists them in ``gpus`` and each one's verdict in ``per_gpu``, and its
``verification`` is the worst GPU's). The job
succeeds whenever the verification produced a result — pass or not: the verdict is in ``result["verification"]`` (the
``fleet.verification`` JSON) and summarised in ``result["status"]`` / ``result["passed"]``; the
controller stores and judges it (controller.verify_store).

``CompositeRunner`` sends each job kind to its runner (``verify`` → ``VerifyJobRunner``, playbook kinds
→ ``AnsibleJobRunner``). The agent never imports torch: bench.py runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from fleetctl.fleet.verification import VerificationResult
from fleetctl.fleet.workload import GPUS_VAR

log = logging.getLogger(__name__)

PythonSource = Callable[[], str | None]


def target_env() -> dict[str, str]:
    """The agent's environment without PYTHONPATH: the target Python sees only its own packages (the agent's
    may come from a PYTHONPATH of carried wheels that must not shadow torch's dependencies). CUDA numbers the
    GPUs in PCI bus order, as NVML does, so ``cuda:N`` is the GPU the busy check calls N."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


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

    def devices(self, job: JobSpec) -> list[tuple[int | None, str]]:
        """(GPU index, torch device) pairs to measure: the GPUs the agent's busy check chose (``gpu_indices``;
        agent/busy_guard.py), else the default device."""
        chosen = job.vars.get(GPUS_VAR)
        if isinstance(chosen, list) and chosen and all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in chosen):
            return [(i, f"cuda:{i}") for i in chosen]
        return [(None, "cuda:0")]

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        try:
            req = self.request(job)
        except FleetError as exc:
            return JobOutcome(job.job_id, JobStatus.ERROR, rc=2, result={}, error=f"bad verify job: {exc.message}")
        devices = self.devices(job)
        # one bench per GPU, one after the other: each gets the mode's time, as far as the job's timeout allows
        share = max(5.0, min(req.total_timeout, (job.timeout_s - 10.0) / len(devices)))
        measured: list[tuple[int | None, VerificationResult]] = []
        for index, device in devices:
            one = dataclasses.replace(req, device=device, timeout_s=share,
                                      workdir=req.workdir / f"gpu{index}" if req.workdir and index is not None
                                      else req.workdir)
            emit_event({"event": "fleet_verify_started", "event_data": {"mode": one.mode, "python": one.python,
                                                                        "expect": one.expect, "gpu": index}})
            result = await asyncio.to_thread(run_verification, one)
            emit_event({"event": "fleet_verify_finished", "event_data": {"status": result.status, "gpu": index,
                                                                         "duration_s": result.duration_s}})
            measured.append((index, result))
        # the stored verdict is the worst GPU's: a node passes only when every GPU measured passes
        worst = next((r for _, r in measured if not r.passed), measured[0][1])
        out: dict[str, Any] = {"verification": worst.to_json(), "status": worst.status,
                               "passed": all(r.passed for _, r in measured), "simulated": worst.simulated}
        if devices[0][0] is not None:
            out["gpus"] = [i for i, _ in measured]
            out["per_gpu"] = [{"index": i, "status": r.status, "passed": r.passed, "reasons": list(r.reasons)[:3]}
                              for i, r in measured]
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result=out)


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
