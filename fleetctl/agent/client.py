"""The agent's network side: enroll once, then report facts, heartbeat and run jobs, reconnecting with backoff.

::

    cfg = AgentConfig(controller="10.0.0.1:7443", state_dir=Path("state/agent"), ca_file=Path("ca.pem"),
                      token="fleet_...", facts=lambda: collect_facts(None), runner=my_runner)
    await Agent(cfg).run(stop_event)

Enrollment (``Enroll`` on the controller's enrollment port, server TLS verified with
``ca_file``) stores ``agent.key`` (0600), ``agent.pem``, ``ca.pem`` and ``identity.json`` in
the state dir; later starts reuse them and need no token. Every other call uses mutual
TLS on the agent port. A token with approval makes the controller answer "pending": the agent
keeps its key and ``pending.json`` and asks again every few seconds until an operator approves
(``fleetctl agents approve HOST``), denies, or ``approval_timeout`` passes; a restart resumes the
wait. When a third of the certificate's lifetime is left, the agent renews it over its session
(``RenewCertificate``, same key), replaces ``agent.pem`` atomically and starts a new session with it;
running jobs carry on (they survive reconnections, below).

Bounded start: a ``--ca`` that is not a certificate, or a controller whose TLS certificate it does not
verify, is one clear error at once; a controller not reachable within ``connect_timeout`` of the start
(enrolling, or the first session) ends the agent with an error. Once a session was established, outages
are retried without end (exponential backoff with jitter, capped at ``backoff_max``). On stop (SIGTERM,
SIGINT: ``run(stop)``) in any phase the agent returns within a bound: running jobs are canceled (their
playbooks killed) and reported ``canceled`` within ``stop_grace`` seconds.

Jobs arrive on the ``Jobs`` stream and go to the ``JobRunner``
(agent/jobs.py); their events go through a bounded queue that never blocks the runner
(when full, events are dropped and counted), and are sent in batches by a separate task.
Running jobs survive reconnections: each ``Jobs`` stream opens with the ids of the jobs this
process still holds (received, and not yet acknowledged by ``CompleteJob``: running, or finished
with the result still being re-sent), so the controller can tell a reconnect (it leaves those
jobs alone) from a restart (it fails the jobs the new process does not hold as interrupted;
controller/jobs.py). Held jobs live in memory only: a result not delivered when the process dies
is lost, and the controller says so. Events and results cut off mid-call by a session ending (grpc.aio
raises ``CancelledError`` from a call whose channel closes) are sent again on the next session
(``cut_off``); only a cancellation of the job's own task (agent stop) ends it. Refusals of identity (UNAUTHENTICATED,
PERMISSION_DENIED) end the agent with ``AuthError``; everything else is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import random
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetctl.agent import wire
from fleetctl.agent.jobs import JobRunner
from fleetctl.fleet.errors import (
    AuthError,
    CertificateTrustError,
    ConflictError,
    ControllerUnavailable,
    FleetError,
    ForbiddenError,
    InputError,
    NotFoundError,
)
from fleetctl.fleet.facts import MAX_FACTS_BYTES, NodeFacts
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.statedir import FILE_MODE, private_dir, state_dir_error, tighten
from fleetctl.fleet.v1 import fleet_pb2 as pb
from fleetctl.fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MESSAGE_BYTES = MAX_FACTS_BYTES + 64 * 1024
EVENT_QUEUE_SIZE = 1000
EVENT_BATCH = 100
RPC_TIMEOUT = 10.0
FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CONNECT_TIMEOUT = 300.0
APPROVAL_TIMEOUT = 3600.0
STOP_GRACE = 20.0
RETURN_HOME_AFTER = 300.0
UPLOAD_CHUNK_BYTES = 128 * 1024  # under the 320 KiB message limit (MAX_MESSAGE_BYTES)
# how long a built wheel's upload is retried (controller restarts, lost links, full disk, database errors):
# a build costs up to half an hour of a GPU node, so waiting as long for the controller is worth it
UPLOAD_RETRY_SECONDS = 30 * 60
UPLOAD_STREAM_TIMEOUT = 600.0  # one stream; a timed-out one is continued where it stopped
# what a retry can fix: the controller is away or restarting (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED),
# out of disk or database (UNAVAILABLE), or its held part changed (ABORTED: ask again where to continue)
UPLOAD_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                                grpc.StatusCode.INTERNAL})


def channel_options(server_name: str | None = None) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 10_000),
        # a controller name resolving to several addresses: dial them in turn, in an order of this channel's own,
        # so that a fleet spreads over them (gRFC A62); the agent's own failover moves between listed controllers
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"pick_first": {"shuffleAddressList": True}}]})),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


def cut_off() -> bool:
    """Inside ``except asyncio.CancelledError``: True when the running task was not cancelled itself.

    grpc.aio raises ``CancelledError`` from a call whose channel is closed under it — the session ends
    when the controller goes away — which is a lost connection to retry, not a request to stop.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class NoExecutor:
    """Default ``JobRunner``: fails every job, saying that no executor is installed."""

    async def run(self, job: JobSpec, emit_event: Callable[[dict[str, Any]], None]) -> JobOutcome:
        emit_event({"event": "fleet_no_executor", "event_data": {"kind": job.kind}})
        return JobOutcome(job.job_id, JobStatus.FAILED, rc=127,
                          error=f"no executor: this agent cannot run {job.kind!r} jobs "
                                "(start it with a playbook executor; see docs/fleet.md)")


# a refusal's details as controller/server.py writes them: "<code>: <message> (hint: <hint>)"
CONTROLLER_DETAIL_RE = re.compile(r"[a-z][a-z-]*: (?P<message>.*?)(?: \(hint: (?P<hint>.*)\))?", re.DOTALL)


