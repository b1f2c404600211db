"""The Slurm ``SchedulerHook``: drain the node before a disturbing step, wait for its jobs, resume it after.

::

    scontrol update nodename=N state=drain reason="fleetctl: install-wheel <job id>"
    scontrol show node -o N        (every poll_s until DRAIN is set and nothing is allocated: drained)
    … the step …
    scontrol update nodename=N state=resume

A node that was drained before (by an operator: any reason not starting with ``fleetctl:``) or is down is not
drained again and never resumed by us; we still wait until it runs no job. A drain left by an earlier step of ours
(the agent died before it could resume) is taken over and resumed. An operator who re-drains the node while the
step runs (the reason is no longer ours) has the last word: it stays drained. ``parse_node`` and ``SlurmNode`` are
pure; ``scontrol`` runs with the agent's environment (``SLURM_CONF`` …).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import time
from dataclasses import dataclass

from fleetctl.agent.busy_guard import wait_limit
from fleetctl.agent.scheduler_hooks import Hold, Report, SchedulerHookError, Step, run_process
from fleetctl.fleet.jobs import JobStatus

log = logging.getLogger(__name__)

#: every drain reason we set starts so; a drain with another reason is an operator's
REASON_PREFIX = "fleetctl:"
#: base states in which jobs still hold the node
BUSY_STATES = frozenset({"ALLOCATED", "MIXED", "COMPLETING", "DRAINING"})
_FIELD_RE = re.compile(r"(?:^|\s)([A-Za-z_]+)=")
_REASON_STAMP_RE = re.compile(r"\s*\[[^\]]*@[^\]]*\]\s*$")  # " [root@2026-12-03T13:26:14]" that Slurm appends


@dataclass(frozen=True)
class SlurmNode:
    """A node as ``scontrol show node -o`` shows it: ``state`` ``IDLE+DRAIN`` is base ``IDLE``, flags ``DRAIN``."""

    name: str
    state: str
    flags: frozenset[str]
    cpus_allocated: int
    reason: str

    @property
    def shown(self) -> str:
        return "+".join([self.state, *sorted(self.flags)])

    @property
    def drain_set(self) -> bool:
        return "DRAIN" in self.flags or self.state in ("DRAINED", "DRAINING")

    @property
    def busy(self) -> bool:
        return self.state in BUSY_STATES or "COMPLETING" in self.flags or self.cpus_allocated > 0

    @property
    def drained(self) -> bool:
        """Drained: no new job starts here, and none runs."""
        return self.drain_set and not self.busy

    @property
    def ours(self) -> bool:
        return self.reason.startswith(REASON_PREFIX)


def parse_node(text: str, name: str) -> SlurmNode:
    """``scontrol show node -o NAME``'s one line as a ``SlurmNode``; ``SchedulerHookError`` when it is not one.
    ``Reason=`` comes last and may hold spaces and ``=``: everything after it is the reason."""
    line = text.strip()
    head, _, reason = line.partition(" Reason=")
    fields: dict[str, str] = {}
    marks = list(_FIELD_RE.finditer(head))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(head)
        fields[mark.group(1)] = head[mark.end():end].strip()
    if fields.get("NodeName") != name or "State" not in fields:
        raise SchedulerHookError(f"scontrol show node {name} answered something that is not that node: {line[:200]!r}",
                                 hint="check that --slurm-node-name is this node's NodeName in Slurm (`sinfo -N`)")
    base, *flags = fields["State"].split("+")
    try:
        cpus = int(fields.get("CPUAlloc", "0"))
    except ValueError:
        cpus = 0
    return SlurmNode(name, base.rstrip("*~#$@%!^-"), frozenset(flags), cpus, _REASON_STAMP_RE.sub("", reason))


def drain_reason(step: Step) -> str:
    return f"{REASON_PREFIX} {step.kind} {step.job_id}"


def resume_command(node: str) -> str:
    return f"scontrol update nodename={shlex.quote(node)} state=resume"


class SlurmHook:
    """Drains ``node`` through ``scontrol`` (a path or a name on PATH) around each disturbing step."""

    name = "slurm"

    def __init__(self, node: str, *, drain_timeout_s: float = 1800.0, poll_s: float = 2.0,
                 scontrol: str = "scontrol", command_timeout_s: float = 30.0) -> None:
        self.node = node
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self.scontrol = scontrol
        self.command_timeout_s = command_timeout_s

    async def _scontrol(self, *args: str) -> str:
        argv = [self.scontrol, *args]
        done = await run_process(argv, timeout_s=self.command_timeout_s,
                                 hint="install Slurm's client commands on this node (Debian: slurm-client) and check "
                                      "that slurmctld answers (`scontrol ping`, SLURM_CONF), or start the agent "
                                      "without --scheduler slurm")
        if done.rc != 0:
            raise SchedulerHookError(f"`{shlex.join(argv)}` failed (exit {done.rc}): {done.tail()}",
                                     hint="check that slurmctld answers (`scontrol ping`) and that --slurm-node-name "
                                          f"{self.node!r} is this node's NodeName (`sinfo -N`); the agent must run "
                                          "as root or SlurmUser to drain nodes")
        return done.stdout

    async def show(self) -> SlurmNode:
        return parse_node(await self._scontrol("show", "node", "-o", self.node), self.node)

    async def _update(self, *settings: str) -> None:
        await self._scontrol("update", f"nodename={self.node}", *settings)

    async def acquire(self, step: Step, report: Report) -> Hold:
        started = time.monotonic()
        node = await self.show()
        if node.drain_set and not node.ours:
            ours, found = False, f"was drained by an operator (reason: {node.reason or 'none'}) and stays so"
        elif node.state == "DOWN":
            ours, found = False, "is down in Slurm and stays so"
        else:
            # a drain of ours left by an agent that died before its resume is taken over (and resumed after)
            ours, found = True, "drained" if not node.drain_set else "drained (an earlier fleetctl drain, taken over)"
            await self._update("state=drain", f"reason={drain_reason(step)}")
        try:
            node = await self._wait_drained(node if not ours else await self.show(), step, report)
        except SchedulerHookError as exc:  # timed out, or scontrol failed: give back what we took
            problem = await self._undo_drain() if ours else ""
            if problem:
                raise SchedulerHookError(f"{exc.message}; {problem}", hint=resume_command(self.node)) from exc
            raise
        except asyncio.CancelledError:  # the job's timeout or the agent stopping
            if ours:
                await self._undo_drain()
            raise
        waited = time.monotonic() - started
        return Hold(ours, f"{self.node} {found} for {step.kind}, no job runs there ({waited:.0f} s; "
                          f"state {node.shown})")

    async def _wait_drained(self, node: SlurmNode, step: Step, report: Report) -> SlurmNode:
        # the job's own timeout would end a longer wait with a message that does not say Slurm jobs still ran
        limit = wait_limit(self.drain_timeout_s, step.timeout_s)
        deadline = time.monotonic() + limit
        shown = ""
        while not (node.drained or node.state == "DOWN"):
            if node.shown != shown:
                shown = node.shown
                report(f"waiting for the Slurm jobs on {self.node} to end (state {shown}, "
                       f"{node.cpus_allocated} CPUs allocated)")
            if time.monotonic() >= deadline:
                waited = f"the drain timeout of {limit:g} s" if limit >= self.drain_timeout_s else (
                    f"{limit:g} s, as long as the job's timeout of {step.timeout_s:g} s allows")
                raise SchedulerHookError(
                    f"Slurm jobs still run on {self.node} after {waited} (state {node.shown})",
                    hint=f"see `squeue -w {self.node}`; let them end or cancel them and run the step again, or raise "
                         "the agent's --drain-timeout (and the step's timeout)")
            await asyncio.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
            node = await self.show()
        return node

    async def _undo_drain(self) -> str:
        """Resume after a drain whose step will not run; what went wrong, or ""."""
        try:
            await self._update("state=resume")
        except SchedulerHookError as exc:
            log.error("%s stays drained in Slurm: %s; run `%s`", self.node, exc.message, resume_command(self.node))
            return f"and resuming it failed ({exc.message}): it stays drained"
        return ""

    async def release(self, step: Step, hold: Hold, status: JobStatus) -> str:
        held = time.monotonic() - hold.since
        if not hold.ours:
            return f"{self.node} left as it was (not drained by fleetctl)"
        try:
            node = await self.show()
            if node.drain_set and not node.ours:
                return f"{self.node} left drained: an operator drained it during the step (reason: {node.reason})"
            if node.drain_set:
                await self._update("state=resume")
        except SchedulerHookError as exc:
            raise SchedulerHookError(f"{self.node} stays drained in Slurm after {held:.0f} s: {exc.message}",
                                     hint=resume_command(self.node)) from exc
        return f"{self.node} drained for {held:.0f} s, resumed ({step.kind} {status})"
