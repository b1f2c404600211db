"""The agent's check before a step that disturbs the node: are users' jobs on its GPUs? (docs/rollout.md, "Busy GPUs")

``BusyGuard`` wraps the agent's job runner. For a job of a disturbing kind (``fleet.workload.DISTURBING_KINDS``:
install, build, rollback, verification) it reads the GPUs' use (``agent.gpu_use``) and applies the job's policy
(job variable ``busy_policy``, default: wait up to half an hour): the step runs when its GPUs are idle, waits
(polling, with a ``fleet_gpu_busy`` event when what holds them changes), or ends without running — skipped or
failed, with ``result["busy"]`` naming the GPUs and processes and the status ``BUSY_RC``. A verification runs on
the GPUs the decision chose (job variable ``gpu_indices``). The policy variable never reaches a playbook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from fleetctl.agent.gpu_use import GpuUseSource
from fleetctl.agent.jobs import JobRunner
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.workload import (
    BUSY_RC,
    DISTURBING_KINDS,
    GPUS_VAR,
    POLICY_VAR,
    RESULT_KEY,
    BusyPolicy,
    Verdict,
    decide,
)

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 10.0


def wait_limit(policy_timeout_s: float, job_timeout_s: float) -> float:
    """How long a job may wait for idle GPUs: its policy's timeout, but leaving the step itself room within the
    job's own timeout (at most a minute, at most half of it) — else the agent's job timeout would end the wait
    with a message that does not say the GPUs were busy."""
    reserve = min(60.0, job_timeout_s / 2)
    return max(0.0, min(policy_timeout_s, job_timeout_s - reserve))


class BusyGuard:
    def __init__(self, inner: JobRunner, use: GpuUseSource, *, poll_s: float = DEFAULT_POLL_S) -> None:
        self.inner = inner
        self.use = use
        self.poll_s = poll_s

    def bind(self, agent: Any) -> None:
        if hasattr(self.inner, "bind"):
            self.inner.bind(agent)

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        variables = dict(job.vars)
        raw = variables.pop(POLICY_VAR, None)
        variables.pop(GPUS_VAR, None)  # only the decision below sets it
        if job.kind not in DISTURBING_KINDS:
            return await self.inner.run(dataclasses.replace(job, vars=variables), emit_event)
        try:
            policy = BusyPolicy.from_vars(raw)
        except UsageError as exc:
            return JobOutcome(job.job_id, JobStatus.FAILED, rc=2, error=f"bad job: {exc.message}")
        policy = dataclasses.replace(policy, timeout_s=wait_limit(policy.timeout_s, job.timeout_s))
        started = time.monotonic()
        said = ""
        while True:
            report = await asyncio.to_thread(self.use.read)
            waited = time.monotonic() - started
            decision = decide(report, policy, kind=job.kind, waited_s=waited)
            if decision.verdict == Verdict.RUN:
                break
            if decision.verdict != Verdict.WAIT:
                log.info("job %s (%s): %s", job.job_id, job.kind, decision.reason)
                record = decision.record(report, policy, waited)
                emit_event({"event": "fleet_gpu_busy", "event_data": record})
                return JobOutcome(job.job_id, JobStatus.FAILED, rc=BUSY_RC, result={RESULT_KEY: record},
                                  error=decision.reason)
            if decision.reason != said:  # once per change of what holds the GPUs, not once per poll
                said = decision.reason
                log.info("job %s (%s): %s", job.job_id, job.kind, decision.reason)
                emit_event({"event": "fleet_gpu_busy", "event_data": {"action": "waiting", "reason": decision.reason,
                                                                      "busy_gpus": [g.index for g in decision.busy],
                                                                      "simulated": report.simulated}})
            await asyncio.sleep(self.poll_s)
        if said or decision.reason:
            emit_event({"event": "fleet_gpu_idle", "event_data": {"waited_s": round(waited, 1), "gpus": list(
                decision.gpus), "reason": decision.reason, "simulated": report.simulated}})
        if job.kind == "verify":
            variables[GPUS_VAR] = list(decision.gpus)
        outcome = await self.inner.run(dataclasses.replace(job, vars=variables), emit_event)
        if job.kind == "verify" and decision.gpus:  # which GPUs were measured, whatever the runner reports
            outcome.result.setdefault("gpus", list(decision.gpus))
        if said:  # the result says the step waited for the node's users
            outcome.result.setdefault("busy_wait_s", round(waited, 1))
        return outcome
