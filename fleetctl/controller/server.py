"""The agent-facing gRPC server (fleet.v1.AgentService) on grpc.aio.

Two listeners share one servicer:

- the agent port (``--grpc-listen``) requires mutual TLS: the client certificate must be
  signed by the controller's CA; its CN is the agent id, mapped to the enrolled identity
  on every call (unknown or revoked identities and stale certificates are refused);
- the enrollment port (``--enroll-listen``, default agent port + 1) is server-TLS only and
  serves ``Enroll`` (gRPC's Python server credentials cannot ask for an optional client
  certificate, so one port cannot serve both).

Every refusal gets a gRPC status with ``<code>: <message> (hint: <hint>)``, is logged,
and changes nothing. Conversions live in controller/wire.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio

from fleetctl.controller import wire
from fleetctl.controller.artifacts import ArtifactWriter, Provenance
from fleetctl.controller.audit import audit
from fleetctl.controller.build_uploads import RefusalAudit, authorize
from fleetctl.controller.ca import cert_identity
from fleetctl.controller.context import ControllerContext
from fleetctl.controller.enrollment import REFRESH_SECONDS, AgentIdentity
from fleetctl.controller.ratelimit import RateLimited, RateLimits, source_address
from fleetctl.controller.registry import HostnameMismatch
from fleetctl.controller.rpc_metrics import RpcMetrics
from fleetctl.controller.uploads import PartialWriter, UploadRestart, is_disk_full, store_full
from fleetctl.fleet.errors import (
    AuthError,
    ConflictError,
    FactsError,
    FleetError,
    ForbiddenError,
    InputError,
    NotFoundError,
    StoreError,
)
from fleetctl.fleet.facts import MAX_FACTS_BYTES
from fleetctl.fleet.v1 import fleet_pb2 as pb
from fleetctl.fleet.v1 import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Largest message either side accepts. Facts are limited to MAX_FACTS_BYTES (checked with a clear
# error); anything much bigger is cut off by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed.
MAX_MESSAGE_BYTES = MAX_FACTS_BYTES + 64 * 1024
ARTIFACT_CHUNK_BYTES = 128 * 1024
EVENT_BATCH = 200

T = TypeVar("T")

@functools.lru_cache(maxsize=16384)
def _cert_serial(pem: bytes) -> str:
    """The serial (hex) of a peer's PEM certificate. Cached by the PEM: every RPC of an agent presents the
    same bytes, and parsing them on each heartbeat would cost more than the rest of the call."""
    try:
        return cert_identity(pem)[1]
    except ValueError:
        return ""  # TLS accepted it, so this does not happen; an empty serial matches no identity


_STATUS: list[tuple[type[FleetError], grpc.StatusCode]] = [
    (HostnameMismatch, grpc.StatusCode.PERMISSION_DENIED),
    (ForbiddenError, grpc.StatusCode.PERMISSION_DENIED),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (FactsError, grpc.StatusCode.INVALID_ARGUMENT),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (UploadRestart, grpc.StatusCode.ABORTED),
    (RateLimited, grpc.StatusCode.UNAVAILABLE),  # agents retry enrollment with backoff
]


def status_for(exc: FleetError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self._upload_refusals = RefusalAudit(self._audit_upload_refusal)
        # Enroll is reachable without credentials: a bucket per source address and a global one (ratelimit.py)
        self.enroll_limits = RateLimits(ctx.settings.enroll_per_source, ctx.settings.enroll_overall)

    # ---- helpers -------------------------------------------------------------------------

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str, exc: FleetError,
                    who: str = "") -> NoReturn:
        code = status_for(exc)
        log.warning("%s refused for %s (%s): %s: %s", rpc, who or context.peer(), code.name, exc.code, exc.message)
        detail = f"{exc.code}: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "")
        await context.abort(code, detail)
        raise AssertionError("unreachable")  # abort raises

    def _peer_identity(self, context: grpc.aio.ServicerContext[Any, Any]) -> AgentIdentity:
        # The TLS layer has verified the client certificate against our CA; its CN is the agent id. The CN
        # alone is not enough: a certificate the CA issued earlier (or by mistake) with the same CN must not
        # pass once the identity holds another one, so the serial must be the identity's current one
        # (docs/fleet.md, "Transport security and enrollment"; docs/security.md, "State and identity hygiene").
        ids = context.peer_identities()
        if not ids:
            raise AuthError("no client certificate", hint="agents enroll first (Enroll on the enrollment port), "
                            "then call with their certificate on the agent port")
        pems = list(context.auth_context().get("x509_pem_cert") or ())
        serial = _cert_serial(pems[0]) if pems else ""
        return self.ctx.enrollment.identities.authenticate(next(iter(ids)).decode("utf-8", "replace"), serial)

    async def _authed(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> AgentIdentity:
        try:
            ids = list(context.peer_identities() or ())
            pems = list(context.auth_context().get("x509_pem_cert") or ())
            known = bool(ids and pems) and self.ctx.enrollment.identities.knows(
                ids[0].decode("utf-8", "replace"), _cert_serial(pems[0]))
            if known:  # the common case (every heartbeat): memory only, the database is not asked
                return self._peer_identity(context)
            return await self.ctx.store.call(self._peer_identity, context)
        except FleetError as exc:
            if not isinstance(exc, StoreError):
                await self.ctx.store.call(self._audit_refusal, context.peer(), rpc, exc)
            await self._fail(context, rpc, exc)

    def _audit_refusal(self, peer: str, rpc: str, exc: FleetError) -> None:
        try:
            audit(self.ctx.store, f"peer:{peer}", "rpc.refused", rpc, level=logging.DEBUG,
                  reason=exc.message)
        except StoreError:
            log.exception("could not write the audit log")

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str, who: str,
                    fn: Callable[[], T]) -> T:
        """Run blocking ``fn`` (database work) on the store's thread pool: the event loop, and with it every
        heartbeat and ``/live``, never waits on the database."""
        try:
            return await self.ctx.store.call(fn)
        except FleetError as exc:
            await self._fail(context, rpc, exc, who)

    async def _acall(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str, who: str,
                     coro: Awaitable[T]) -> T:
        """Await ``coro`` (which does its own database work off the loop); FleetErrors become gRPC statuses."""
        try:
            return await coro
        except FleetError as exc:
            await self._fail(context, rpc, exc, who)

    # ---- RPCs --------------------------------------------------------------------------

    async def Enroll(self, request: pb.EnrollRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.EnrollResponse:
        peer = context.peer()
        source = source_address(peer)
        wait = self.enroll_limits.take(source)
        if wait:
            # refused before any work; not logged one by one (a flood would fill the log instead)
            log.debug("Enroll rate-limited for %s", peer)
            exc = RateLimited(f"too many enrollment attempts from {source} or overall; retry in {wait:.1f}s",
                              hint="agents retry by themselves with backoff; many agents enrolling at once "
                                   "get through at the documented rate (docs/security.md, Abuse limits)")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc.code}: {exc.message} (hint: {exc.hint})")
            raise AssertionError("unreachable")
        result = await self._call(context, "Enroll", peer, lambda: self.ctx.enrollment.enroll(
            request.token, request.hostname, request.csr_pem, peer, request.pending_secret))
        if result.pending:
            log.info("enrollment of %s (agent %s) from %s waits for approval", result.hostname, result.agent_id, peer)
        else:
            log.info("enrolled %s as agent %s from %s", result.hostname, result.agent_id, peer)
        return wire.enroll_response(result)

    async def RenewCertificate(self, request: pb.RenewCertificateRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> pb.RenewCertificateResponse:
        ident = await self._authed(context, "RenewCertificate")
        issued = await self._call(context, "RenewCertificate", ident.hostname,
                                  lambda: self.ctx.enrollment.renew(ident, request.csr_pem))
        log.info("renewed the certificate of %s (agent %s) until %s", ident.hostname, ident.agent_id,
                 issued.not_after.isoformat(timespec="seconds"))
        return wire.renew_response(issued, self.ctx.ca.ca_pem)

    async def ReportFacts(self, request: pb.ReportFactsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.ReportFactsResponse:
        ident = await self._authed(context, "ReportFacts")

        async def run() -> list[str]:
            if not request.HasField("facts"):
                raise FactsError("no facts in the request", hint="send ReportFactsRequest.facts")
            facts, simulated = wire.facts_from_proto(request.facts)
            return await self.ctx.registry.report_facts_async(ident, facts, simulated=simulated,
                                                              agent_version=wire.agent_version_from_proto(request))

        changed = await self._acall(context, "ReportFacts", ident.hostname, run())
        return pb.ReportFactsResponse(changed=changed)

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.HeartbeatResponse:
        ident = await self._authed(context, "Heartbeat")
        try:
            interval, wanted = self.ctx.registry.heartbeat(ident)
        except NotFoundError as exc:
            log.warning("Heartbeat refused for %s: %s", ident.hostname, exc.message)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{exc.code}: {exc.message} (hint: {exc.hint})")
            raise AssertionError("unreachable") from exc
        return wire.heartbeat_response(interval, wanted)

    async def Jobs(self, request: pb.JobsRequest,
                   context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.Job]:
        ident = await self._authed(context, "Jobs")
        held = wire.held_jobs_from_proto(request)
        log.info("jobs stream open for %s (holding %s)", ident.hostname,
                 "?" if held is None else (", ".join(sorted(held)) or "no jobs"))
        try:
            async for spec in self.ctx.jobs.stream_for(ident.hostname, held):
                yield wire.job_to_proto(spec)
        finally:
            log.info("jobs stream closed for %s", ident.hostname)

    async def ReportJobEvents(self, request_iterator: AsyncIterator[pb.JobEvent],
                              context: grpc.aio.ServicerContext[Any, Any]) -> pb.JobEventsAck:
        ident = await self._authed(context, "ReportJobEvents")
        received = 0
        batch: list[pb.JobEvent] = []

        async def flush() -> None:
            events = [wire.event_from_proto(m) for m in batch]
            await self.ctx.jobs.record_events_async(ident.hostname, events)
            batch.clear()

        async for msg in request_iterator:
            batch.append(msg)
            received += 1
            if len(batch) >= EVENT_BATCH:
                await self._acall(context, "ReportJobEvents", ident.hostname, flush())
        if batch:
            await self._acall(context, "ReportJobEvents", ident.hostname, flush())
        return pb.JobEventsAck(received=received)

    async def CompleteJob(self, request: pb.JobResult,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.JobResultAck:
        ident = await self._authed(context, "CompleteJob")
        async def run() -> None:
            await self.ctx.jobs.complete_async(ident.hostname, wire.outcome_from_proto(request))

        await self._acall(context, "CompleteJob", ident.hostname, run())
        return pb.JobResultAck()

    async def FetchArtifact(self, request: pb.FetchArtifactRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.ArtifactChunk]:
        ident = await self._authed(context, "FetchArtifact")
        info = await self._call(context, "FetchArtifact", ident.hostname,
                                lambda: self.ctx.artifacts.get(request.sha256))
        first = True
        for data in self.ctx.artifacts.iter_chunks(info.sha256, ARTIFACT_CHUNK_BYTES):
            if first:
                yield pb.ArtifactChunk(filename=info.filename, sha256=info.sha256, size=info.size, kind=info.kind,
                                       data=data)
                first = False
            else:
                yield pb.ArtifactChunk(data=data)
        if first:  # empty file
            yield pb.ArtifactChunk(filename=info.filename, sha256=info.sha256, size=0, kind=info.kind)

    async def UploadArtifact(self, request_iterator: AsyncIterator[pb.ArtifactChunk],
                             context: grpc.aio.ServicerContext[Any, Any]) -> pb.UploadArtifactResponse:
        ident = await self._authed(context, "UploadArtifact")
        writer: ArtifactWriter | None = None
        try:
            async for chunk in request_iterator:
                if writer is None:  # the first chunk: is this agent's build job asking for this file?
                    provenance = await self._authorize_upload(ident, chunk, context)
                if writer is None and chunk.HasField("crc32"):  # a resumable upload (controller/uploads.py)
                    return await self._upload_resumable(ident, chunk, request_iterator, context, provenance)
                if writer is None:
                    writer = self.ctx.artifacts.writer(chunk.filename, chunk.kind or "other", provenance=provenance,
                                                       expected_sha256=chunk.sha256 or None,
                                                       expected_size=chunk.size or None)
                writer.write(chunk.data)
            if writer is None:
                raise InputError("empty upload", hint="send at least one chunk with filename and data")
            info = writer.commit()
        except FleetError as exc:
            if writer is not None:
                writer.abort()
            await self._fail(context, "UploadArtifact", exc, ident.hostname)
        except OSError as exc:
            if writer is not None:
                writer.abort()  # a full disk gets its space back at once
            if not is_disk_full(exc):
                raise
            await self._fail(context, "UploadArtifact", store_full(self.ctx.artifacts.root, 0, exc), ident.hostname)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        log.info("artifact %s (%s, %d bytes) uploaded by %s", info.sha256, info.filename, info.size, ident.hostname)
        return pb.UploadArtifactResponse(sha256=info.sha256, size=info.size)

    async def _authorize_upload(self, ident: AgentIdentity, first: pb.ArtifactChunk,
                                context: grpc.aio.ServicerContext[Any, Any]) -> Provenance:
        """The provenance of this upload: the output of the agent's own running build job
        (controller/build_uploads.py). Anything else is PERMISSION_DENIED, before a byte is stored, audited
        once per agent per minute with a count (a flood of refused uploads cannot fill the audit log)."""
        try:
            return await asyncio.to_thread(authorize, self.ctx.jobs, self.ctx.artifacts, hostname=ident.hostname,
                                           job_id=first.job_id, filename=first.filename, kind=first.kind or "other",
                                           sha256=first.sha256)
        except ForbiddenError as exc:
            await asyncio.to_thread(self._upload_refusals.refused, f"agent:{ident.agent_id}", ident.hostname,
                                    exc.message)
            await self._fail(context, "UploadArtifact", exc, ident.hostname)

    def _audit_upload_refusal(self, actor: str, target: str, detail: dict[str, Any]) -> None:
        try:
            audit(self.ctx.store, actor, "artifact.upload.refused", target, level=logging.WARNING, **detail)
        except StoreError:
            log.exception("could not write the audit log")

    async def _upload_resumable(self, ident: AgentIdentity, first: pb.ArtifactChunk,
                                rest: AsyncIterator[pb.ArtifactChunk],
                                context: grpc.aio.ServicerContext[Any, Any],
                                provenance: Provenance) -> pb.UploadArtifactResponse:
        """Append to this agent's partial file of the artifact; kept when the stream is cut (controller/uploads.py)."""
        writer: PartialWriter | None = None
        try:
            # reading the held prefix back (sha256 + CRC, up to the whole file) is disk work: not on the loop
            writer = await asyncio.to_thread(self.ctx.uploads.open, ident.agent_id, first.sha256, first.size,
                                             first.filename, first.kind or "other", first.offset,
                                             provenance=provenance)
            if writer.started_at:
                log.info("upload of %s by %s resumed at byte %d of %d", writer.filename, ident.hostname,
                         writer.started_at, writer.size)
            writer.write(first.data, first.offset, first.crc32)
            async for chunk in rest:
                writer.write(chunk.data, chunk.offset, chunk.crc32 if chunk.HasField("crc32") else None)
            info = await asyncio.to_thread(writer.commit)
        except FleetError as exc:
            await self._fail(context, "UploadArtifact", exc, ident.hostname)
        finally:
            if writer is not None:
                writer.close()  # keeps what arrived (a no-op after commit or discard)
        log.info("artifact %s (%s, %d bytes) uploaded by %s%s", info.sha256, info.filename, info.size,
                 ident.hostname, f" (resumed at byte {writer.started_at})" if writer.started_at else "")
        return pb.UploadArtifactResponse(sha256=info.sha256, size=info.size)

    async def QueryUpload(self, request: pb.QueryUploadRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.QueryUploadResponse:
        ident = await self._authed(context, "QueryUpload")
        offset, stored = await self._call(context, "QueryUpload", ident.hostname, lambda: self.ctx.uploads.query(
            ident.agent_id, request.sha256, request.size, request.filename, request.kind or "other"))
        return pb.QueryUploadResponse(offset=offset, stored=stored)


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"bad listen address {listen!r}", hint="use HOST:PORT, e.g. 127.0.0.1:7443")
    return host.strip("[]"), int(port)


