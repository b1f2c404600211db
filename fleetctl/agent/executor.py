"""Run a job's playbook on this node through ansible-runner, streaming its events.

``AnsibleJobRunner`` is the agent's one implementation of :class:`agent.jobs.JobRunner`:

- each job gets a private run directory ``STATE/jobs/<job_id>/`` (ansible-runner's
  private data dir: ``inventory/``, ``env/``, ``artifacts/<n>/`` with every event as JSON,
  and ``outputs/`` where playbooks drop files for the agent, e.g. a built wheel);
- the run never depends on the agent's working directory nor on the installed playbooks staying
  in place: the playbooks are copied to ``project/`` in the run directory and ansible-playbook runs
  there (its working directory; Ansible calls ``os.getcwd()`` in every ``copy`` task and fails with a
  bare "[Errno 2] No such file or directory" once that directory is gone, e.g. when the checkout the
  agent runs from is replaced), and the job has its own Ansible temp dirs, created before the run and
  removed only after it: ``tmp/local`` (``ANSIBLE_LOCAL_TEMP``) and, with connection ``local``,
  ``tmp/remote`` (``ANSIBLE_REMOTE_TEMP``; in a chroot ``/tmp/fleet-ansible/<job_id>`` inside the root);
- the playbook runs with connection ``local`` on a real node, or
  ``community.general.chroot`` into ``root`` for a simulated node;
- job vars go in as extra vars (a JSON file, ``env/extravars``, never a command line); names starting with
  ``ansible_`` or ``fleet_`` are refused so a job cannot switch the connection or escape a
  chroot, and so are ``rb_``/``iw_`` (the playbooks' own facts, which an extra var would override);
  the playbooks validate every value again with regexes;
- job vars are data, never code: many of them started as text a node reported (``python``, apt error
  lines, …), so every string in them, at any depth, is written in Ansible's unsafe form
  (``{"__ansible_unsafe": "…"}``, see :func:`unsafe_vars`) and Ansible never templates it, wherever a
  playbook uses it (set_fact, filters, loops and module arguments keep it unsafe); the run's own
  ``ansible.cfg`` (``ANSIBLE_CONFIG``) pins ``allow_unsafe_lookups`` off, whatever the node's Ansible config
  says. docs/security.md, "Node-reported data";
- events are handed to ``emit_event`` from a bounded buffer (see :class:`EventPump`), so a
  slow consumer never stalls the playbook;
- cancelling (``cancel(job_id)``, ``cancel_all()`` on agent stop, the asyncio task being
  cancelled, or the job's ``timeout_s`` passing) kills the playbook's process group;
- the outcome carries ``set_stats`` data from the playbook (``result["built_wheel"]`` …),
  summed host stats, and the first failing task's message — all taken from structured
  events, never from parsing stdout.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from fleetctl.agent.jobs import PLAYBOOK_KINDS
from fleetctl.fleet.errors import ExecutionError, UsageError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus

log = logging.getLogger(__name__)

# Package data of fleetctl (a plain directory in a checkout and in an installed wheel alike).
DEFAULT_PLAYBOOKS_DIR = Path(str(resources.files("fleetctl") / "playbooks"))
JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VAR_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# ansible_*/fleet_*: set by the agent; rb_*/iw_*: the playbooks' own facts (rollback.yml, tasks/install-wheel.yml).
# A job variable is an Ansible extra var, which beats set_fact and include vars: one named like a playbook's
# own fact would silently replace it (a job var ``previous`` once broke every real rollback).
RESERVED_VAR_PREFIXES = ("ansible_", "fleet_", "rb_", "iw_")
STAT_KEYS = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored", "processed")
#: Ansible's JSON spelling of an unsafe string. ``-e @file`` goes through ansible-core's JSON decoder, which turns
#: ``{"__ansible_unsafe": "text"}`` into a string never trusted as a template (ansible-core 2.19; older versions
#: made it an ``AnsibleUnsafeText``): ``{{ … }}`` in it stays text. A plain JSON string in that file would be
#: trusted, and templated wherever a playbook used it. tests/integration/injection proves both.
UNSAFE_KEY = "__ansible_unsafe"
# Keys of dicts inside job vars (``build``): a key cannot be marked unsafe, so only plain names are allowed —
# never ``__ansible_*`` (the decoder's own markers) nor anything with braces.
VAR_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
MAX_VARS_BYTES = 4 * 1024 * 1024
MAX_VARS_DEPTH = 16
# The run's own Ansible config: whatever /etc/ansible/ansible.cfg or a stray ./ansible.cfg says, lookups' results
# stay unsafe (allow_unsafe_lookups is settable only in a config file since ansible-core 2.19).
ANSIBLE_CFG = """# written by fleet-agent for this job (agent/executor.py): job variables are data, never templates
[defaults]
allow_unsafe_lookups = False
"""

#: Events never dropped while the buffer holds something less important.
ESSENTIAL_EVENTS = frozenset({
    "playbook_on_start", "playbook_on_play_start", "playbook_on_stats",
    "runner_on_failed", "runner_on_unreachable", "error", "fleet_events_dropped",
})
MAX_EVENT_BYTES = 64 * 1024


class EventPump:
    """Bounded hand-off from ansible-runner's thread to an asyncio consumer.

    ``put`` never blocks. When the buffer is full, the oldest *non-essential* event
    (task starts, ok/skipped results, verbose output) is dropped to make room; if every
    buffered event is essential (failures, play start, final stats), the oldest one is
    dropped. Dropped events are counted, and before the next event it delivers the pump
    emits ``{"event": "fleet_events_dropped", "count": N, "job_id": …}`` so the consumer
    knows the stream has a gap. Events bigger than 64 KiB lose ``event_data.res`` and have
    ``stdout`` cut. Every event is still written to the run directory by ansible-runner,
    so nothing is lost on the node.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int = 1000, job_id: str = "") -> None:
        if maxsize < 2:
            raise UsageError("event buffer must hold at least 2 events")
        self._loop = loop
        self._maxsize = maxsize
        self._job_id = job_id
        self._buf: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped = 0
        self._unreported_drops = 0

    def put(self, event: dict[str, Any]) -> None:
        """Called from any thread; never blocks."""
        event = _bounded(event)
        with self._lock:
            if len(self._buf) >= self._maxsize:
                victim = next((i for i, e in enumerate(self._buf) if e.get("event") not in ESSENTIAL_EVENTS), None)
                if victim is None and event.get("event") not in ESSENTIAL_EVENTS:
                    self._count_drop()
                    return
                del self._buf[victim if victim is not None else 0]
                self._count_drop()
            self._buf.append(event)
        self._loop.call_soon_threadsafe(self._wakeup.set)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._loop.call_soon_threadsafe(self._wakeup.set)

    def _count_drop(self) -> None:
        self.dropped += 1
        self._unreported_drops += 1

    def _take(self) -> tuple[list[dict[str, Any]], bool]:
        with self._lock:
            items = list(self._buf)
            self._buf.clear()
            if self._unreported_drops:
                items.insert(0, {"event": "fleet_events_dropped", "count": self._unreported_drops,
                                 "job_id": self._job_id})
                self._unreported_drops = 0
            return items, self._closed

    async def consume(self, emit_event: Callable[[dict[str, Any]], object]) -> None:
        """Deliver events in order until closed and drained; consumer errors are logged, not raised."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            items, closed = self._take()
            for item in items:
                try:
                    res = emit_event(item)
                    if inspect.isawaitable(res):
                        await res
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("emit_event failed for job %s; event dropped", self._job_id)
            if closed:
                items, _ = self._take()
                if not items:
                    return
                self._wakeup.set()


def unsafe_vars(value: Any, where: str = "vars", depth: int = 0) -> Any:
    """``value`` with every string, at any depth, in Ansible's unsafe JSON form (see ``UNSAFE_KEY``).

    Numbers, booleans and null stay as they are (they cannot hold a template). Raise ``ExecutionError`` for what
    cannot be passed as data: a NUL character (Ansible and the modules it runs cut strings there), a dict key that
    is not a plain name, nesting deeper than ``MAX_VARS_DEPTH``, or a value JSON has no form for.
    """
    if depth > MAX_VARS_DEPTH:
        raise ExecutionError(f"refused job variable {where}: nested deeper than {MAX_VARS_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise ExecutionError(f"refused job variable {where}: it contains a NUL character",
                                 hint="the controller sends only validated text; check what the node reported")
        return {UNSAFE_KEY: value}
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [unsafe_vars(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, v in value.items():
            if not isinstance(key, str) or not VAR_KEY_RE.fullmatch(key):
                raise ExecutionError(f"refused job variable {where}: key {str(key)[:80]!r} is not a plain name "
                                     f"(letters, digits, . _ + -)")
            out[key] = unsafe_vars(v, f"{where}.{key}", depth + 1)
        return out
    raise ExecutionError(f"refused job variable {where}: a {type(value).__name__} is not JSON data")


def extravars_json(variables: Mapping[str, Any]) -> str:
    """The extra-vars file's text: ``variables`` as JSON with every string marked unsafe."""
    marked = {name: unsafe_vars(v, name) for name, v in variables.items()}
    try:
        text = json.dumps(marked, ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExecutionError(f"job vars are not JSON: {exc}") from exc
    if len(text) > MAX_VARS_BYTES:
        raise ExecutionError(f"job vars are {len(text)} bytes as JSON, more than {MAX_VARS_BYTES}",
                             hint="a job's variables are names, paths and short lists; check what the controller sent")
    return text


def _bounded(event: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(json.dumps(event, default=str))
    except (TypeError, ValueError):
        return {"event": event.get("event", "unknown"), "uuid": event.get("uuid"), "truncated": True}
    if size <= MAX_EVENT_BYTES:
        return event
    trimmed = dict(event)
    data = dict(trimmed.get("event_data") or {})
    if "res" in data:
        data["res"] = {"truncated": True}
    trimmed["event_data"] = data
    stdout = trimmed.get("stdout")
    if isinstance(stdout, str) and len(stdout) > 8192:
        trimmed["stdout"] = stdout[:4096] + "\n…[truncated]…\n" + stdout[-4096:]
    trimmed["truncated"] = True
    return trimmed


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by the agent's user only (job vars name the node's paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC


class _RunState:
    """What the event handler learns while the playbook runs (touched only from the runner thread)."""

    def __init__(self) -> None:
        self.artifact_data: dict[str, Any] = {}
        self.failures: list[str] = []


class _RunDirs:
    """A job's run directory (absolute) and what ``AnsibleJobRunner._prepare`` makes in it."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self.outputs = job_dir / "outputs"
        self.project = job_dir / "project"
        self.local_tmp = job_dir / "tmp" / "local"
        self.remote_tmp = job_dir / "tmp" / "remote"  # as the playbook's connection sees it
        self.remote_tmp_on_disk: Path | None = None  # where that is from the agent (inside the root for chroot)
        self.extravars = job_dir / "env" / "extravars"  # ansible-runner passes it as `-e @…`
        self.ansible_cfg = job_dir / "ansible.cfg"


class AnsibleJobRunner:
    """Runs playbooks for jobs; see the module docstring."""

    def __init__(self, state_dir: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                 playbooks_dir: str | os.PathLike[str] = DEFAULT_PLAYBOOKS_DIR,
                 python_interpreter: str = "/usr/bin/python3", event_buffer: int = 1000,
                 poll_interval_s: float = 0.25, extra_env: Mapping[str, str] | None = None,
                 node_state_dir: str | os.PathLike[str] | None = None) -> None:
        # every path absolute from the start: the playbooks refuse relative ones (their variables must be absolute,
        # and a job's paths must not depend on the agent's working directory, which may change or vanish)
        self.state_dir = Path(state_dir).resolve()
        # the playbooks' fleet_state_dir (records, builds, kept wheels); None: their default /var/lib/fleet-agent
        self.node_state_dir = Path(node_state_dir).resolve() if node_state_dir is not None else None
        self.root = Path(root).resolve() if root is not None else None
        self.playbooks_dir = Path(playbooks_dir).resolve()
        self.python_interpreter = python_interpreter
        self.event_buffer = event_buffer
        self.poll_interval_s = poll_interval_s
        self.extra_env = dict(extra_env or {})
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # -- control -----------------------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop (its playbook's processes are killed). False if not running."""
        with self._lock:
            ev = self._cancel.get(job_id)
        if ev is None:
            return False
        ev.set()
        return True

    def cancel_all(self) -> None:
        """Agent stop: cancel every running job."""
        with self._lock:
            events = list(self._cancel.values())
        for ev in events:
            ev.set()

    # -- the JobRunner protocol --------------------------------------------------------

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], object]) -> JobOutcome:
        try:
            playbook = self._check(job)
        except ExecutionError as exc:
            return JobOutcome(job.job_id, JobStatus.ERROR, rc=-1, result={}, error=exc.message)
        job_dir = self.job_dir(job.job_id)
        cancel_ev = threading.Event()
        with self._lock:
            if job.job_id in self._cancel:
                return JobOutcome(job.job_id, JobStatus.ERROR, rc=-1, error=f"job {job.job_id} is already running")
            self._cancel[job.job_id] = cancel_ev
        try:
            dirs = self._prepare(job, job_dir)
        except OSError as exc:
            with self._lock:
                self._cancel.pop(job.job_id, None)
            return JobOutcome(job.job_id, JobStatus.ERROR, rc=-1,
                              error=f"cannot prepare the run directory {job_dir}: {exc}")
        ident = self._next_ident(job_dir)
        loop = asyncio.get_running_loop()
        pump = EventPump(loop, self.event_buffer, job.job_id)
        state = _RunState()
        deadline = time.monotonic() + job.timeout_s
        why: list[JobStatus] = []  # why the run was stopped from here: CANCELED or TIMEOUT

        def cancel_callback() -> bool:
            if cancel_ev.is_set():
                why.append(JobStatus.CANCELED)
                return True
            if time.monotonic() > deadline:
                why.append(JobStatus.TIMEOUT)
                return True
            return False

        def event_handler(event: dict[str, Any]) -> bool:
            self._observe(event, state)
            pump.put(event)
            return True  # keep it in the run directory too

        kwargs = self._runner_kwargs(job, playbook, dirs, ident, event_handler, cancel_callback)
        consumer = asyncio.create_task(pump.consume(emit_event))
        worker = asyncio.ensure_future(asyncio.to_thread(self._run_blocking, kwargs))
        try:
            try:
                status, rc, stats = await asyncio.shield(worker)
            except asyncio.CancelledError:
                cancel_ev.set()
                await asyncio.wait({worker})  # the playbook is being killed; don't leave it behind
                raise
        finally:
            if worker.done():  # the playbook has ended: nothing uses its temp dirs any more
                self._cleanup(dirs)
            with self._lock:
                self._cancel.pop(job.job_id, None)
            pump.close()
            try:
                await asyncio.wait_for(asyncio.shield(consumer), timeout=30)
            except TimeoutError:
                consumer.cancel()
        return self._outcome(status, rc, stats, state, pump, why, job)

    # -- internals ---------------------------------------------------------------------

    def _check(self, job: JobSpec) -> Path:
        if not isinstance(job.job_id, str) or not JOB_ID_RE.fullmatch(job.job_id):
            raise ExecutionError(f"refused job id {job.job_id!r}: use letters, digits, '.', '_' or '-'")
        if job.kind not in PLAYBOOK_KINDS:
            raise ExecutionError(f"unknown job kind {job.kind!r}; known: {', '.join(PLAYBOOK_KINDS)}")
        playbook = self.playbooks_dir / f"{job.kind}.yml"
        if not playbook.is_file():
            raise ExecutionError(f"playbook {playbook} is missing", hint="reinstall fleet-agent")
        if not isinstance(job.vars, dict):
            raise ExecutionError("job vars must be a JSON object")
        for name in job.vars:
            if not isinstance(name, str) or not VAR_NAME_RE.fullmatch(name):
                raise ExecutionError(f"refused variable name {name!r}")
            if name.startswith(RESERVED_VAR_PREFIXES):
                raise ExecutionError(f"refused variable {name!r}: ansible_* and fleet_* are set by the agent, "
                                     f"rb_* and iw_* are the playbooks' own facts",
                                     hint="send only the variables the playbook documents (docs/playbooks.md)")
        extravars_json(job.vars)  # every value passable as data, or refused here before anything runs
        if not (job.timeout_s > 0):
            raise ExecutionError(f"job timeout must be positive, got {job.timeout_s}")
        if not (Path(sys.executable).parent / "ansible-playbook").exists() and shutil.which("ansible-playbook") is None:
            raise ExecutionError("ansible-playbook not found", hint="install fleetctl with its dependencies")
        if self.root is not None and not (self.root / "bin" / "sh").exists():
            raise ExecutionError(f"node root {self.root} has no /bin/sh", hint="build the simulated node's root first")
        return playbook

    def job_dir(self, job_id: str) -> Path:
        """The job's run directory, ``STATE/jobs/<job_id>``."""
        return self.state_dir / "jobs" / job_id

    def _prepare(self, job: JobSpec, job_dir: Path) -> _RunDirs:
        """Create the run directory, the job's own temp dirs and its copy of the playbooks (see the module doc)."""
        job_dir = job_dir.resolve()
        dirs = _RunDirs(job_dir)
        for d in (dirs.outputs, dirs.local_tmp):
            d.mkdir(parents=True, exist_ok=True)
        dirs.local_tmp.chmod(0o700)
        if self.root is None:
            dirs.remote_tmp = job_dir / "tmp" / "remote"
            dirs.remote_tmp_on_disk = dirs.remote_tmp
        else:
            dirs.remote_tmp = Path("/tmp/fleet-ansible") / job.job_id
            dirs.remote_tmp_on_disk = self.root / "tmp" / "fleet-ansible" / job.job_id
        dirs.remote_tmp_on_disk.mkdir(parents=True, exist_ok=True)
        dirs.remote_tmp_on_disk.chmod(0o700)
        if dirs.project.exists():
            shutil.rmtree(dirs.project)
        shutil.copytree(self.playbooks_dir, dirs.project, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # written here, every run (a retried job reuses its directory): ansible-runner adds `-e @env/extravars`
        # whenever that file exists, and is given no extravars of its own (it would put them on the command line)
        _write_private(dirs.extravars, extravars_json(self._extravars(job, dirs)))
        _write_private(dirs.ansible_cfg, ANSIBLE_CFG)
        return dirs

    def _extravars(self, job: JobSpec, dirs: _RunDirs) -> dict[str, Any]:
        extravars = dict(job.vars)
        extravars["fleet_artifact_dir"] = str(dirs.outputs)
        if self.node_state_dir is not None:
            extravars["fleet_state_dir"] = str(self.node_state_dir)
        return extravars

    @staticmethod
    def _cleanup(dirs: _RunDirs) -> None:
        for d in (dirs.local_tmp, dirs.remote_tmp_on_disk):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)

    @staticmethod
    def _next_ident(job_dir: Path) -> str:
        artifacts = job_dir / "artifacts"
        n = 1
        while (artifacts / str(n)).exists():
            n += 1
        return str(n)

    def _inventory(self) -> dict[str, Any]:
        host: dict[str, Any] = {"ansible_python_interpreter": self.python_interpreter}
        if self.root is None:
            host["ansible_connection"] = "local"
        else:
            host["ansible_connection"] = "community.general.chroot"
            host["ansible_host"] = str(self.root)
        return {"all": {"hosts": {"node": host}}}

    def _runner_kwargs(self, job: JobSpec, playbook: Path, dirs: _RunDirs, ident: str,
                       event_handler: Callable[[dict[str, Any]], bool],
                       cancel_callback: Callable[[], bool]) -> dict[str, Any]:
        bindir = Path(sys.executable).parent
        envvars = {
            "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "ANSIBLE_PIPELINING": "1",  # local and chroot both pipeline: no temp files per task
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "ANSIBLE_PYTHON_INTERPRETER": self.python_interpreter,
            **self.extra_env,
            # the job's own, existing temp dirs: never the agent's environment's (e2e.sh exports both)
            "ANSIBLE_LOCAL_TEMP": str(dirs.local_tmp),
            "ANSIBLE_REMOTE_TEMP": str(dirs.remote_tmp),
            # the job's own config (ANSIBLE_CFG), never extra_env's nor the node's: allow_unsafe_lookups stays off
            "ANSIBLE_CONFIG": str(dirs.ansible_cfg),
        }
        return {
            "private_data_dir": str(dirs.job_dir),
            # ansible-playbook's working directory: the job's copy of the playbooks
            "project_dir": str(dirs.project),
            # ansible-runner calls os.getcwd() unless given this; the agent's own cwd may be gone
            "host_cwd": str(dirs.job_dir),
            "playbook": playbook.name,
            "ident": ident,
            "inventory": self._inventory(),
            # no "extravars": they are in env/extravars, every string marked unsafe (_prepare)
            "envvars": envvars,
            "quiet": True,
            "event_handler": event_handler,
            "cancel_callback": cancel_callback,
            "settings": {"pexpect_timeout": self.poll_interval_s, "suppress_ansible_output": True},
        }

    @staticmethod
    def _run_blocking(kwargs: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
        import ansible_runner

        try:
            r = ansible_runner.run(**kwargs)
        except Exception as exc:  # ansible-runner raises plain exceptions for bad config
            return "error", -1, {"exception": f"{type(exc).__name__}: {exc}"}
        return str(r.status), int(r.rc if r.rc is not None else -1), dict(r.stats or {})

    @staticmethod
    def _observe(event: dict[str, Any], state: _RunState) -> None:
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "playbook_on_stats":
            art = data.get("artifact_data")
            if isinstance(art, dict):
                state.artifact_data = art
        elif kind in ("runner_on_failed", "runner_on_unreachable") and not data.get("ignore_errors"):
            res = data.get("res") or {}
            msg = res.get("msg") if isinstance(res, dict) else None
            if not msg and isinstance(res, dict):
                msg = (res.get("stderr") or res.get("stdout") or "").strip()[-500:] or None
            task = data.get("task") or "?"
            state.failures.append(f"{task}: {msg or 'failed'}")

    def _tail(self, job: JobSpec) -> str:
        """Last lines of the run's output, for errors no task reported (syntax errors, bad inventory)."""
        runs = sorted((self.job_dir(job.job_id) / "artifacts").glob("*/stdout"),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            return ""
        lines = [ln for ln in runs[-1].read_text(errors="replace").splitlines() if ln.strip()]
        return ": " + " | ".join(lines[-5:])[-1000:] if lines else ""

    def _outcome(self, status: str, rc: int, stats: dict[str, Any], state: _RunState, pump: EventPump,
                 why: list[JobStatus], job: JobSpec) -> JobOutcome:
        """Our job's outcome from ansible-runner's: ``status`` is the runner's own word (successful, failed,
        timeout, canceled, error), ``why`` what this executor stopped the run for."""
        totals: dict[str, int] = {}
        for key in STAT_KEYS:
            per_host = stats.get(key) or {}
            totals[key] = sum(int(v) for v in per_host.values()) if isinstance(per_host, dict) else 0
        result: dict[str, Any] = dict(state.artifact_data)
        result["stats"] = totals
        result["events_dropped"] = pump.dropped
        final: JobStatus
        error: str | None = None
        if why and why[0] is JobStatus.TIMEOUT:
            final, error = JobStatus.TIMEOUT, f"{job.kind} ran past its timeout of {job.timeout_s:g} s and was killed"
        elif why or status == "canceled":
            final, error = JobStatus.CANCELED, f"{job.kind} was canceled and killed"
        elif status == "successful" and rc == 0:
            final = JobStatus.SUCCESSFUL
        elif status == "error":
            final = JobStatus.ERROR
            error = str(stats.get("exception") or f"{job.kind}: ansible-runner could not start the playbook")
        else:
            final = JobStatus.TIMEOUT if status == "timeout" else JobStatus.FAILED
            # the last failure is the one that stopped the play (earlier ones may have been rescued)
            error = state.failures[-1] if state.failures else (
                f"{job.kind} failed (ansible-playbook exit {rc}){self._tail(job)}")
        return JobOutcome(job.job_id, final, rc=rc, result=result, error=error)
