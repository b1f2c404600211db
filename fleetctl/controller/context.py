"""The controller's parts, built from one ``ControllerSettings``: one ``ControllerContext`` per process.

``ControllerContext(settings)`` builds every part that holds state and runs nothing: the store (migrated),
the CA, the registry, the job dispatcher, the artifact store, the rollout engine and the verification
service, and makes sure ``STATE/admin.token`` exists. The composition root (controller/app.py) builds it,
starts the parts' loops and the servers in order and stops them in reverse; the gRPC servicer
(controller/server.py) and every HTTP route (controller/http_deps.py ``Ctx``) reach the controller through it::

    ctx.store         # controller.store.Store  (ctx.store.session() for a unit of work)
    ctx.registry      # controller.registry.Registry (nodes, facts, liveness)
    ctx.jobs          # controller.jobs.JobDispatcher (submit_job / wait / callbacks)
    ctx.artifacts     # controller.artifacts.ArtifactStore
    ctx.signatures    # controller.signatures.SignaturePolicy (artifact add --sig; --trusted-keyring)
    ctx.provisioner   # controller.provisioning.Provisioner (the store, then upstream: release wheels, index)
    ctx.enrollment    # controller.enrollment.Enrollment (tokens, identities, revocation)
    ctx.ca            # controller.ca.CertAuthority
    ctx.rollout_engine  # controller.rollout.engine.RolloutEngine (its loop: started by controller/app.py)
    ctx.webhooks      # controller.webhooks.WebhookSender (rollout notifications; its loop: likewise)
    ctx.verification  # controller.verify_store.service.VerificationService (its scheduler: likewise)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
from pathlib import Path

from fleetctl.controller.artifacts import ArtifactStore, LargeObjects
from fleetctl.controller.ca import CertAuthority
from fleetctl.controller.enrollment import Enrollment
from fleetctl.controller.jobs import JobDispatcher
from fleetctl.controller.kubernetes_labels import NodeLabels
from fleetctl.controller.loop_monitors import GcMonitor, LoopLag
from fleetctl.controller.provisioning import Provisioner
from fleetctl.controller.registry import Registry
from fleetctl.controller.rollout.engine import RolloutEngine
from fleetctl.controller.settings import ControllerSettings
from fleetctl.controller.shared_ca import is_admin_token as shared_admin_token
from fleetctl.controller.shared_ca import read_kek, register_admin_token, shared_authority
from fleetctl.controller.signatures import SignaturePolicy
from fleetctl.controller.sqlite_lock import lock_sqlite
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.uploads import Uploads
from fleetctl.controller.verify_store.service import VerificationService
from fleetctl.controller.webhooks import WebhookSender
from fleetctl.fleet.jobs import JobOutcome
from fleetctl.fleet.statedir import prepare_state_dir, state_dir_error

log = logging.getLogger(__name__)


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
        sqlite = None if store else sqlite_file(settings.database_url)
        prepare_state_dir(state, sqlite)
        # one controller per SQLite database, refused with who holds it (several share PostgreSQL: docs/ha.md)
        self.sqlite_lock = lock_sqlite(sqlite) if sqlite is not None else None
        self.store = store or open_store(settings.database_url, timeouts=settings.db_timeouts)
        # several controllers on one PostgreSQL share the CA and accept each other's admin token (docs/ha.md)
        self.shares_state = not self.store.is_sqlite
        try:
            if self.shares_state:
                kek = read_kek(settings.ca_kek_file) if settings.ca_kek_file else None
                self.ca = shared_authority(self.store, state / "ca", kek)
            else:
                self.ca = CertAuthority(state / "ca")
            self.admin_token = ensure_admin_token(state)
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state, "write") from exc
        if self.shares_state:
            register_admin_token(self.store, self.admin_token, state / "ca")
        self.enrollment = Enrollment(self.store, self.ca, approval_required=settings.enroll_approval,
                                     cert_lifetime=dt.timedelta(seconds=settings.agent_cert_lifetime))
        self.registry = Registry(self.store, heartbeat_interval=settings.heartbeat_interval,
                                 missed_heartbeats=settings.missed_heartbeats,
                                 flush_interval=settings.flush_interval)
        self.jobs = JobDispatcher(self.store)
        self.jobs.on_job_finished = self._job_finished
        kwargs = {"max_bytes": settings.artifact_max_bytes} if settings.artifact_max_bytes else {}
        try:
            # on PostgreSQL the content is in the database too; STATE/artifacts is this controller's cache
            self.artifacts = ArtifactStore(state / "artifacts", self.store,
                                           shared=LargeObjects(self.store) if self.shares_state else None, **kwargs)
            if self.artifacts.shared is not None and (published := self.artifacts.publish_local()):
                log.info("copied %d artifact(s) of %s into the database (shared with every controller)", published,
                         state / "artifacts")
            self.uploads = Uploads(self.artifacts, stale_after_s=settings.upload_stale_seconds)
            self.uploads.clean_stale()
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state / "artifacts", "prepare") from exc
        self.signatures = SignaturePolicy.create(settings.trusted_keyring, settings.require_signed,
                                                 state / "gnupg")
        self.provisioner = Provisioner.create(self.artifacts, settings.upstream)
        # rollout notifications: queued by the engine, posted in the background (its loop: controller/app.py)
        self.webhooks = WebhookSender(base_url=lambda: self.http_url)
        self.rollout_engine = RolloutEngine(self.store, self.jobs, artifacts=self.artifacts,
                                            artifacts_dir=state / "artifacts", lease_ttl=settings.rollout_lease_ttl,
                                            provisioner=self.provisioner, notify=self.webhooks.submit,
                                            notify_urls=settings.notify_webhooks)
        self.verification = VerificationService(self, drift_delay=settings.drift_debounce,
                                                policy=settings.regression)
        # each verification's verdict as Kubernetes node labels (settings.kubernetes_labels; docs/deploy.md)
        self.node_labels = (NodeLabels(self.store, self.registry, state, settings.kubernetes_labels)
                            if settings.kubernetes_labels else None)
        self.loop_lag = LoopLag()
        self.gc_monitor = GcMonitor()
        # filled in by controller/app.py when listening
        self.grpc_address: str | None = None
        self.enroll_address: str | None = None
        self.http_url: str | None = None

    def is_admin_token(self, token: str) -> bool:
        """This controller's admin token, or (on PostgreSQL) another controller's of the same database."""
        if secrets.compare_digest(token.encode(), self.admin_token.encode()):
            return True
        return self.shares_state and shared_admin_token(self.store, token)

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
        if self.sqlite_lock is not None:
            self.sqlite_lock.release()
