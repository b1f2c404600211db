"""How the agent runs a job: the playbooks a job may name and the runner interface.

A job arrives from the controller as a ``fleet.jobs.JobSpec``: ``kind`` names a playbook in
``playbooks/`` (``install-wheel`` → ``playbooks/install-wheel.yml``), ``vars`` are its variables
(files the playbook needs — wheels, sdists, apt keys — are already local paths on the agent's
machine: ``wheel_path``, ``sdist_path``, ``key_path``, …). A runner streams ansible-runner events
through ``emit_event`` while it runs and returns a ``fleet.jobs.JobOutcome``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fleetctl.fleet.jobs import JobOutcome, JobSpec

#: Playbooks a job may name (``kind``), one per step of the plan (DESIGN §3.2).
PLAYBOOK_KINDS: tuple[str, ...] = (
    "apt-keyring-fix",
    "cuda-toolkit",
    "install-wheel",
    "build-from-source",
    "rollback",
)


EmitEvent = Callable[[dict[str, Any]], object]
"""Receives each event (a JSON-able dict). May be a plain function or return an awaitable."""


class JobRunner(Protocol):
    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome: ...
