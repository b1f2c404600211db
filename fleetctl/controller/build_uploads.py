"""What an agent may put in the artifact store: the wheel of a build job the controller assigned to it.

``UploadArtifact`` (controller/server.py) is the only way an agent writes to the store. An enrolled agent is
trusted to run the jobs sent to it, not to say what the fleet installs: a file it uploads on its own could
carry an upstream wheel's name and be handed to every other node. So an upload must name (``job_id``, first
chunk) a ``build-from-source`` job that

* was assigned to this agent's enrolled hostname,
* is still open (``dispatched``/``running``: the agent uploads before it reports the result), or succeeded
  less than ``UPLOAD_GRACE`` ago (a retried upload whose answer was lost),
* has not had another file uploaded (the same bytes again are accepted: a retry),

and the file must be a ``wheel`` of that job's distribution (``dist_name``, default flash-attn) and version
(``flash_attn_version``; a local version tag ``+…`` is allowed, since builds may add one). The artifact is
then recorded with ``Provenance.build(job_id, build_key, node)`` from the *job's* variables, never from
anything the agent sends. Everything else is ``ForbiddenError`` (gRPC PERMISSION_DENIED), nothing is
stored, and the refusal is audited — coalesced per agent (``RefusalAudit``), so a flood of refused uploads
writes one row per agent per window with the count, not one row each.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from fleetctl.controller.artifacts import ArtifactStore, Provenance
from fleetctl.controller.jobs import JobDispatcher
from fleetctl.controller.store import utcnow
from fleetctl.fleet.errors import ForbiddenError, NotFoundError
from fleetctl.fleet.jobs import JobStatus

log = logging.getLogger(__name__)

BUILD_KIND = "build-from-source"
OPEN_STATUSES = frozenset({JobStatus.DISPATCHED, JobStatus.RUNNING})
UPLOAD_GRACE = dt.timedelta(minutes=15)
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_HINT = ("agents upload only the wheel of a build-from-source job the controller assigned to them, while it "
         "runs; artifacts for the fleet are added by an operator (`fleetctl artifact add`)")


@dataclass(frozen=True)
class BuildJob:
    """The parts of a job (controller/jobs.py) that decide whether an upload belongs to it."""

    job_id: str
    node: str
    kind: str
    status: str
    finished_at: dt.datetime | None
    vars: Mapping[str, Any]

    @staticmethod
    def from_json(job: Mapping[str, Any]) -> BuildJob:
        finished = job.get("finished_at")
        return BuildJob(str(job.get("id")), str(job.get("node")), str(job.get("kind")), str(job.get("status")),
                        dt.datetime.fromisoformat(finished) if isinstance(finished, str) else None,
                        job.get("vars") or {})

    @property
    def dist_name(self) -> str:
        return str(self.vars.get("dist_name") or "flash-attn")

    @property
    def version(self) -> str:
        return str(self.vars.get("flash_attn_version") or "")

    @property
    def build_key(self) -> str:
        return str(self.vars.get("build_key") or "")


def valid_job_id(job_id: str) -> bool:
    return bool(_JOB_ID_RE.fullmatch(job_id))


def wheel_problem(filename: str, dist_name: str, version: str) -> str | None:
    """Why ``filename`` is not a wheel of ``dist_name`` ``version`` (None: it is)."""
    try:
        name, got, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return f"{filename!r} is not a wheel file name"
    if canonicalize_name(name) != canonicalize_name(dist_name):
        return f"{filename} is a wheel of {name}, the job builds {dist_name}"
    try:
        wanted = Version(version)
    except InvalidVersion:
        return f"the job's flash_attn_version {version!r} is not a version"
    if got.public != wanted.public:
        return f"{filename} is version {got}, the job builds {version}"
    return None


def check_upload(job: BuildJob | None, *, job_id: str, hostname: str, filename: str, kind: str,
                 now: dt.datetime) -> Provenance:
    """The provenance to record for this agent's upload, or ``ForbiddenError`` saying why not (pure)."""
    def refuse(why: str) -> ForbiddenError:
        return ForbiddenError(f"upload of {filename!r} refused: {why}", hint=_HINT)

    if not job_id:
        raise refuse("it names no build job (agents may upload only a build job's output)")
    if job is None:
        raise refuse(f"there is no job {job_id!r}")
    if job.node != hostname:
        raise refuse(f"job {job_id} is assigned to another node, not to {hostname}")
    if job.kind != BUILD_KIND:
        raise refuse(f"job {job_id} is a {job.kind} job, not {BUILD_KIND}")
    recent = (job.status == JobStatus.SUCCESSFUL and job.finished_at is not None
              and now - job.finished_at <= UPLOAD_GRACE)
    if job.status not in OPEN_STATUSES and not recent:
        raise refuse(f"job {job_id} is {job.status}: its output can no longer be uploaded")
    if kind != "wheel":
        raise refuse(f"a build job's output is a wheel, not {kind!r}")
    problem = wheel_problem(filename, job.dist_name, job.version)
    if problem:
        raise refuse(problem)
    if not job.build_key:
        raise refuse(f"job {job_id} has no build_key")
    return Provenance.build(job.job_id, job.build_key, hostname)