def rpc_error(exc: grpc.aio.AioRpcError, what: str) -> FleetError:
    """A gRPC failure as a FleetError (the controller puts ``code: message (hint: ...)`` in details)."""
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and "hostname verification check failed" in detail.lower():
        # gRPC's check of the host dialled against the certificate's names (grpc_tls_certificate_verifier.cc): the CA
        # verified it, the controller lacks a --san; a configuration error like a wrong CA, not an outage to wait out
        return CertificateTrustError(f"{what}: the controller's certificate does not name the host it was dialled "
                                     f"as: {detail}",
                                     hint="give each controller that name (`fleet-controller serve --san NAME`: a "
                                          "DNS name in --controller, or the IP address dialled), or tell the agent "
                                          "a name its certificate carries (--server-name)")
    if code == grpc.StatusCode.UNAVAILABLE and "handshake failed" in detail.lower():
        return CertificateTrustError(f"{what}: the TLS handshake with the controller failed: {detail}",
                                     hint="pass the controller's CA as --ca (STATE/ca/ca.pem on the controller, or "
                                          "the root of the CA imported there) and check that the address is the "
                                          "controller's gRPC port")
    if code in FATAL_CODES:
        # the controller's own hint says what to do for this refusal (a used-up token, a pattern, a network)
        said = CONTROLLER_DETAIL_RE.fullmatch(detail)
        return AuthError(f"{what} refused by the controller: {said['message'] if said else detail}",
                         hint=said["hint"] if said and said["hint"]
                         else "enroll again with a fresh token (`fleetctl tokens create`)")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(f"{what}: {detail}", hint="see the message")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return ConflictError(f"{what} refused: {detail}", hint="see the message")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return InputError(f"{what} refused: {detail}", hint="see the message")
    return ControllerUnavailable(f"{what} failed: {code.name}: {detail}",
                                 hint="check that the controller is running and reachable")


@dataclass(frozen=True)
class Credentials:
    agent_id: str
    hostname: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @staticmethod
    def load(state_dir: Path) -> Credentials | None:
        try:
            ident = json.loads((state_dir / "identity.json").read_text())
            return Credentials(ident["agent_id"], ident["hostname"], (state_dir / "agent.key").read_bytes(),
                               (state_dir / "agent.pem").read_bytes(), (state_dir / "ca.pem").read_bytes())
        except (OSError, ValueError, KeyError):
            return None

    @staticmethod
    def secure(state_dir: Path) -> None:
        """The agent's state dir 0700 and its key 0600, tightened (with a log line) if an older agent left them
        looser; a state dir that cannot be changed is a ``StateDirError`` saying what to do."""
        try:
            if state_dir.exists():
                private_dir(state_dir)
                tighten(state_dir / "agent.key", FILE_MODE)
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state_dir, "secure") from exc

    def save(self, state_dir: Path) -> None:
        try:
            private_dir(state_dir)
            fd = os.open(state_dir / "agent.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key_pem)
            os.chmod(state_dir / "agent.key", FILE_MODE)  # an older file keeps its mode through O_TRUNC
            (state_dir / "agent.pem").write_bytes(self.cert_pem)
            (state_dir / "ca.pem").write_bytes(self.ca_pem)
            (state_dir / "identity.json").write_text(json.dumps({"agent_id": self.agent_id,
                                                                  "hostname": self.hostname}) + "\n")
        except OSError as exc:
            # enrolled, but the certificate could not be kept: the token is spent, so say so plainly
            raise state_dir_error(exc, exc.filename or state_dir, "save the agent's credentials in") from exc


    def save_certificate(self, state_dir: Path, cert_pem: bytes, ca_pem: bytes) -> Credentials:
        """These credentials with a renewed certificate, written atomically (a crash leaves the old or the new
        file, never half of one; the key is the same, so either pairs with it)."""
        try:
            for name, data in (("ca.pem", ca_pem), ("agent.pem", cert_pem)):
                tmp = state_dir / f".{name}.new"
                tmp.write_bytes(data)
                os.replace(tmp, state_dir / name)
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state_dir, "save the renewed certificate in") from exc
        return dataclasses.replace(self, cert_pem=cert_pem, ca_pem=ca_pem)


