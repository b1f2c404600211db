"""A job as both sides see it: what the agent is asked to run (``JobSpec``), how it ended (``JobOutcome``),
and the one list of job statuses (``JobStatus``) with its derived sets.

A job is one unit of work for one node's agent (a playbook run, a verification). The controller's
dispatcher (controller/jobs.py) stores it and its life; the agent (agent/client.py) runs it. Both speak
these types; the protobuf messages are built and read only at the two wire modules (agent/wire.py,
controller/wire.py). Life of a job on the controller::

    pending ──(sent on the agent's Jobs stream)──► dispatched ──(first event)──► running
       └───────────────► successful | failed | timeout | canceled ◄──────────────┘
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class JobStatus(enum.StrEnum):
    """A job's status. The values are what the ``jobs.status`` column, the JSON API and the wire carry."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    # the agent's runner could not start the job (bad spec, run directory); agent/wire.py reports it as
    # FAILED, so no controller row ever holds it — the agent's own event log shows it as such
    ERROR = "error"


#: Not finished yet: the job holds its node's agent (or waits for it).
ACTIVE = frozenset({JobStatus.PENDING, JobStatus.DISPATCHED, JobStatus.RUNNING})
#: The statuses a job ends in (on the controller, and on the wire as a result).
FINISHED = frozenset({JobStatus.SUCCESSFUL, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED})
#: Finished without success because of what ran (not an operator's cancel).
UNSUCCESSFUL = frozenset({JobStatus.FAILED, JobStatus.TIMEOUT})
#: Finished by what ran, successfully or not: an operator's cancel says nothing about the node.
RAN_TO_END = frozenset({JobStatus.SUCCESSFUL, *UNSUCCESSFUL})


@dataclass(frozen=True)
class JobSpec:
    """What an agent receives: run playbook ``kind`` with ``vars`` within ``timeout_s`` seconds.

    ``kind`` names a playbook in ``playbooks/`` (``install-wheel`` → ``playbooks/install-wheel.yml``) or a
    built-in job (``verify``); on the agent, files the playbook needs are already local paths in ``vars``."""

    job_id: str
    kind: str
    vars: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended: ``status`` (one of FINISHED, or ERROR inside the agent), the playbook's ``rc``
    (None when no process ran: a cancel or a timeout decided by the controller), ``result`` and ``error``.

    ``result`` holds what the playbook reported with ``set_stats`` (for example
    ``result["built_wheel"] = {"path", "sha256", "filename", …}`` from build-from-source, where ``path`` is a
    file on the agent's machine ready for upload), plus ``result["stats"]`` (ok/changed/failures/unreachable/
    skipped/rescued/ignored counts summed over hosts) and ``result["events_dropped"]``.
    """

    job_id: str
    status: JobStatus
    rc: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == JobStatus.SUCCESSFUL

    @property
    def changed(self) -> int:
        """How many tasks changed something (ansible's ``changed`` count): 0 means the job was a no-op."""
        stats = self.result.get("stats", {})
        return int(stats.get("changed", 0)) if isinstance(stats, dict) else 0
