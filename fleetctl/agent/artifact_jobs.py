"""Artifact store ↔ playbook jobs on a real node: fetch build/install inputs, upload built wheels.

The controller sends content addresses (``sdist_sha256``, ``wheel_sha256``); the playbooks read local
paths (``sdist_path``, ``wheel_path``: docs/playbooks.md). ``ArtifactJobRunner`` wraps the agent's
runner and, before a job runs, downloads those artifacts from the controller's store (``FetchArtifact``,
streamed in chunks, sha256 checked, cached per digest under ``STATE/artifacts/<sha256>/``) and fills in
the paths. An install's dependency wheels (``deps``: ``[{"sha256", "filename"}, …]``) are fetched the same way
and laid out, under their own file names, in a private wheelhouse ``STATE/wheelhouses/<job_id>/`` (hard links
into the cache) whose path the playbook gets as ``wheelhouse_dir``; it is removed when the job ends. After a
successful ``build-from-source`` it uploads ``built_wheel.path`` to the store
(``UploadArtifact``, kind ``wheel``) and checks the digest the controller computed matches the one the
playbook reported; a failed upload fails the job saying so (the rollout then cannot hand the wheel to
anyone). Each transfer is an event of the job (``fleet_artifact_fetch`` / ``fleet_artifact_upload``, with
bytes and seconds).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fleetctl.agent.client import UPLOAD_RETRY_SECONDS
from fleetctl.agent.executor import JOB_ID_RE
from fleetctl.agent.jobs import JobRunner
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus

log = logging.getLogger(__name__)

#: job kind → (sha256 variable, path variable) the agent resolves before the playbook runs
INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "build-from-source": (("sdist_sha256", "sdist_path"),),
    "install-wheel": (("wheel_sha256", "wheel_path"),),
    "rollback": (("wheel_sha256", "wheel_path"),),
    "apt-keyring-fix": (("key_sha256", "key_path"),),
    "cuda-toolkit": (("cuda_keyring_sha256", "cuda_keyring_deb"),),
}


#: job kinds whose ``deps`` become a wheelhouse
WHEELHOUSE_KINDS = frozenset({"install-wheel"})
_WHEEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# the agent reports the result before its job timeout ends the job (agent/client.py)
UPLOAD_TIMEOUT_MARGIN_S = 30.0


class ArtifactClient(Protocol):
    async def fetch_artifact(self, sha256: str, dest_dir: Path) -> Path: ...

    async def upload_artifact(self, path: Path, kind: str = "other", *, retry_for: float | None = None,
                              on_retry: Callable[[str, float], object] | None = None, job_id: str = "") -> str: ...


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class ArtifactJobRunner:
    """A ``JobRunner`` that resolves artifact inputs and uploads built wheels around ``inner``."""

    def __init__(self, inner: JobRunner, cache_dir: Path, client: ArtifactClient | None = None, *,
                 upload_retry_s: float = UPLOAD_RETRY_SECONDS) -> None:
        self.inner = inner
        self.cache_dir = cache_dir
        self.client = client
        self.upload_retry_s = upload_retry_s  # how long a built wheel's upload is retried (bounded by the job)

    def bind(self, agent: Any) -> None:
        self.client = agent
        if hasattr(self.inner, "bind"):
            self.inner.bind(agent)

    async def _fetch(self, sha256: str, emit: Callable[[dict[str, Any]], object]) -> Path:
        dest = self.cache_dir / sha256
        cached = [p for p in dest.glob("*") if p.is_file() and not p.name.startswith(".")] if dest.is_dir() else []
        for p in cached:
            if _sha256(p) == sha256:
                emit({"event": "fleet_artifact_fetch", "event_data": {"sha256": sha256, "file": p.name,
                                                                      "bytes": p.stat().st_size, "cached": True}})
                return p
            p.unlink()
        if self.client is None:
            raise FleetError(f"cannot fetch artifact {sha256}: the agent is not connected to a controller",
                             hint="run jobs through fleet-agent run")
        started = time.monotonic()
        path = await self.client.fetch_artifact(sha256, dest)
        emit({"event": "fleet_artifact_fetch", "event_data": {
            "sha256": sha256, "file": path.name, "bytes": path.stat().st_size,
            "seconds": round(time.monotonic() - started, 3), "cached": False}})
        return path

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        def emit(event: dict[str, Any]) -> object:
            emit_event(event)
            return None

        started = time.monotonic()
        variables = dict(job.vars)
        for sha_var, path_var in INPUTS.get(job.kind, ()):
            sha = variables.get(sha_var)
            if not isinstance(sha, str) or not sha or variables.get(path_var):
                continue
            try:
                variables[path_var] = str(await self._fetch(sha, emit))
            except FleetError as exc:
                return JobOutcome(job.job_id, JobStatus.FAILED, rc=66,
                                  error=f"{job.kind}: cannot fetch {path_var} ({sha[:12]}…) from the controller's "
                                        f"artifact store: {exc.message}")
            except OSError as exc:
                return JobOutcome(job.job_id, JobStatus.FAILED, rc=74,
                                  error=f"{job.kind}: cannot store artifact {sha[:12]}… in {self.cache_dir}: {exc}")
        wheelhouse: Path | None = None
        if job.kind in WHEELHOUSE_KINDS and variables.get("deps"):
            try:
                wheelhouse = await self._wheelhouse(job.job_id, variables["deps"], emit)
            except FleetError as exc:
                return JobOutcome(job.job_id, JobStatus.FAILED, rc=66, error=f"{job.kind}: {exc.message}")
            except OSError as exc:
                return JobOutcome(job.job_id, JobStatus.FAILED, rc=74,
                                  error=f"{job.kind}: cannot lay out the wheelhouse in {self.cache_dir.parent}: {exc}")
            variables["wheelhouse_dir"] = str(wheelhouse)
        variables.pop("deps", None)  # the playbook reads the wheelhouse, not the list
        spec = JobSpec(job.job_id, job.kind, variables, job.timeout_s) if variables != job.vars else job
        try:
            outcome = await self.inner.run(spec, emit_event)
        finally:
            if wheelhouse is not None:
                shutil.rmtree(wheelhouse, ignore_errors=True)
        if outcome.ok and job.kind == "build-from-source":
            # the upload may retry for as long as the job has left (the agent's job timeout would cut it)
            left = job.timeout_s - (time.monotonic() - started) - UPLOAD_TIMEOUT_MARGIN_S
            problem = await self._upload_built(job.job_id, outcome, emit, max(0.0, left))
            if problem:
                return JobOutcome(job.job_id, JobStatus.FAILED, rc=75, result=outcome.result, error=problem)
        return outcome

    async def _wheelhouse(self, job_id: str, deps: Any, emit: Callable[[dict[str, Any]], object]) -> Path:
        """Fetch every dependency wheel and lay them out under their file names for ``pip --find-links``."""
        if not isinstance(deps, list) or not all(
                isinstance(d, dict) and isinstance(d.get("sha256"), str) and _SHA256_RE.fullmatch(d["sha256"])
                and isinstance(d.get("filename"), str) and _WHEEL_NAME_RE.fullmatch(d["filename"]) for d in deps):
            raise FleetError("refused the job's deps: expected a list of {sha256: 64 hex, filename: *.whl}")
        if not JOB_ID_RE.fullmatch(job_id):
            raise FleetError(f"refused job id {job_id!r}")
        house = (self.cache_dir.parent / "wheelhouses" / job_id).resolve()
        shutil.rmtree(house, ignore_errors=True)
        house.mkdir(parents=True)
        for dep in deps:
            try:
                path = await self._fetch(dep["sha256"], emit)
            except FleetError as exc:
                raise FleetError(f"cannot fetch dependency {dep['filename']} ({dep['sha256'][:12]}…) from the "
                                 f"controller's artifact store: {exc.message}") from None
            target = house / dep["filename"]
            try:
                os.link(path, target)
            except OSError:  # another filesystem: copy
                shutil.copyfile(path, target)
        return house

    async def _upload_built(self, job_id: str, outcome: JobOutcome, emit: Callable[[dict[str, Any]], object],
                            time_left: float) -> str | None:
        wheel = outcome.result.get("built_wheel")
        if not isinstance(wheel, dict):
            return None  # the controller reports the missing built_wheel itself
        path_text = wheel.get("path")
        if not path_text:
            return ("build-from-source: the playbook did not hand the wheel to the agent (built_wheel.path is "
                    "empty), so it cannot be uploaded to the artifact store")
        path = Path(str(path_text))
        if self.client is None:
            return "build-from-source: cannot upload the built wheel: the agent is not connected to a controller"
        started = time.monotonic()
        retries = 0

        def on_retry(reason: str, delay: float) -> None:
            nonlocal retries
            retries += 1
            emit({"event": "fleet_artifact_upload_retry", "event_data": {
                "file": path.name, "retry": retries, "reason": reason[:500], "delay_s": round(delay, 1)}})

        kept: Path | None = None
        try:
            kept = self._keep(job_id, path)
            size = kept.stat().st_size
            retry_for = min(self.upload_retry_s, time_left)
            sha = await self.client.upload_artifact(kept, "wheel", retry_for=retry_for, on_retry=on_retry,
                                                    job_id=job_id)
        except (FleetError, OSError) as exc:
            msg = exc.message if isinstance(exc, FleetError) else str(exc)
            where = f"; the wheel is kept at {kept}" if kept is not None and kept.exists() else ""
            return (f"build-from-source: built {path.name} but uploading it to the artifact store failed: "
                    f"{msg}{where}")
        seconds = round(time.monotonic() - started, 3)
        emit({"event": "fleet_artifact_upload", "event_data": {"sha256": sha, "file": path.name, "bytes": size,
                                                               "seconds": seconds, "retries": retries}})
        self._confirmed(kept, sha)
        if wheel.get("sha256") and sha != wheel["sha256"]:
            return (f"build-from-source: the artifact store computed sha256 {sha} for {path.name}, the playbook "
                    f"reported {wheel['sha256']}")
        wheel["artifact_sha256"] = sha
        wheel["uploaded"] = {"bytes": size, "seconds": seconds, "retries": retries}
        log.info("uploaded built wheel %s (%d bytes, %s) in %.1fs", path.name, size, sha[:12], seconds)
        return None

    def _keep(self, job_id: str, wheel: Path) -> Path:
        """Hold the built wheel in ``STATE/outbox/<job id>/`` until the controller confirms it stored it.

        The playbook's build directory is the node's (it may clean it, or run the next build in it); a wheel
        that cost half an hour of the node must survive a failed upload, for the retry or for an operator
        (``fleetctl artifacts add``).
        """
        if not JOB_ID_RE.fullmatch(job_id):
            raise FleetError(f"refused job id {job_id!r}")
        box = self.cache_dir.parent / "outbox" / job_id
        box.mkdir(parents=True, exist_ok=True)
        kept = box / wheel.name
        if kept.resolve() == wheel.resolve():
            return kept
        kept.unlink(missing_ok=True)
        try:
            os.link(wheel, kept)
        except OSError:  # another filesystem: copy
            shutil.copyfile(wheel, kept)
        return kept

    def _confirmed(self, kept: Path, sha256: str) -> None:
        """The controller stored the wheel: move it into the fetch cache (an install of it on this node then
        downloads nothing) and drop the outbox entry."""
        dest = self.cache_dir / sha256
        try:
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(kept, dest / kept.name)
            kept.parent.rmdir()
        except OSError as exc:
            log.warning("could not move the uploaded wheel %s into the cache: %s", kept, exc)