@dataclass(frozen=True)
class PendingEnrollment:
    """An enrollment waiting for an operator's approval: the key the CSR was made for and the secret to ask with
    (``pending.json`` + ``agent.key`` in the state dir, so that a restarted agent goes on waiting)."""

    agent_id: str
    hostname: str
    secret: str
    key_pem: bytes

    @staticmethod
    def load(state_dir: Path) -> PendingEnrollment | None:
        try:
            data = json.loads((state_dir / "pending.json").read_text())
            return PendingEnrollment(data["agent_id"], data["hostname"], data["secret"],
                                     (state_dir / "agent.key").read_bytes())
        except (OSError, ValueError, KeyError):
            return None

    def save(self, state_dir: Path) -> None:
        try:
            private_dir(state_dir)
            for name, data in (("agent.key", self.key_pem), ("pending.json", json.dumps(
                    {"agent_id": self.agent_id, "hostname": self.hostname, "secret": self.secret}).encode() + b"\n")):
                fd = os.open(state_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        except OSError as exc:
            raise state_dir_error(exc, exc.filename or state_dir, "save the pending enrollment in") from exc

    @staticmethod
    def clear(state_dir: Path) -> None:
        (state_dir / "pending.json").unlink(missing_ok=True)


def certificate_window(cert_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    """(not before, not after) of the first certificate in ``cert_pem``."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def renewal_due(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a certificate is renewed: as soon as less than a third of its lifetime is left."""
    return not_after - (not_after - not_before) / 3


def read_ca(path: Path) -> bytes:
    """The CA bundle in ``path``, checked to hold PEM certificates (a garbage file would only fail later, inside
    every TLS handshake, as an endless "unavailable")."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read CA file {path}: {exc.strerror}", hint="check --ca") from exc
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InputError(f"--ca {path} is not a PEM certificate ({exc})",
                         hint="copy the controller's STATE/ca/ca.pem (or the root of the CA imported there) "
                              "and pass it as --ca") from None
    return data


class Backoff:
    """Exponential delays with jitter, capped: ``initial``, twice that, … up to ``maximum``, each drawn from
    [d/2, d] so that agents restarted together do not come back in step."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self._delay = initial

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay * (0.5 + random.random() / 2)

    def first(self) -> float:
        """The initial delay, jittered, without growing the next one."""
        return self.initial * (0.5 + random.random() / 2)

    def reset(self) -> None:
        self._delay = self.initial


async def until_stopped(aw: Awaitable[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """``(True, result)``, or ``(False, None)`` when ``stop`` is set first (``aw`` is then cancelled)."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False, None


def default_enroll_address(controller: str) -> str:
    host, _, port = controller.rpartition(":")
    return f"{host}:{int(port) + 1}"


def controller_targets(text: str) -> tuple[str, ...]:
    """The controllers of ``--controller``: ``HOST:PORT``, or several comma-separated, in the order given (repeats
    dropped); an entry that is not ``HOST:PORT`` is an ``InputError`` naming it. A HOST whose name resolves to several
    addresses is one entry: gRPC's DNS resolver gives the channel all of them and ``pick_first`` dials them in turn,
    in an order shuffled per channel (``channel_options``)."""
    targets: list[str] = []
    for entry in (e.strip() for e in text.split(",")):
        host, sep, port = entry.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
                or (":" in host and not bracketed) or any(c.isspace() for c in host)):
            raise InputError(f"controller address {entry!r} (in {text!r}) is not HOST:PORT",
                             hint="give each controller's agent port, comma-separated: "
                                  "--controller ctl-a:7443,ctl-b:7443 (an IPv6 address in brackets: [::1]:7443)")
        if entry not in targets:
            targets.append(entry)
    return tuple(targets)


def enroll_targets(controllers: tuple[str, ...], enroll_address: str | None) -> tuple[str, ...]:
    """Where to enroll: ``--enroll-address`` (one or several, like ``--controller``), else each controller's agent
    port + 1."""
    if enroll_address:
        return controller_targets(enroll_address)
    return tuple(default_enroll_address(c) for c in controllers)


def first_controller(count: int, node: str) -> int:
    """The index of the controller a node dials first: a hash of its name, so that a fleet spreads over the list
    and a node starts at the same controller every time."""
    return zlib.crc32(node.encode()) % count


def failover_spread(node: str) -> int:
    """Which of the other controllers a node moves to when it loses its session (``Failover``): a hash of its name,
    independent of ``first_controller``'s, so that the nodes of one controller spread over the others."""
    return zlib.crc32(node.encode()[::-1])


class Failover:
    """Which of its controllers the agent dials next, and how long it waits first (no I/O; unit-tested).

    A dial that fails moves on to the next controller at once, until every controller failed in a row; from then on
    each full round waits the growing delay of ``backoff``. A session that was established and ended (the
    controller died, the connection broke, a keepalive or heartbeat timed out) moves on to another controller after
    the initial delay, jittered (``Backoff``) so that the agents of a dead controller do not all arrive at once; which
    other one depends on ``spread`` (a hash of the node's name), so that the agents of a dead controller spread
    over the survivors instead of all landing on the next one in the list.
    With one controller this is the plain reconnect backoff. An agent on another controller than its first goes back
    to its first once that one answers again and the agent holds no job (``go_to``; ``Agent._return_home_when_back``).
    """

    #: After a session ends, this many failed rounds retry at the initial delay before it starts growing: a
    #: controller restart (upgrade, crash and systemd restart) takes seconds, and an agent that waited out a grown
    #: delay would come back long after its controller (issue 13). 20 rounds of 0.25–0.5 s: about 5–10 s of quick
    #: tries, then the exponential backoff.
    QUICK_ROUNDS = 20

    def __init__(self, backoff: Backoff, start: int = 0, spread: int = 0) -> None:
        self.backoff = backoff
        self.index = start
        self.spread = spread
        self.failed_in_row = 0
        self.quick_rounds = 0

    def pick(self, targets: tuple[str, ...]) -> str:
        """The controller to dial now."""
        return targets[self.index % len(targets)]

    def after_attempt(self, count: int, established: bool) -> float:
        """The attempt on the current controller ended (``established``: its session came up); move to the next of
        ``count`` controllers and return the seconds to wait before dialling it."""
        if established:
            # to one of the other count - 1 controllers, chosen by the node (then on, failed dials step by one)
            self.index = (self.index + 1 + (self.spread % (count - 1) if count > 1 else 0)) % count
            self.answered()
            self.quick_rounds = self.QUICK_ROUNDS
            return self.backoff.next()
        self.index = (self.index + 1) % count
        self.failed_in_row += 1
        if self.failed_in_row % count:
            return 0.0  # a controller not tried yet in this round: at once
        if self.quick_rounds > 0:
            self.quick_rounds -= 1
            return self.backoff.first()
        return self.backoff.next()

    def answered(self) -> None:
        """The current controller answered: the next failure starts a new round at the initial delay."""
        self.failed_in_row = 0
        self.backoff.reset()

    def go_to(self, index: int) -> None:
        """Dial controller ``index`` next, at once (it is known to answer: the agent returns to its first one)."""
        self.index = index
        self.answered()


def new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_for(key_pem: bytes, name: str) -> bytes:
    """A PEM CSR for the key in ``key_pem`` (the controller sets the subject: the agent id)."""
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


async def request_enrollment(controller_enroll: str, ca_pem: bytes, token: str, hostname: str,
                             server_name: str | None = None, timeout: float = RPC_TIMEOUT,
                             pending: PendingEnrollment | None = None) -> Credentials | PendingEnrollment:
    """Enroll with ``token`` (a new key and CSR), or ask again about ``pending``: the certificate, or the
    enrollment still waiting for approval."""
    key_pem = pending.key_pem if pending else new_key_pem()
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(controller_enroll, creds, options=channel_options(server_name)) as ch:
        stub = pb_grpc.AgentServiceStub(ch)
        try:
            resp = await stub.Enroll(pb.EnrollRequest(token="" if pending else token, hostname=hostname,
                                                      csr_pem=csr_for(key_pem, hostname),
                                                      pending_secret=pending.secret if pending else ""),
                                     timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "enrollment") from exc
    if resp.pending_secret:
        return PendingEnrollment(resp.agent_id, resp.hostname, resp.pending_secret, key_pem)
    return Credentials(resp.agent_id, resp.hostname, key_pem, bytes(resp.certificate_pem),
                       bytes(resp.ca_pem) or ca_pem)


async def enroll(controller_enroll: str, ca_pem: bytes, token: str, hostname: str,
                 server_name: str | None = None, timeout: float = RPC_TIMEOUT) -> Credentials:
    """Enroll with ``token``: make a key and CSR, get a client certificate (a token without approval)."""
    got = await request_enrollment(controller_enroll, ca_pem, token, hostname, server_name, timeout)
    if isinstance(got, PendingEnrollment):
        raise AuthError(f"enrollment of {hostname} waits for approval",
                        hint=f"run `fleetctl agents approve {hostname}`")
    return got


@dataclass
class AgentConfig:
    controller: str  # HOST:PORT of the agent (mTLS) port
    state_dir: Path
    facts: Callable[[], NodeFacts]
    runner: JobRunner = field(default_factory=NoExecutor)
    ca_file: Path | None = None  # needed to enroll; afterwards state_dir/ca.pem is used
    token: str | None = None
    enroll_address: str | None = None  # default: agent port + 1
    hostname: str | None = None  # default: the hostname in the facts
    server_name: str | None = None  # TLS name override
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    upload_retry_s: float = UPLOAD_RETRY_SECONDS
    event_queue_size: int = EVENT_QUEUE_SIZE
    # the controller not reached this long after the start (enrolling, or the first session): give up with an
    # error; after a session was established, outages are retried without end
    connect_timeout: float = CONNECT_TIMEOUT
    approval_timeout: float = APPROVAL_TIMEOUT  # how long an enrollment waits for an operator's approval
    approval_poll: float = 5.0
    stop_grace: float = STOP_GRACE  # on stop, how long running jobs get to be canceled and reported
    # on another controller than its first (``first_controller``): how often the agent looks whether its first one
    # is back, and returns to it when holding no job — so that a restarted controller gets its agents back; 0: never
    return_home_after: float = RETURN_HOME_AFTER

    def __post_init__(self) -> None:
        # absolute from the start: the agent's files must not move if its working directory changes or vanishes
        self.state_dir = Path(os.path.abspath(self.state_dir))
        if self.ca_file is not None:
            self.ca_file = Path(os.path.abspath(self.ca_file))


@dataclass
class _RunningJob:
    spec: JobSpec
    queue: asyncio.Queue[pb.JobEvent | None]
    counter: int = 0
    dropped: int = 0


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.creds: Credentials | None = None
        self._stub: pb_grpc.AgentServiceAsyncStub | None = None
        self._connected = asyncio.Event()
        self._seen_jobs: set[str] = set()
        self._held: set[str] = set()  # received, result not acknowledged yet (sent when a Jobs stream opens)
        self._jobs: dict[str, _RunningJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.sequence = 0
        self.heartbeats = 0
        self.sessions = 0
        self._session_up = False  # the current session's first RPC was answered (resets the backoff)
        self._facts_due = False  # a requested facts report failed: send it again on the next heartbeat
        self._facts_task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()
        self.interval = 10.0
        self.renewals = 0
        self._stopping = asyncio.Event()  # set on stop: running jobs are canceled and reported
        self._renewed = False  # the session ended to go on with a renewed certificate
        self._home = ""  # the controller this node starts at (``first_controller``)
        self._returning = False  # the session ended to go back to ``_home``, which is up again
        self._ever_connected = False
        self.controller = ""  # the controller (of cfg.controller) the current session dials: Failover picks it

    # ---- enrollment --------------------------------------------------------------------

    async def ensure_enrolled(self, stop: asyncio.Event | None = None) -> Credentials | None:
        """The agent's credentials: stored ones, else enrolled now (waiting for approval if the token asks for it);
        None when ``stop`` is set first."""
        stop = stop or asyncio.Event()
        Credentials.secure(self.cfg.state_dir)
        creds = Credentials.load(self.cfg.state_dir)
        if creds is not None:
            self.creds = creds
            return creds
        pending = PendingEnrollment.load(self.cfg.state_dir)
        if pending is None and not self.cfg.token:
            raise AuthError(f"agent not enrolled yet (nothing in {self.cfg.state_dir}) and no token given",
                            hint="create one with `fleetctl tokens create` and pass --token")
        if self.cfg.ca_file is None:
            raise AuthError("no controller CA certificate to verify the controller with",
                            hint="pass --ca STATE/ca/ca.pem of the controller")
        ca_pem = read_ca(self.cfg.ca_file)
        if pending is not None:
            hostname = pending.hostname
        else:
            started, facts = await until_stopped(asyncio.to_thread(self.cfg.facts), stop)
            if not started or facts is None:
                return None
            hostname = self.cfg.hostname or facts.hostname
        # the enrollment ports of every controller (they share the database and the CA: docs/ha.md), tried in turn
        addresses = enroll_targets(controller_targets(self.cfg.controller), self.cfg.enroll_address)
        failover = Failover(Backoff(self.cfg.backoff_initial, self.cfg.backoff_max),
                            first_controller(len(addresses), hostname))
        deadline = time.monotonic() + self.cfg.connect_timeout
        approval_deadline: float | None = None
        while True:
            address = failover.pick(addresses)
            try:
                answered, got = await until_stopped(request_enrollment(
                    address, ca_pem, self.cfg.token or "", hostname, self.cfg.server_name, pending=pending), stop)
            except FleetError as exc:
                if pending is not None and isinstance(exc, AuthError) and not isinstance(exc, CertificateTrustError):
                    PendingEnrollment.clear(self.cfg.state_dir)  # denied or removed: a new token starts afresh
                if exc.code != "controller-unavailable":
                    raise
                if time.monotonic() + 1 > (approval_deadline or deadline):
                    raise ControllerUnavailable(
                        f"cannot enroll: {'the enrollment port ' if len(addresses) == 1 else 'no enrollment port of '}"
                        f"{', '.join(addresses)} was {'not ' if len(addresses) == 1 else ''}reachable for "
                        f"{self.cfg.connect_timeout:g}s; "
                        f"last error ({address}): {exc.message}",
                        hint="check that the controller runs and that --controller/--enroll-address and the "
                             "network (firewall) let this node reach it; then start the agent again") from None
                wait = failover.after_attempt(len(addresses), established=False)
                log.warning("%s; trying %s in %.1fs", exc.message, failover.pick(addresses), wait)
                if await self._stopped_within(stop, wait):
                    return None
                continue
            if not answered or got is None:
                return None
            if isinstance(got, Credentials):
                break
            if pending is None:
                got.save(self.cfg.state_dir)  # a restarted agent goes on waiting with the same request
            pending = got
            if approval_deadline is None:
                approval_deadline = time.monotonic() + self.cfg.approval_timeout
                log.warning("waiting for approval on controller %s: run `fleetctl agents approve %s` (agent %s; "
                            "waiting at most %gs)", address, hostname, got.agent_id, self.cfg.approval_timeout)
            if time.monotonic() > approval_deadline:
                raise AuthError(f"enrollment of {hostname} was not approved within {self.cfg.approval_timeout:g}s",
                                hint=f"run `fleetctl agents approve {hostname}` on the controller, then start the "
                                     "agent again: it goes on waiting with the same request")
            failover.answered()
            if await self._stopped_within(stop, self.cfg.approval_poll):
                return None
        got.save(self.cfg.state_dir)
        PendingEnrollment.clear(self.cfg.state_dir)
        log.info("enrolled as %s (agent %s)", got.hostname, got.agent_id)
        self.creds = got
        return got

    @staticmethod
    async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    # ---- main loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set; raises ``AuthError`` if the controller refuses this identity,
        ``ControllerUnavailable`` if it is not reached within ``connect_timeout`` of the start."""
        stop = stop or asyncio.Event()
        started = time.monotonic()
        creds = await self.ensure_enrolled(stop)
        if creds is None:
            log.info("stopped while enrolling")
            return
        _, not_after = certificate_window(creds.cert_pem)
        if not_after <= dt.datetime.now(dt.UTC):
            raise AuthError(f"this agent's certificate expired at {not_after.isoformat(timespec='seconds')} "
                            "(it was not running to renew it in time)",
                            hint=f"revoke it (`fleetctl agents revoke {creds.hostname}`), remove identity.json from "
                                 f"{self.cfg.state_dir} and enroll again with a fresh token")
        leave = asyncio.Event()  # set once stopping jobs were canceled and reported (or stop_grace passed)
        drainer = asyncio.create_task(self._stop_jobs_on(stop, leave))
        # read each round, so that a list changed while the agent runs applies to its next dial
        count = len(controller_targets(self.cfg.controller))
        failover = Failover(Backoff(self.cfg.backoff_initial, self.cfg.backoff_max),
                            first_controller(count, creds.hostname), spread=failover_spread(creds.hostname))
        try:
            while not leave.is_set():
                self._session_up = self._renewed = self._returning = False
                targets = controller_targets(self.cfg.controller)
                self.controller = failover.pick(targets)
                self._home = targets[first_controller(len(targets), creds.hostname)]
                failure: FleetError | None = None
                try:
                    await self._session(self.creds or creds, leave)
                except grpc.aio.AioRpcError as exc:
                    failure = rpc_error(exc, "controller session")
                except FleetError as exc:
                    failure = exc
                # a refused identity ends the agent; a TLS failure too, unless a session worked before (a
                # controller restarting mid-handshake must not stop a working agent)
                if isinstance(failure, AuthError) and not (isinstance(failure, CertificateTrustError)
                                                           and self._ever_connected):
                    raise failure
                if leave.is_set():
                    break
                if self._renewed:
                    continue  # straight on with the renewed certificate, on the same controller
                if self._returning:
                    failover.go_to(targets.index(self._home))
                    continue  # straight back to the first controller, which answered
                if not self._ever_connected and time.monotonic() - started > self.cfg.connect_timeout:
                    raise ControllerUnavailable(
                        f"{'the controller at ' if len(targets) == 1 else 'none of the controllers '}"
                        f"{', '.join(targets)} was {'not ' if len(targets) == 1 else ''}reachable for "
                        f"{self.cfg.connect_timeout:g}s after the start; "
                        f"last error ({self.controller}): {failure.message if failure else 'none'}",
                        hint="check that the controller runs and that --controller and the network let this node "
                             "reach its gRPC port; then start the agent again")
                # On to the next controller (Failover). A session that was established (the controller answered its
                # first RPC) starts the next round at the initial delay: waiting for a long session instead left
                # agents at the maximum delay after a few quick controller restarts. Jitter stays.
                wait = failover.after_attempt(len(targets), established=self._session_up)
                if failure:
                    log.warning("%s; reconnecting to %s in %.1fs", failure.message, failover.pick(targets), wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(leave.wait(), wait)
        finally:
            drainer.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(drainer, *self._tasks, return_exceptions=True)

    async def _stop_jobs_on(self, stop: asyncio.Event, leave: asyncio.Event) -> None:
        """On ``stop``: cancel the running jobs (their playbooks are killed), let them report ``canceled`` over the
        session still open, then ``leave`` — after ``stop_grace`` seconds at most."""
        await stop.wait()
        self._stopping.set()
        jobs = list(self._tasks)
        if jobs:
            log.info("stopping: canceling %d running job(s) and reporting them (at most %gs)", len(jobs),
                     self.cfg.stop_grace)
            _, left = await asyncio.wait(jobs, timeout=self.cfg.stop_grace)
            if left:
                log.warning("stopping: %d job result(s) not delivered within %gs; the controller fails them as "
                            "interrupted when the agent is back", len(left), self.cfg.stop_grace)
        leave.set()

    async def _session(self, creds: Credentials, stop: asyncio.Event) -> None:
        channel_creds = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem,
                                                     private_key=creds.key_pem, certificate_chain=creds.cert_pem)
        async with grpc.aio.secure_channel(self.controller, channel_creds,
                                           options=channel_options(self.cfg.server_name)) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            self.sessions += 1
            self._facts_due = False  # reported right here
            await self.report_facts(stub)
            self._session_up = self._ever_connected = True
            log.info("session %d with controller %s (holding %d job(s))", self.sessions, self.controller,
                     len(self._held))
            self._stub = stub
            self._connected.set()
            tasks = [asyncio.create_task(self._heartbeats(stub)), asyncio.create_task(self._job_stream(stub)),
                     asyncio.create_task(stop.wait()), asyncio.create_task(self._renew_when_due(stub, creds))]
            if self.controller != self._home and self.cfg.return_home_after > 0:
                tasks.append(asyncio.create_task(self._return_home_when_back(channel_creds)))
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            finally:
                self._connected.clear()
                self._stub = None
                if self._facts_task is not None:
                    tasks.append(self._facts_task)
                    self._facts_task = None
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _return_home_when_back(self, channel_creds: grpc.ChannelCredentials) -> None:
        """On another controller than the first: every ``return_home_after`` seconds (jittered), while holding no job,
        look whether the first controller accepts a connection (TLS with this agent's certificate); when it does, end
        the session to go back to it (``_returning``). Without this, agents never leave the controller they failed
        over to, and a rolling restart gathers the whole fleet on the last controller restarted."""
        while True:
            await asyncio.sleep(self.cfg.return_home_after * (0.8 + 0.4 * random.random()))
            if self._held:
                continue  # moving is cheap for a running job, but not free: wait until it is reported
            try:
                async with grpc.aio.secure_channel(self._home, channel_creds,
                                                   options=channel_options(self.cfg.server_name)) as probe:
                    await asyncio.wait_for(probe.channel_ready(), RPC_TIMEOUT)
            except TimeoutError:
                continue
            log.info("controller %s is back: returning to it from %s", self._home, self.controller)
            self._returning = True
            return

    async def _renew_when_due(self, stub: pb_grpc.AgentServiceAsyncStub, creds: Credentials) -> None:
        """Renew the client certificate once a third of its lifetime is left, then end the session so that the
        next one uses it (``_renewed``). A failed renewal is retried; a refused one ends the agent."""
        not_before, not_after = certificate_window(creds.cert_pem)
        due = renewal_due(not_before, not_after)
        retry = Backoff(max(1.0, self.cfg.backoff_initial), max(5.0, self.cfg.backoff_max))
        while True:
            wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, 3600.0))  # re-checked hourly: a suspended host wakes up late
                continue
            try:
                resp = await stub.RenewCertificate(
                    pb.RenewCertificateRequest(csr_pem=csr_for(creds.key_pem, creds.hostname)), timeout=RPC_TIMEOUT)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise
                delay = retry.next()
                log.warning("renewing the certificate (expires %s) failed: %s; retrying in %.1fs",
                            not_after.isoformat(timespec="seconds"), rpc_error(exc, "renewal").message, delay)
                await asyncio.sleep(delay)
        self.creds = creds.save_certificate(self.cfg.state_dir, bytes(resp.certificate_pem),
                                            bytes(resp.ca_pem) or creds.ca_pem)
        self.renewals += 1
        self._renewed = True
        log.info("certificate renewed until %s; reconnecting with it",
                 certificate_window(self.creds.cert_pem)[1].isoformat(timespec="seconds"))

    async def report_facts(self, stub: pb_grpc.AgentServiceAsyncStub) -> list[str]:
        facts = await asyncio.to_thread(self.cfg.facts)
        if self.creds is not None and facts.hostname != self.creds.hostname:
            facts = facts.with_hostname(self.creds.hostname)  # the enrolled name is authoritative
        resp = await stub.ReportFacts(wire.report_facts_request(facts), timeout=RPC_TIMEOUT)
        self.registered.set()
        if resp.changed:
            log.info("facts reported; changed: %s", ", ".join(resp.changed))
        return list(resp.changed)

    async def _heartbeats(self, stub: pb_grpc.AgentServiceAsyncStub) -> None:
        while True:
            self.sequence += 1
            running = next(iter(self._jobs), "")
            resp = await stub.Heartbeat(pb.HeartbeatRequest(sequence=self.sequence, running_job_id=running),
                                        timeout=RPC_TIMEOUT)
            self.heartbeats += 1
            self.interval = float(resp.interval_seconds or 10)
            # reported beside the heartbeats, never in their way: a slow controller database delays the
            # report (retried on the next beat until it lands), not the heartbeats that keep the node online
            if (resp.facts_requested or self._facts_due) and (self._facts_task is None or self._facts_task.done()):
                self._facts_due = False
                self._facts_task = asyncio.create_task(self._requested_facts(stub))
            await asyncio.sleep(self.interval)

    async def _requested_facts(self, stub: pb_grpc.AgentServiceAsyncStub) -> None:
        try:
            await self.report_facts(stub)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FATAL_CODES:
                raise
            self._facts_due = True
            log.warning("facts report failed (%s); retrying on the next heartbeat", rpc_error(exc, "facts").message)

    async def _job_stream(self, stub: pb_grpc.AgentServiceAsyncStub) -> None:
        call = stub.Jobs(wire.jobs_request(self._held))
        async for msg in call:
            if msg.job_id in self._seen_jobs:
                continue
            self._seen_jobs.add(msg.job_id)
            try:
                spec = wire.job_from_proto(msg)
            except FleetError as exc:
                log.error("bad job from controller: %s", exc.message)
                continue
            self._held.add(spec.job_id)  # at once, not when the task starts: the next stream must name it
            self._spawn(self._run_job(spec))
        raise ControllerUnavailable("jobs stream ended by the controller", hint="reconnecting")

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- jobs --------------------------------------------------------------------------

    def held_job_ids(self) -> list[str]:
        """Jobs this process holds: received, result not acknowledged by the controller yet."""
        return sorted(self._held)

    async def _run_job(self, spec: JobSpec) -> None:
        try:
            await self._run_held_job(spec)
        finally:
            self._held.discard(spec.job_id)

    async def _run_held_job(self, spec: JobSpec) -> None:
        job = _RunningJob(spec, asyncio.Queue())
        self._jobs[spec.job_id] = job
        sender = asyncio.create_task(self._send_events(job))

        limit = self.cfg.event_queue_size

        def emit(event: Mapping[str, Any], force: bool = False) -> None:
            # never blocks: beyond `limit` queued events, drop and count (the queue itself is unbounded so
            # that our own start/finish events and the end marker always fit)
            if not force and job.queue.qsize() >= limit:
                job.dropped += 1
                return
            job.counter += 1
            job.queue.put_nowait(wire.event_to_proto(spec.job_id, job.counter, event))

        log.info("job %s (%s) started", spec.job_id, spec.kind)
        emit({"event": "fleet_job_started", "event_data": {"kind": spec.kind}}, force=True)
        try:
            outcome = await self._run_until_stopping(spec, emit)
        except TimeoutError:
            outcome = JobOutcome(spec.job_id, JobStatus.TIMEOUT, rc=124,
                                 error=f"job exceeded its timeout of {spec.timeout_s:g}s")
        except asyncio.CancelledError:
            if not cut_off():
                sender.cancel()
                raise
            log.warning("job %s: a call to the controller was cut off mid-job", spec.job_id)
            outcome = JobOutcome(spec.job_id, JobStatus.FAILED, rc=70,
                                 error="executor error: a call to the controller was cut "
                                 "off (the connection was lost) while the job needed it; run the job again")
        except Exception as exc:
            log.exception("job %s: runner crashed", spec.job_id)
            outcome = JobOutcome(spec.job_id, JobStatus.FAILED, rc=70,
                                 error=f"executor error: {exc.__class__.__name__}: {exc}")
        if job.dropped:
            outcome.result.setdefault("events_dropped", job.dropped)
        emit({"event": "fleet_job_finished",
              "event_data": {"status": outcome.status, "rc": outcome.rc, "events_dropped": job.dropped}}, force=True)
        job.queue.put_nowait(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sender), timeout=30)
        sender.cancel()
        await self._complete(spec.job_id, outcome)
        del self._jobs[spec.job_id]
        log.info("job %s finished: %s", spec.job_id, outcome.status)

    async def _run_until_stopping(self, spec: JobSpec, emit: Callable[[dict[str, Any]], None]) -> JobOutcome:
        """The runner's outcome; ``TimeoutError`` past the job's timeout. When the agent stops, the runner is
        canceled (the executor kills the playbook) and the job's outcome is ``canceled``, saying why."""
        runner = asyncio.ensure_future(self.cfg.runner.run(spec, emit))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({runner, stopping}, timeout=spec.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            raise
        finally:
            stopping.cancel()
        if runner.done():
            return runner.result()  # its exception (or a cut-off CancelledError) goes to the caller
        runner.cancel()
        await asyncio.wait({runner}, timeout=self.cfg.stop_grace / 2)
        if not self._stopping.is_set():
            raise TimeoutError
        log.warning("job %s canceled: the agent is stopping", spec.job_id)
        return JobOutcome(spec.job_id, JobStatus.CANCELED, rc=143,
                          error="canceled: the agent was stopped (SIGTERM/SIGINT) while the job ran; its processes "
                                "were killed; run the job again")

    async def _stub_ready(self) -> pb_grpc.AgentServiceAsyncStub:
        while True:
            await self._connected.wait()
            if self._stub is not None:
                return self._stub

    async def _send_events(self, job: _RunningJob) -> None:
        done = False
        while not done:
            first = await job.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < EVENT_BATCH and not job.queue.empty():
                item = job.queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
            delay = self.cfg.backoff_initial
            while True:
                stub = await self._stub_ready()
                try:
                    await stub.ReportJobEvents(iter(batch), timeout=RPC_TIMEOUT)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                        log.error("job %s: events refused: %s", job.spec.job_id, exc.details())
                        break
                except asyncio.CancelledError:
                    if not cut_off():
                        raise
                    # the session ended mid-call (channel closed): send again on the next one
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.backoff_max)

    async def _complete(self, job_id: str, outcome: JobOutcome) -> None:
        """Deliver the result; retried across sessions until the controller acknowledges (or refuses) it."""
        delay = self.cfg.backoff_initial
        msg = wire.result_to_proto(job_id, outcome)
        while True:
            stub = await self._stub_ready()
            try:
                await stub.CompleteJob(msg, timeout=RPC_TIMEOUT)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  *FATAL_CODES):
                    log.error("job %s: result refused: %s", job_id, exc.details())
                    return
            except asyncio.CancelledError:
                if not cut_off():
                    raise
                # the session ended mid-call (channel closed): send again on the next one (a result the
                # controller already recorded is acknowledged and ignored there)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.backoff_max)

    # ---- artifacts ---------------------------------------------------------------------

    async def fetch_artifact(self, sha256: str, dest_dir: Path) -> Path:
        """Download an artifact into ``dest_dir`` (verifying its sha256); returns the file's path."""
        import hashlib

        stub = await self._stub_ready()
        digest = hashlib.sha256()
        tmp = dest_dir / f".{sha256}.part"
        dest_dir.mkdir(parents=True, exist_ok=True)
        name = None
        try:
            with tmp.open("wb") as f:
                async for chunk in stub.FetchArtifact(pb.FetchArtifactRequest(sha256=sha256)):
                    if name is None:
                        name = chunk.filename
                    digest.update(chunk.data)
                    f.write(chunk.data)
        except grpc.aio.AioRpcError as exc:
            tmp.unlink(missing_ok=True)
            raise rpc_error(exc, f"fetching artifact {sha256}") from exc
        if digest.hexdigest() != sha256 or not name or "/" in name:
            tmp.unlink(missing_ok=True)
            raise InputError(f"artifact {sha256} arrived corrupted", hint="fetch it again")
        final = dest_dir / str(name)
        tmp.replace(final)
        return final

    async def upload_artifact(self, path: Path, kind: str = "other", *, retry_for: float | None = None,
                              on_retry: Callable[[str, float], object] | None = None, job_id: str = "") -> str:
        """Upload a file to the controller's artifact store; returns its sha256 as the controller computed it.

        Resumable and retried (controller/uploads.py has the protocol): ``QueryUpload`` says how much of the
        file the controller already holds from a cut-off attempt, the stream continues from there, every
        chunk carrying its offset and the running CRC-32. Lost connections, controller restarts, a full
        disk or a database error on the controller are retried with backoff for up to ``retry_for``
        seconds (default ``AgentConfig.upload_retry_s``), each retry reported to ``on_retry(reason, delay)``;
        a refusal (bad name, size limit, digest mismatch, identity refused) ends it at once. ``job_id``: the
        build-from-source job whose output this is — the controller accepts no other upload from an agent
        (controller/build_uploads.py; a refusal is ``ForbiddenError``).
        """
        sha, size = await asyncio.to_thread(_digest_and_size, path)
        budget = self.cfg.upload_retry_s if retry_for is None else max(0.0, retry_for)
        deadline = time.monotonic() + budget
        delay = self.cfg.backoff_initial
        attempts = 0
        while True:
            attempts += 1
            try:
                stub = await asyncio.wait_for(self._stub_ready(), max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                raise ControllerUnavailable(
                    f"uploading {path.name}: no connection to the controller within {budget:.0f}s "
                    f"({attempts - 1} attempt(s))",
                    hint="check that the controller is running and reachable; the file stays on this node") from None
            try:
                query = await stub.QueryUpload(pb.QueryUploadRequest(sha256=sha, size=size, filename=path.name,
                                                                     kind=kind), timeout=RPC_TIMEOUT)
                if query.stored:
                    return sha
                if query.offset:
                    log.info("upload of %s continues at byte %d of %d (held by the controller)", path.name,
                             query.offset, size)
                resp = await stub.UploadArtifact(self._upload_stream(path, sha, size, kind, query.offset, job_id),
                                                 timeout=UPLOAD_STREAM_TIMEOUT)
                return str(resp.sha256)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:  # not this agent's to upload: not an auth loss
                    raise ForbiddenError(f"uploading {path.name}: {exc.details()}",
                                         hint="agents upload only their assigned build job's wheel") from exc
                if exc.code() not in UPLOAD_RETRY_CODES:
                    raise rpc_error(exc, f"uploading {path.name}") from exc
                reason = f"{exc.code().name}: {exc.details() or 'no details'}"
            except asyncio.CancelledError:
                if not cut_off():
                    raise
                reason = "the connection to the controller was lost mid-upload"
            wait = delay * (0.8 + 0.4 * random.random())
            if time.monotonic() + wait > deadline:
                raise ControllerUnavailable(
                    f"uploading {path.name} ({size} bytes) failed {attempts} time(s) over {budget:.0f}s; "
                    f"last: {reason}",
                    hint="the file stays on this node; fix the controller (see the reason), then run the job again")
            log.warning("uploading %s: %s; retrying in %.1fs", path.name, reason, wait)
            if on_retry is not None:
                on_retry(reason, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.cfg.backoff_max)

    async def _upload_stream(self, path: Path, sha256: str, size: int, kind: str,
                             offset: int, job_id: str = "") -> AsyncIterator[pb.ArtifactChunk]:
        """The file from ``offset`` in chunks; the first carries the file's identity, every one the running CRC."""
        crc = await asyncio.to_thread(_crc32_prefix, path, offset)
        with path.open("rb") as f:
            f.seek(offset)
            pos, first = offset, True
            while True:
                data = f.read(UPLOAD_CHUNK_BYTES)
                if not data and not first:
                    return
                crc = zlib.crc32(data, crc)
                if first:
                    yield pb.ArtifactChunk(filename=path.name, sha256=sha256, size=size, kind=kind, data=data,
                                           offset=pos, crc32=crc, job_id=job_id)
                    first = False
                else:
                    yield pb.ArtifactChunk(data=data, offset=pos, crc32=crc)
                if not data:
                    return
                pos += len(data)


def _digest_and_size(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _crc32_prefix(path: Path, length: int) -> int:
    crc = 0
    with path.open("rb") as f:
        while length > 0:
            block = f.read(min(1 << 22, length))
            if not block:
                raise InputError(f"{path.name} is shorter than the {length} more bytes the controller holds",
                                 hint="the file changed during the upload; run the job again")
            crc = zlib.crc32(block, crc)
            length -= len(block)
    return crc
