"""Scheduler hooks: take the node out of its scheduler before a step that disturbs it, give it back after.

A GPU node belongs to a workload scheduler. Before a job that disturbs the node (``fleet.workload.DISTURBING_KINDS``:
an install, a build, a rollback, a verification) ``HookedJobRunner`` asks each ``SchedulerHook`` to ``acquire`` the
node (Slurm: drain it and wait until its running jobs have ended), runs the job, then asks each hook to ``release``
it (Slurm: resume) — also when the job failed, timed out or was cancelled. A hook remembers what it found: a node
an operator had drained before is left drained. A release that fails fails the job, with the command to run by
hand, so a node is never left out of its scheduler silently.

Implementations: ``SlurmHook`` (``scontrol``, agent/slurm_hook.py) and ``CommandHook`` (an operator's own pre/post
commands, agent/command_hook.py); Kubernetes' cordon/uncordon implements the same protocol. Each hook's outcome
goes into the job's events (``fleet_scheduler_hook``: ``task`` and ``msg`` as the dashboard shows them) and its
result (``result["scheduler"][hook name]``). docs/operations.md, "Schedulers".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fleetctl.agent.jobs import JobRunner
from fleetctl.fleet.errors import ExecutionError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.workload import DISTURBING_KINDS

log = logging.getLogger(__name__)

#: the rc of a job whose step never ran because a hook could not acquire the node (EX_TEMPFAIL)
HOOK_FAILED_RC = 75


class SchedulerHookError(ExecutionError):
    """A scheduler hook could not take the node out of its scheduler, or could not give it back."""

    code = "scheduler-hook"


@dataclass(frozen=True)
class Step:
    """The step a hook guards, as hooks and their commands see it."""

    kind: str
    job_id: str
    rollout_id: str = ""
    timeout_s: float = 3600.0  # the job's: a hook's wait leaves the step room within it

    @staticmethod
    def of(job: JobSpec) -> Step:
        rollout = job.vars.get("rollout_id")
        return Step(job.kind, job.job_id, rollout if isinstance(rollout, str) else "", job.timeout_s)


@dataclass(frozen=True)
class Hold:
    """What ``acquire`` did, so that ``release`` undoes exactly that: ``ours`` is False when the node was already
    out of its scheduler (an operator's drain) and must stay so. ``note`` is one line for the job's events."""

    ours: bool
    note: str
    since: float = dataclasses.field(default_factory=time.monotonic)  # when the node left its scheduler


Report = Callable[[str], None]
"""A hook's progress line (``waiting for 1 running Slurm job on n1``), sent as an event of the job."""


class SchedulerHook(Protocol):
    #: short name, the key in ``result["scheduler"]`` (``slurm``, ``command``, ``kubernetes``)
    name: str

    async def acquire(self, step: Step, report: Report) -> Hold:
        """Take the node out of its scheduler and wait until it runs nothing; ``SchedulerHookError`` when that
        fails or takes too long — after undoing whatever this call changed."""
        ...

    async def release(self, step: Step, hold: Hold, status: JobStatus) -> str:
        """Give the node back (the step ended with ``status``); returns one line for the job's events.
        ``SchedulerHookError`` whose hint is the command an operator runs to do it by hand."""
        ...


class HookedJobRunner:
    """A ``JobRunner`` that wraps ``inner``'s disturbing jobs in ``hooks`` (acquired in order, released in
    reverse). Disturbing jobs run one at a time: a second one would otherwise see the first one's resume."""

    def __init__(self, inner: JobRunner, hooks: Sequence[SchedulerHook],
                 kinds: frozenset[str] = DISTURBING_KINDS) -> None:
        self.inner = inner
        self.hooks = tuple(hooks)
        self.kinds = kinds
        self._one_at_a_time = asyncio.Lock()

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        if job.kind not in self.kinds or not self.hooks:
            return await self.inner.run(job, emit_event)
        async with self._one_at_a_time:
            return await self._run_hooked(job, emit_event)

    async def _run_hooked(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        step = Step.of(job)
        records: dict[str, dict[str, Any]] = {}
        held: list[tuple[SchedulerHook, Hold]] = []

        def event(hook: SchedulerHook, phase: str, msg: str) -> None:
            emit_event({"event": "fleet_scheduler_hook", "event_data": {
                "task": f"scheduler hook: {hook.name}", "hook": hook.name, "phase": phase, "msg": msg}})

        outcome: JobOutcome | None = None
        try:
            for hook in self.hooks:
                started = time.monotonic()
                event(hook, "acquire", f"{hook.name}: preparing the node for {step.kind}")
                try:
                    hold = await hook.acquire(step, functools.partial(event, hook, "progress"))
                except SchedulerHookError as exc:
                    waited = time.monotonic() - started
                    event(hook, "acquire-failed", f"{exc.message} (hint: {exc.hint})")
                    records[hook.name] = {"acquired": False, "waited_s": round(waited, 1), "error": exc.message}
                    outcome = JobOutcome(job.job_id, JobStatus.FAILED, rc=HOOK_FAILED_RC,
                                         error=f"scheduler hook {hook.name} failed before the {step.kind} step, "
                                               f"which did not run: {exc.message} (hint: {exc.hint})")
                    break
                waited = time.monotonic() - started
                event(hook, "acquired", hold.note)
                records[hook.name] = {"acquired": True, "ours": hold.ours, "waited_s": round(waited, 1),
                                      "note": hold.note}
                held.append((hook, hold))
            else:
                outcome = await self.inner.run(job, emit_event)
        finally:
            # also on cancellation (the job's timeout, the agent stopping): the node goes back to its scheduler
            status = outcome.status if outcome is not None else JobStatus.FAILED
            failures = [await self._release(hook, hold, step, status, records, event) for hook, hold in reversed(held)]
        assert outcome is not None  # set on every path that does not raise
        return _with_records(outcome, records, [f for f in failures if f])

    @staticmethod
    async def _release(hook: SchedulerHook, hold: Hold, step: Step, status: JobStatus,
                       records: dict[str, dict[str, Any]],
                       event: Callable[[SchedulerHook, str, str], None]) -> str:
        """Release one hook; returns the loud message when it failed (else "")."""
        record = records[hook.name]
        record["held_s"] = round(time.monotonic() - hold.since, 1)
        try:
            note = await hook.release(step, hold, status)
        except SchedulerHookError as exc:
            loud = f"scheduler hook {hook.name} could not give the node back: {exc.message}; run: {exc.hint}"
            log.error("job %s: %s", step.job_id, loud)
            event(hook, "release-failed", loud)
            record.update(released=False, error=exc.message, fix=exc.hint)
            return loud
        event(hook, "released", note)
        record.update(released=True, release_note=note)
        return ""


def _with_records(outcome: JobOutcome, records: dict[str, dict[str, Any]], failures: list[str]) -> JobOutcome:
    """The step's outcome with the hooks' records; a failed release fails the job (the step's own status stays in
    the result): a node left out of its scheduler must be seen."""
    result = {**outcome.result, "scheduler": records}
    if not failures:
        return dataclasses.replace(outcome, result=result)
    result["step_status"] = str(outcome.status)
    error = "; ".join([*([outcome.error] if outcome.error else []), *failures])
    return dataclasses.replace(outcome, status=JobStatus.FAILED, result=result, error=error)


@dataclass(frozen=True)
class Finished:
    """A hook's command that ran to its end: exit status and output (text, undecodable bytes replaced)."""

    rc: int
    stdout: str
    stderr: str

    def tail(self, limit: int = 500) -> str:
        """The last ``limit`` characters of what it said (stderr, else stdout), on one line."""
        text = (self.stderr.strip() or self.stdout.strip()).replace("\n", " | ")
        return text[-limit:]


async def run_process(argv: Sequence[str], *, timeout_s: float, hint: str,
                      env: dict[str, str] | None = None) -> Finished:
    """Run ``argv`` (no shell) with a time limit; its own process group is killed when the limit passes or the
    caller is cancelled. ``SchedulerHookError`` (with ``hint``) when it cannot start or does not finish."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
    except OSError as exc:
        raise SchedulerHookError(f"cannot run {argv[0]}: {exc.strerror or exc}", hint=hint) from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException as exc:  # the limit, or the job cancelled: nothing of the command may stay behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise SchedulerHookError(f"`{shlex.join(argv)}` did not finish within {timeout_s:g} s",
                                     hint=hint) from None
        raise
    assert proc.returncode is not None
    return Finished(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
