"""Workload awareness: may a step that disturbs a node run now, while users' jobs hold its GPUs? (docs/rollout.md,
"Busy GPUs"). Pure: fed a snapshot of GPU use, it decides; the agent (agent/busy_guard.py) reads the snapshot and
waits, and the controller only passes the policy along (job variable ``busy_policy``).

* ``WhenBusy`` / ``BusyPolicy``: ``--when-busy wait|skip|fail``, ``--busy-timeout S`` and, for verification,
  ``--gpus all|idle|0,1`` (``GpuChoice``), as they travel in a job's variables.
* ``GpuUse`` / ``UseReport``: what a GPU is doing (compute processes, utilisation), from NVML or from the
  simulated source of a simulated node (then ``simulated``).
* ``decide``: run (on which GPUs), wait, skip or fail — with a reason naming the GPUs and processes.
* ``busy_refusal``: the ``busy`` record of a job that did not run because its GPUs were busy.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetctl.fleet.errors import UsageError

#: Job kinds that disturb a node: they replace packages in the env users' jobs import from, or take the GPU.
DISTURBING_KINDS = frozenset({"install-wheel", "build-from-source", "rollback", "verify"})
#: A GPU whose utilisation is at least this (percent) is busy even when NVML lists no compute process
#: (graphics work, a process in another container whose pid this namespace cannot see).
BUSY_UTILIZATION_PCT = 5
DEFAULT_BUSY_TIMEOUT_S = 1800.0  # half an hour: a short training step or an eval ends; a week-long run does not
MAX_BUSY_TIMEOUT_S = 7 * 24 * 3600.0
#: The job variable that carries the policy (``BusyPolicy.to_vars``); the agent takes it out of the job's variables.
POLICY_VAR = "busy_policy"
#: The job variable the agent fills, for a verify job, with the GPU indices it may measure.
GPUS_VAR = "gpu_indices"
#: ``JobOutcome.result`` key of a job that did not run because of busy GPUs.
RESULT_KEY = "busy"
#: Exit status of such a job (``EX_TEMPFAIL``: try again later).
BUSY_RC = 75


class WhenBusy(enum.StrEnum):
    """What a disturbing step does when its GPUs are busy."""

    WAIT = "wait"  # poll until idle, fail after the timeout
    SKIP = "skip"  # do not run; the rollout records the node ``skipped-busy`` (not a failure)
    FAIL = "fail"  # fail at once, saying who holds the GPUs


class GpuMode(enum.StrEnum):
    ANY = "any"  # one GPU, the lowest-numbered idle one (a verification's default: one benchmark)
    ALL = "all"  # every GPU of the node, all idle
    IDLE = "idle"  # only the GPUs idle now (verification); waits when none is
    LISTED = "listed"  # the indices given, all idle


@dataclass(frozen=True)
class GpuChoice:
    """``--gpus any|all|idle|0,1``: which GPUs a verification measures (installs always need every GPU idle)."""

    mode: GpuMode = GpuMode.ANY
    indices: tuple[int, ...] = ()

    @staticmethod
    def parse(text: str | None) -> GpuChoice:
        value = (text or GpuMode.ANY).strip().lower()
        if value in (GpuMode.ANY, GpuMode.ALL, GpuMode.IDLE):
            return GpuChoice(GpuMode(value))
        parts = [p.strip() for p in value.split(",")]
        if not parts or not all(p.isdigit() and len(p) <= 3 for p in parts):
            raise UsageError(f"bad GPU choice {text!r}", hint="use any, all, idle, or GPU indices like 0,1")
        return GpuChoice(GpuMode.LISTED, tuple(sorted({int(p) for p in parts})))

    def __str__(self) -> str:
        return ",".join(map(str, self.indices)) if self.mode == GpuMode.LISTED else str(self.mode)

    def most_measured(self, gpu_count: int) -> int:
        """The most GPUs a verification measures on a node with ``gpu_count`` (one bench each)."""
        if self.mode == GpuMode.ANY:
            return 1
        return len(self.indices) if self.mode == GpuMode.LISTED else max(1, gpu_count)


@dataclass(frozen=True)
class BusyPolicy:
    when_busy: WhenBusy = WhenBusy.WAIT
    timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    gpus: GpuChoice = GpuChoice()

    @staticmethod
    def of(when_busy: str | None = None, timeout_s: float | None = None, gpus: str | None = None) -> BusyPolicy:
        """From user input (flags, API bodies); bad values are a ``UsageError`` naming the flag."""
        try:
            when = WhenBusy((when_busy or WhenBusy.WAIT).strip().lower())
        except ValueError:
            raise UsageError(f"bad --when-busy {when_busy!r}", hint="use wait, skip or fail") from None
        timeout = DEFAULT_BUSY_TIMEOUT_S if timeout_s is None else float(timeout_s)
        if not 0 <= timeout <= MAX_BUSY_TIMEOUT_S:  # NaN fails this too
            raise UsageError(f"bad --busy-timeout {timeout_s!r}",
                             hint=f"seconds from 0 to {MAX_BUSY_TIMEOUT_S:.0f} (default {DEFAULT_BUSY_TIMEOUT_S:.0f})")
        return BusyPolicy(when, timeout, GpuChoice.parse(gpus))

    def to_vars(self) -> dict[str, Any]:
        return {"when_busy": str(self.when_busy), "timeout_s": self.timeout_s, "gpus": str(self.gpus)}

    @staticmethod
    def from_vars(value: Any) -> BusyPolicy:
        """The policy of a job (``vars[POLICY_VAR]``); absent: the default (wait, half an hour, all GPUs)."""
        if value is None:
            return BusyPolicy()
        if not isinstance(value, Mapping):
            raise UsageError(f"job variable {POLICY_VAR} is not an object", hint="this is a controller bug")
        timeout = value.get("timeout_s")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise UsageError(f"job variable {POLICY_VAR}.timeout_s is not a number")
        gpus = value.get("gpus")
        when = value.get("when_busy")
        return BusyPolicy.of(str(when) if when is not None else None, timeout,
                             str(gpus) if gpus is not None else None)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str = ""  # the command, when the agent may read it
    used_mib: int | None = None

    def describe(self) -> str:
        mem = f", {self.used_mib} MiB" if self.used_mib is not None else ""
        return f"pid {self.pid}" + (f" ({self.name}{mem})" if self.name or mem else "")


@dataclass(frozen=True)
class GpuUse:
    index: int
    utilization_pct: int | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def busy(self) -> bool:
        return bool(self.processes) or (self.utilization_pct or 0) >= BUSY_UTILIZATION_PCT

    def describe(self) -> str:
        held = ", ".join(p.describe() for p in self.processes[:5]) + (
            f" and {len(self.processes) - 5} more" if len(self.processes) > 5 else "")
        util = f"utilisation {self.utilization_pct}%" if self.utilization_pct is not None else ""
        return f"GPU {self.index}: " + "; ".join(x for x in (held, util) if x)


@dataclass(frozen=True)
class UseReport:
    """One look at every GPU of a node. ``error``: why it could not be read (then ``gpus`` may be empty)."""

    gpus: tuple[GpuUse, ...]
    source: str  # "nvml" | "simulated"
    error: str | None = None

    @property
    def simulated(self) -> bool:
        return self.source == "simulated"

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "simulated": self.simulated, "error": self.error,
                "gpus": [{"index": g.index, "utilization_pct": g.utilization_pct, "busy": g.busy,
                          "processes": [{"pid": p.pid, "name": p.name, "used_mib": p.used_mib}
                                        for p in g.processes]} for g in self.gpus]}


class Verdict(enum.StrEnum):
    RUN = "run"
    WAIT = "wait"
    SKIP = "skip"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    gpus: tuple[int, ...] = ()  # RUN: the GPUs the step may use (a verification measures these)
    reason: str = ""
    busy: tuple[GpuUse, ...] = ()  # the busy GPUs that decided it

    def record(self, report: UseReport, policy: BusyPolicy, waited_s: float) -> dict[str, Any]:
        """The ``result["busy"]`` of a job that did not run (SKIP, FAIL)."""
        action = {Verdict.SKIP: "skipped", Verdict.FAIL: "failed"}.get(self.verdict, str(self.verdict))
        return {"action": action, "reason": self.reason, "policy": policy.to_vars(), "waited_s": round(waited_s, 1),
                "busy_gpus": [g.index for g in self.busy], "use": report.to_json()}


def decide(report: UseReport, policy: BusyPolicy, *, kind: str, waited_s: float = 0.0) -> Decision:
    """Whether a ``kind`` step runs now. Installs, builds and rollbacks need every GPU idle (they change the env
    every job on the node imports from); a verification needs the GPUs of ``policy.gpus`` idle, or with ``idle``
    runs on whichever are idle now. When busy: ``policy.when_busy`` — wait (until ``waited_s`` reaches the
    timeout, then fail), skip, or fail. GPU use that cannot be read does not block: the step runs, and the
    reason says the use was unknown (a node without NVML — CPU-only or AMD — would otherwise never install)."""
    label = " (simulated GPUs)" if report.simulated else ""
    if report.error is not None and not report.gpus:
        return Decision(Verdict.RUN, (), f"GPU use unknown ({report.error}); not waiting")
    by_index = {g.index: g for g in report.gpus}
    choice = policy.gpus if kind == "verify" else GpuChoice(GpuMode.ALL)
    if choice.mode == GpuMode.LISTED:
        missing = [i for i in choice.indices if i not in by_index]
        if missing:
            return Decision(Verdict.FAIL, (), f"no GPU {', '.join(map(str, missing))} on this node (it has "
                            f"{', '.join(str(i) for i in sorted(by_index)) or 'none'}){label}")
        wanted = [by_index[i] for i in choice.indices]
    else:
        wanted = sorted(report.gpus, key=lambda g: g.index)
    busy = tuple(g for g in wanted if g.busy)
    if choice.mode in (GpuMode.ANY, GpuMode.IDLE):
        idle = tuple(g.index for g in wanted if not g.busy)
        if idle:
            chosen = idle[:1] if choice.mode == GpuMode.ANY else idle
            return Decision(Verdict.RUN, chosen, f"idle GPU(s) {', '.join(map(str, chosen))}{label}", busy)
    if not busy:
        return Decision(Verdict.RUN, tuple(g.index for g in wanted), "", ())
    held = "; ".join(g.describe() for g in busy)
    what = "every GPU is busy" if choice.mode in (GpuMode.ANY, GpuMode.IDLE) else "GPU(s) busy"
    if policy.when_busy == WhenBusy.FAIL:
        return Decision(Verdict.FAIL, (), f"{kind} not started, {what} (--when-busy fail): {held}{label}", busy)
    if policy.when_busy == WhenBusy.SKIP:
        return Decision(Verdict.SKIP, (), f"{kind} skipped, {what} (--when-busy skip): {held}{label}", busy)
    if waited_s >= policy.timeout_s:
        return Decision(Verdict.FAIL, (), f"{kind} not started: {what} after waiting {waited_s:.0f}s "
                        f"(--busy-timeout {policy.timeout_s:g}): {held}{label}", busy)
    return Decision(Verdict.WAIT, (), f"waiting, {what}: {held}{label}", busy)


def wait_allowance_s(policy_vars: Any, kind: str) -> int:
    """Seconds a ``kind`` job's timeout grows by so that its agent can wait for idle GPUs under the policy
    ``policy_vars`` (``BusyPolicy.to_vars``, None: the default) and still have the step's own time after."""
    if kind not in DISTURBING_KINDS:
        return 0
    policy = BusyPolicy.from_vars(policy_vars)
    return int(policy.timeout_s) + 60 if policy.when_busy == WhenBusy.WAIT else 0


def busy_refusal(result: Any) -> Mapping[str, Any] | None:
    """The ``busy`` record of a job result whose step did not run because its GPUs were busy (skipped, or failed
    under ``--when-busy fail`` / after the wait), else None. Nothing was measured or changed on such a node."""
    if not isinstance(result, Mapping):
        return None
    record = result.get(RESULT_KEY)
    return record if isinstance(record, Mapping) and record.get("action") in ("skipped", "failed") else None


def skipped_busy(result: Any) -> bool:
    record = busy_refusal(result)
    return record is not None and record.get("action") == "skipped"