async def start_grpc(ctx: ControllerContext) -> grpc.aio.Server:
    """Start the gRPC server on the agent and enrollment ports; fills ctx.grpc_address / enroll_address."""
    s = ctx.settings
    host, port = _split(s.grpc_listen)
    names = [host, *s.extra_names]
    key, cert = ctx.ca.server_credentials(names)
    server = grpc.aio.server(options=server_options(), interceptors=[RpcMetrics()])
    pb_grpc.add_AgentServiceServicer_to_server(AgentService(ctx), server)
    mtls = grpc.ssl_server_credentials([(key, cert)], root_certificates=ctx.ca.ca_pem, require_client_auth=True)
    tls = grpc.ssl_server_credentials([(key, cert)])
    try:
        bound = server.add_secure_port(f"{host}:{port}", mtls)
        if s.enroll_listen:
            ehost, eport = _split(s.enroll_listen)
        else:
            ehost, eport = host, (bound + 1 if port else 0)
        ebound = server.add_secure_port(f"{ehost}:{eport}", tls)
    except RuntimeError as exc:
        raise InputError(f"cannot listen on {s.grpc_listen} / {s.enroll_listen or 'next port'}: {exc}",
                         hint="pick free ports with --grpc-listen / --enroll-listen") from exc
    await server.start()
    ctx.grpc_address = f"{host}:{bound}"
    ctx.enroll_address = f"{ehost}:{ebound}"
    log.info("gRPC agent port %s (mTLS), enrollment port %s (TLS)", ctx.grpc_address, ctx.enroll_address)
    return server


