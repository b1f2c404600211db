"""What the agent is asked to run, and what it reports back.

A job arrives from the controller as ``(job_id, kind, vars, timeout_s)``: ``kind`` names a
playbook in ``playbooks/`` (``install-wheel`` → ``playbooks/install-wheel.yml``), ``vars``
are its variables (files the playbook needs — wheels, sdists, apt keys — are already local
paths on the agent's machine: ``wheel_path``, ``sdist_path``, ``key_path``, …). The runner
streams ansible-runner events through ``emit_event`` while it runs and returns a
:class:`JobOutcome`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

JobStatus = Literal["successful", "failed", "timeout", "canceled", "error"]

#: Playbooks a job may name (``kind``), one per step of the plan (DESIGN §3.2).
PLAYBOOK_KINDS: tuple[str, ...] = (
    "apt-keyring-fix",
    "cuda-toolkit",
    "install-wheel",
    "build-from-source",
    "rollback",
)


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    kind: str
    vars: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0


@dataclass
class JobOutcome:
    """``status``: successful | failed | timeout | canceled | error (could not start).

    ``result`` holds what the playbook reported with ``set_stats`` (for example
    ``result["built_wheel"] = {"path", "sha256", "filename", …}`` from build-from-source,
    where ``path`` is a file on the agent's machine ready for upload), plus
    ``result["stats"]`` (ok/changed/failures/unreachable/skipped/rescued/ignored counts
    summed over hosts) and ``result["events_dropped"]``.
    """

    status: JobStatus
    rc: int
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "successful"

    @property
    def changed(self) -> int:
        stats = self.result.get("stats", {})
        return int(stats.get("changed", 0)) if isinstance(stats, dict) else 0


EmitEvent = Callable[[dict[str, Any]], object]
"""Receives each event (a JSON-able dict). May be a plain function or return an awaitable."""


class JobRunner(Protocol):
    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome: ...
