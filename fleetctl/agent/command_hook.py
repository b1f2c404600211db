"""The generic ``SchedulerHook``: an operator's own commands before and after each disturbing step.

For every scheduler fleetctl does not know: ``fleet-agent run --pre-step-hook CMD --post-step-hook CMD``. Each
command runs with ``/bin/sh -c`` in the agent's environment plus (``step_environment``)::

    FLEET_HOOK_PHASE   pre | post
    FLEET_JOB_KIND     install-wheel, build-from-source, rollback, verify
    FLEET_JOB_ID       the job's id
    FLEET_ROLLOUT_ID   the rollout the job belongs to ("" when none)
    FLEET_STEP_STATUS  post only: how the step ended (successful, failed, timeout, canceled)

A pre command that exits non-zero (or outlives its timeout) stops the step, which does not run; the post command
runs after every step whose pre command succeeded, also a failed one, and a failing post command fails the job.
"""

from __future__ import annotations

import os
import shlex
import time

from fleetctl.agent.scheduler_hooks import Hold, Report, SchedulerHookError, Step, run_process
from fleetctl.fleet.jobs import JobStatus


def step_environment(step: Step, phase: str, status: JobStatus | None = None) -> dict[str, str]:
    env = {"FLEET_HOOK_PHASE": phase, "FLEET_JOB_KIND": step.kind, "FLEET_JOB_ID": step.job_id,
           "FLEET_ROLLOUT_ID": step.rollout_id}
    if status is not None:
        env["FLEET_STEP_STATUS"] = str(status)
    return env


class CommandHook:
    name = "command"

    def __init__(self, pre: str | None, post: str | None, *, timeout_s: float = 600.0) -> None:
        self.pre = pre
        self.post = post
        self.timeout_s = timeout_s

    async def _run(self, command: str, flag: str, env: dict[str, str]) -> str:
        """Run one hook command; its last output line, or ``SchedulerHookError``."""
        started = time.monotonic()
        done = await run_process(["/bin/sh", "-c", command], timeout_s=self.timeout_s, env={**os.environ, **env},
                                 hint=f"make {flag} finish within --step-hook-timeout ({self.timeout_s:g} s)")
        if done.rc != 0:
            raise SchedulerHookError(f"{flag} exited {done.rc}: {done.tail() or 'no output'}",
                                     hint=f"fix the command given as {flag}: {command}")
        last = (done.stdout.strip().splitlines() or [""])[-1][:200]
        return f"{flag} succeeded in {time.monotonic() - started:.1f} s" + (f": {last}" if last else "")

    async def acquire(self, step: Step, report: Report) -> Hold:
        if not self.pre:
            return Hold(True, "no --pre-step-hook")
        return Hold(True, await self._run(self.pre, "--pre-step-hook", step_environment(step, "pre")))

    async def release(self, step: Step, hold: Hold, status: JobStatus) -> str:
        if not self.post:
            return "no --post-step-hook"
        env = step_environment(step, "post", status)
        try:
            return await self._run(self.post, "--post-step-hook", env)
        except SchedulerHookError as exc:
            by_hand = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "sh -c", shlex.quote(self.post)])
            raise SchedulerHookError(exc.message, hint=f"run it by hand: {by_hand}") from exc