async def housekeeping(ctx: ControllerContext) -> None:
    """Background loop: liveness rounds (flush heartbeat batches, detect offline nodes), refresh revocations.

    Offline is decided in the database, from the agent-session leases every controller renews with its
    heartbeat batches (controller/registry.py): each round writes this controller's batch first, then turns
    offline the nodes whose lease expired. Rounds and the identity refresh run as their own tasks on the
    store's thread pool; a blocked or failing database delays a round (its batch is put back and written by a
    later one) and turns no node offline meanwhile. If the loop itself was held up (the tick came late), the
    registry is told, so that nodes are not blamed for the controller's own stall."""
    s = ctx.settings
    period = min(s.flush_interval, max(0.2, s.heartbeat_interval / 2))
    loop = asyncio.get_running_loop()
    last_flush = last_refresh = 0.0
    flusher: asyncio.Task[None] | None = None
    refresher: asyncio.Task[None] | None = None
    flush_state = _FlushState()
    ctx.enrollment.identities.refresh_in_background = True
    expected = loop.time() + period
    try:
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            late, expected = now - expected, now + period
            try:
                if late > max(1.0, ctx.registry.offline_after / 2):
                    ctx.registry.stalled(late)
                ctx.gc_monitor.after_tick(ctx.registry.node_count)
                if (flusher is None or flusher.done()) and (now - last_flush >= s.flush_interval
                                                            or ctx.registry._pending):
                    flusher = asyncio.create_task(_flush(ctx, flush_state), name="liveness-flush")
                    last_flush = now
                if (refresher is None or refresher.done()) and now - last_refresh >= REFRESH_SECONDS:
                    refresher = asyncio.create_task(_refresh_identities(ctx), name="identity-refresh")
                    last_refresh = now
            except FleetError as exc:
                log.error("housekeeping: %s", exc.message)
            except Exception:
                log.exception("housekeeping failed")
    finally:
        # owned here, ended here; what the flush had taken is put back by it and written by RunningController.stop
        for task in (flusher, refresher):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (flusher, refresher) if t is not None), return_exceptions=True)


