"""The controller's parts wired together: one ``ControllerContext`` per process.

``ControllerContext(settings)`` opens the store (migrating it), the CA, the registry, the
job dispatcher and the artifact store, and makes sure ``STATE/admin.token`` exists. The
gRPC server (controller/server.py), the HTTP API (controller/api.py, ``create_app(ctx)``)
and later components (rollouts, scheduler, dashboard) all reach the controller through it::

    ctx.store       # controller.store.Store  (ctx.store.session() for a unit of work)
    ctx.registry    # controller.registry.Registry (nodes, facts, liveness)
    ctx.jobs        # controller.jobs.JobDispatcher (submit_job / wait / callbacks)
    ctx.artifacts   # controller.artifacts.ArtifactStore
    ctx.signatures  # controller.signatures.SignaturePolicy (artifact add --sig; --trusted-keyring)
    ctx.provisioner # controller.provisioning.Provisioner (the store, then upstream: release wheels, index)
    ctx.enrollment  # controller.enrollment.Enrollment (tokens, identities, revocation)
    ctx.ca          # controller.ca.CertAuthority
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from controller.artifacts import ArtifactStore
from controller.ca import CertAuthority
from controller.enrollment import Enrollment
from controller.jobs import JobDispatcher, JobOutcome
from controller.provisioning import Provisioner
from controller.ratelimit import ENROLL_OVERALL, ENROLL_PER_SOURCE, Rate
from controller.registry import DEFAULT_INTERVAL, DEFAULT_MISSED, Registry
from controller.signatures import SignaturePolicy
from controller.store import Store, open_store
from controller.uploads import Uploads
from controller.upstream import UpstreamConfig
from fleet.statedir import prepare_state_dir, state_dir_error

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("state/controller")


@dataclass
class ControllerSettings:
    state_dir: Path = DEFAULT_STATE_DIR
    db_url: str | None = None  # default sqlite:///STATE/controller.db
    grpc_listen: str = "127.0.0.1:7443"  # mutual TLS: every RPC but Enroll
    enroll_listen: str | None = None  # server TLS only, for Enroll; default: grpc port + 1
    http_listen: str = "127.0.0.1:7480"
    heartbeat_interval: float = DEFAULT_INTERVAL
    missed_heartbeats: int = DEFAULT_MISSED
    flush_interval: float = 2.0  # how often heartbeat last_seen batches are written
    extra_names: list[str] = field(default_factory=list)  # more SANs for the server certificate
    artifact_max_bytes: int | None = None
    # upload temp files (partial uploads agents may still continue) older than this are removed at start;
    # agents give up retrying an upload long before (agent/client.py UPLOAD_RETRY_SECONDS)
    upload_stale_seconds: float = 24 * 3600
    # enrollment attempts admitted per source address and overall (controller/ratelimit.py; --enroll-rate)
    enroll_per_source: Rate = ENROLL_PER_SOURCE
    enroll_overall: Rate = ENROLL_OVERALL
    # freeze start-up objects out of the garbage collector's reach and raise its gen-0 threshold
    # (process-wide: on for `fleet-controller serve`, off for controllers embedded in tests)
    gc_tuning: bool = False
    # where artifacts a plan needs come from when the store lacks them (controller/upstream.py)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # operator keys that may sign `fleetctl artifact add --sig` uploads (controller/signatures.py;
    # --trusted-keyring); require_signed refuses unsigned operator uploads (--require-signed)
    trusted_keyring: Path | None = None
    require_signed: bool = False

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.state_dir / 'controller.db').resolve()}"


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def ensure_admin_token(state_dir: Path) -> str:
    path = state_dir / "admin.token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


class ControllerContext:
    def __init__(self, settings: ControllerSettings, store: Store | None = None) -> None:
        self.settings = settings
        state = settings.state_dir
        # 0700 dir, 0600 secrets (tightened if an older version left them looser), and a read-only or full
        # state dir refused here with a StateDirError that says what to do (controller/statedir.py)
        prepare_state_dir(state, None if store else sqlite_file(settings.database_url))
        self.store = store or open_store(settings.database_url)
        try:
            self.ca = CertAuthority(state / "ca")
            self.admin_token = ensure_admin_token(state)
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state, "write") from exc
        self.enrollment = Enrollment(self.store, self.ca)
        self.registry = Registry(self.store, heartbeat_interval=settings.heartbeat_interval,
                                 missed_heartbeats=settings.missed_heartbeats)
        self.jobs = JobDispatcher(self.store)
        self.jobs.on_job_finished = self._job_finished
        kwargs = {"max_bytes": settings.artifact_max_bytes} if settings.artifact_max_bytes else {}
        try:
            self.artifacts = ArtifactStore(state / "artifacts", self.store, **kwargs)
            self.uploads = Uploads(self.artifacts, stale_after_s=settings.upload_stale_seconds)
            self.uploads.clean_stale()
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state / "artifacts", "prepare") from exc
        self.signatures = SignaturePolicy.create(settings.trusted_keyring, settings.require_signed,
                                                 state / "gnupg")
        self.provisioner = Provisioner.create(self.artifacts, settings.upstream)
        from controller.server import GcMonitor, LoopLag

        self.loop_lag = LoopLag()
        self.gc_monitor = GcMonitor()
        # filled in by controller.serve when listening
        self.grpc_address: str | None = None
        self.enroll_address: str | None = None
        self.http_url: str | None = None

    def _job_finished(self, node: str, outcome: JobOutcome) -> None:
        self.registry.request_facts(node)

    def revoke_agent(self, hostname: str, actor: str = "admin") -> list[str]:
        """Revoke the agent(s) enrolled for ``hostname``: their certificates stop working at once."""
        ids = self.enrollment.revoke_agent(hostname, actor)
        for agent_id in ids:
            self.registry.forget_identity(agent_id)
        return ids

    def close(self) -> None:
        self.store.close()