class RefusalAudit:
    """Audits refused uploads: the first refusal of an agent at once, then at most one row per ``window``
    seconds carrying how many were refused meanwhile (a flood cannot fill the audit log)."""

    def __init__(self, write: Callable[[str, str, dict[str, Any]], None], window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_agents: int = 10_000) -> None:
        self._write = write
        self.window = window
        self._clock = clock
        self._max_agents = max_agents
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()  # refusals are recorded from worker threads (database work)

    def refused(self, actor: str, target: str, reason: str) -> bool:
        """Record one refusal; True when an audit row was written for it."""
        with self._lock:
            detail = self._admit(actor, reason)
        if detail is None:
            return False
        self._write(actor, target[:253], detail)
        return True

    def _admit(self, actor: str, reason: str) -> dict[str, Any] | None:
        now = self._clock()
        last = self._last.get(actor)
        if last is not None and now - last < self.window:
            self._suppressed[actor] = self._suppressed.get(actor, 0) + 1
            return None
        if len(self._last) >= self._max_agents:  # bounded memory: forget agents whose window has passed
            for a in [a for a, t in self._last.items() if now - t >= self.window]:
                self._last.pop(a, None)
        self._last[actor] = now
        detail: dict[str, Any] = {"reason": reason[:500]}
        suppressed = self._suppressed.pop(actor, 0)
        if suppressed:
            detail["refused_since_last_row"] = suppressed
        return detail


def authorize(jobs: JobDispatcher, artifacts: ArtifactStore, *, hostname: str, job_id: str, filename: str,
              kind: str, sha256: str, now: dt.datetime | None = None) -> Provenance:
    """``check_upload`` against the stored job, plus "not already uploaded": a build job gets one file (the
    same bytes again are a retry and pass). Blocking (database): call it off the event loop."""
    job = None
    if job_id and valid_job_id(job_id):
        try:
            job = BuildJob.from_json(jobs.get(job_id, events=False))
        except NotFoundError:
            job = None
    elif job_id:
        raise ForbiddenError(f"upload of {filename!r} refused: {job_id[:80]!r} is not a job id", hint=_HINT)
    provenance = check_upload(job, job_id=job_id, hostname=hostname, filename=filename, kind=kind,
                              now=now or utcnow())
    prior = artifacts.uploaded_by_job(job_id)
    if prior is not None and prior.sha256 != sha256:
        raise ForbiddenError(f"upload of {filename!r} refused: job {job_id} already uploaded {prior.filename} "
                             f"(sha256 {prior.sha256[:12]}…); a build job has one output", hint=_HINT)
    return provenance
