"""One exception root for the whole project.

Every error a user can hit carries a stable reference (``code``), a message that
says what happened, and a hint that says what to do next. The CLI maps these to
exit codes in one place (``controller.cli``); foreign exceptions are translated
into these at the boundary that raised them.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error fleetctl raises on purpose."""

    code = "fleet-error"
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(FleetError):
    """The command line or a request was malformed."""

    code = "usage"
    exit_code = 2


class InputError(FleetError):
    """A file or payload a user supplied is not valid."""

    code = "bad-input"
    exit_code = 3


class FactsError(InputError):
    """Node facts do not satisfy the contract (DESIGN §3.1)."""

    code = "bad-facts"

    def __init__(self, message: str, *, node: str | None = None, field: str | None = None,
                 hint: str | None = None) -> None:
        where = ", ".join(p for p in (f"node {node}" if node else "", f"field {field}" if field else "") if p)
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.node = node
        self.field = field


class CatalogError(InputError):
    """A wheel catalog entry or file is not valid."""

    code = "bad-catalog"


class NotFoundError(FleetError):
    """Something the user named does not exist."""

    code = "not-found"
    exit_code = 4


class ConflictError(FleetError):
    """The request conflicts with the current state (e.g. a rollout already running)."""

    code = "conflict"
    exit_code = 5


class StaleFactsError(ConflictError):
    """A node's facts predate its last job (an install or rollback it has not reported yet): a plan made from
    them would be wrong. Its agent reports on its next heartbeat; retrying then succeeds."""

    code = "stale-facts"


class AuthError(FleetError):
    """Identity or credentials were refused."""

    code = "auth"
    exit_code = 6


class CertificateTrustError(AuthError):
    """A TLS handshake failed: the peer's certificate is not one the CA we were given verifies (a wrong ``--ca``,
    a controller whose CA was replaced) or the address is not a TLS endpoint of ours."""

    code = "tls"


class ForbiddenError(FleetError):
    """An authenticated caller asked for something its identity may not do (e.g. an agent uploading an
    artifact that is not the output of a build job assigned to it)."""

    code = "forbidden"
    exit_code = 6


class ControllerUnavailable(FleetError):
    """The controller could not be reached."""

    code = "controller-unavailable"
    exit_code = 7


class StoreError(FleetError):
    """The database refused or failed an operation."""

    code = "store"
    exit_code = 8
    # a retry can succeed (dropped connection, lock or statement timeout); set by controller.store.Store
    transient = False


class ExecutionError(FleetError):
    """A playbook, build or benchmark on a node failed."""

    code = "execution"
    exit_code = 9


class UpstreamError(FleetError):
    """An artifact could not be had from upstream or the artifact store: unreachable, missing, or other bytes
    than announced (controller/upstream.py)."""

    code = "upstream"
    exit_code = 14  # 10-13 are `fleetctl rollout`'s outcomes (paused, partial, aborted, rollback-failed)


class StateDirError(FleetError):
    """The controller's or agent's state directory cannot be used: read-only, full, or not writable by this user
    (an ``OSError`` translated where the state dir is prepared or written, controller/statedir.py)."""

    code = "state-dir"
    exit_code = 15