class _FlushState:
    def __init__(self) -> None:
        self.failing_since: float | None = None


async def _flush(ctx: ControllerContext, state: _FlushState) -> None:
    """One liveness round off the event loop (``Registry.sweep``'s steps): write pending status changes, then the
    last_seen batch with its session leases, then judge expired leases and take the stored statuses in; on
    failure put back what was not written (the next round retries it) and say so once per outage, not every
    tick."""
    reg = ctx.registry
    since = reg.changes
    transitions, batch = reg.take_transitions(), reg.take_dirty()
    try:
        await ctx.store.call(reg.write_transitions, transitions)
        transitions = []
        await ctx.store.call(reg.write_last_seen, batch)
        batch = []
        reg.apply(await ctx.store.call(reg.judge, expire=reg.may_expire(), hearing=reg.hearing()), since)
    except Exception as exc:
        reg.requeue(transitions, batch)
        if state.failing_since is None:
            state.failing_since = time.monotonic()
            log.error("liveness flush failed (%s); nodes stay as heartbeats say, the batch is kept and retried; "
                      "check the database (`/api/v1/health`)", getattr(exc, "message", exc))
        return
    if state.failing_since is not None:
        log.warning("liveness flush recovered after %.1fs of database failures",
                    time.monotonic() - state.failing_since)
        state.failing_since = None


async def _refresh_identities(ctx: ControllerContext) -> None:
    try:
        await ctx.store.call(ctx.enrollment.identities.refresh)
    except FleetError as exc:  # revocations made here apply in memory at once; another controller's wait
        log.warning("revoked identities not refreshed (%s); retrying", exc.message)
