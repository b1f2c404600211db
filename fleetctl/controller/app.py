"""The composition root: the controller built from one ``ControllerSettings``, its loops run by one owner.

``start_controller(settings)`` builds the parts (``ControllerContext``: store, CA, registry, job dispatcher,
artifact store, rollout engine, verification service), then starts every background loop and server in
dependency order, each as a named part::

    loop-lag → housekeeping → job-watchdog → verification (attach, recover) → verify-scheduler
    → drift-checks → cleanup → webhooks → rollout-engine → grpc (agents) → http (JSON API, dashboard)

and returns a ``RunningController``. Like temporalio's ``Worker._run``, one owner holds every task: the
controller runs until ``first_failure()`` names the first loop that ended (they all run for the life of the
process, so any end is a failure) or until SIGINT/SIGTERM, then ``stop()`` stops the parts in reverse order —
the doors first (no new requests), the parts they feed after, the store last. If a part fails to start, the
parts already started are stopped the same way before the error is raised. No FastAPI lifespan and no router
starts anything.

Once up, it writes ``STATE/controller.json`` = ``{"grpc", "enroll", "http", "ca"}`` for fleetctl and agents
(docs/architecture.md, "Controller state and discovery"). ``serve(settings)`` is ``fleet-controller serve``:
it returns the process's exit status (1 when a loop failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import uvicorn
from fastapi import FastAPI

from fleetctl.controller import web
from fleetctl.controller.api import create_app
from fleetctl.controller.cleanup import Cleanup
from fleetctl.controller.context import ControllerContext
from fleetctl.controller.leases import Held, LeaderDuty
from fleetctl.controller.rollout_traces import RolloutTraces, tracer_provider
from fleetctl.controller.server import housekeeping, start_grpc
from fleetctl.controller.settings import ControllerSettings
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.statedir import state_dir_error

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 6.0  # a part that has not stopped by then is cancelled (the rollout engine's own wait is 5 s)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # the controller handles signals itself
        yield


async def _nothing() -> None:
    return None


@dataclass
class Part:
    """One started part: its loop (None for a part that only needs stopping) and how to ask it to stop."""

    name: str
    task: asyncio.Task[Any] | None
    stop: Callable[[], Awaitable[None]] = _nothing


@dataclass(frozen=True)
class LoopEnded:
    """The first loop that ended while the controller was up; ``error`` is None when it returned."""

    name: str
    error: BaseException | None

    def __str__(self) -> str:
        if self.error is None:
            return f"background loop {self.name!r} ended unexpectedly"
        return f"background loop {self.name!r} failed: {type(self.error).__name__}: {self.error}"


class RunningController:
    """The started controller. ``started``/``stopped`` list the parts' names in the order it happened."""

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.parts: list[Part] = []
        self.stopped: list[str] = []
        self.app: FastAPI | None = None
        self.http_server: uvicorn.Server | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.grace = 1.0  # what in-flight RPCs get to finish when the gRPC server stops
        self._stopping = False

    @property
    def started(self) -> list[str]:
        return [p.name for p in self.parts]

    @property
    def discovery_file(self) -> Path:
        return self.ctx.settings.state_dir / "controller.json"

    def run(self, name: str, loop: Coroutine[Any, Any, Any], stop: Callable[[], Awaitable[None]] = _nothing) -> None:
        """Start ``loop`` as the part ``name``: from now on the controller's life depends on it."""
        self.parts.append(Part(name, asyncio.create_task(loop, name=name), stop))

    def started_part(self, name: str, stop: Callable[[], Awaitable[None]]) -> None:
        """A part without a loop of its own (started already) that must be stopped in its turn."""
        self.parts.append(Part(name, None, stop))

    async def first_failure(self) -> LoopEnded:
        """Wait for the first loop to end; every loop runs until ``stop()``, so that is the failure."""
        tasks = {p.task: p.name for p in self.parts if p.task is not None}
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        task = next(iter(done))
        error = None if task.cancelled() else task.exception()
        return LoopEnded(tasks[task], error)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop every part in reverse start order, then write the last heartbeat batch and close the store."""
        if self._stopping:
            return
        self._stopping = True
        self.grace = grace
        for part in reversed(self.parts):
            try:
                await part.stop()
            except Exception:
                log.exception("stopping %s failed; going on with the next part", part.name)
            if part.task is not None:
                await _finish(part.task)
            self.stopped.append(part.name)
        with contextlib.suppress(Exception):
            self.ctx.registry.flush()  # the last heartbeat batch
        self.ctx.gc_monitor.uninstall()
        self.ctx.close()


async def _finish(task: asyncio.Task[Any]) -> None:
    """Let ``task`` end by itself for a moment after its stop request; cancel it if it does not."""
    if not task.done():
        await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.debug("%s ended with %r", task.get_name(), task.exception())


def _cancelling(rc: RunningController, name: str) -> Callable[[], Awaitable[None]]:
    """The stop of a loop that has no stop call of its own: cancel its task."""
    async def stop() -> None:
        for part in rc.parts:
            if part.name == name and part.task is not None:
                part.task.cancel()
    return stop


def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"bad listen address {listen!r}", hint="use HOST:PORT, e.g. 127.0.0.1:7480")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {listen}: {exc.strerror}", hint="pick a free port with --http-listen") \
            from exc
    sock.listen(512)
    sock.setblocking(False)
    return sock


def write_discovery(ctx: ControllerContext) -> Path:
    path = ctx.settings.state_dir / "controller.json"
    def reachable(addr: str | None) -> str | None:  # a wildcard listen address is dialled on loopback
        if addr and addr.rpartition(":")[0] in ("0.0.0.0", "[::]", "::"):
            return "127.0.0.1:" + addr.rpartition(":")[2]
        return addr

    # http_ca: what fleetctl verifies the HTTPS API with (None: plain HTTP, or a user-supplied certificate, which
    # chains to a CA the client knows: --ca or the system's trust store)
    issued_here = not (ctx.settings.http_insecure or ctx.settings.http_cert)
    data = {"grpc": reachable(ctx.grpc_address), "enroll": reachable(ctx.enroll_address),
            "http": ctx.http_url, "ca": "ca/ca.pem", "http_ca": "ca/ca.pem" if issued_here else None}
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise state_dir_error(exc, path, "write") from exc
    return path


def http_tls(ctx: ControllerContext, http_host: str) -> tuple[Path, Path] | None:
    """(certificate, key) files of the HTTP API and dashboard: the user's (checked to load here,
    so that a bad file stops the start with its name rather than a dead server task), else the server certificate
    of the controller's CA, covering the gRPC and HTTP listen hosts and --san names; none for --http-insecure."""
    s = ctx.settings
    if s.http_insecure:
        log.warning("the HTTP API and dashboard serve PLAIN HTTP (--http-insecure): bearer tokens, API tokens and "
                    "dashboard passwords cross the network in clear; use it only on loopback or behind a TLS proxy")
        return None
    if s.http_cert is not None and s.http_key is not None:
        cert, key = s.http_cert, s.http_key
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise InputError(f"cannot serve HTTPS with certificate {cert} and key {key}: "
                             f"{getattr(exc, 'strerror', None) or exc}",
                             hint="give a readable PEM certificate (chain) and its own private key with --http-cert/"
                                  "--http-key (http_cert/http_key in the config file), or neither for a certificate "
                                  "from the controller's CA") from exc
        return cert, key
    grpc_host = s.grpc_listen.rpartition(":")[0].strip("[]")
    # the address clients dial too: a wildcard listen host is dialled on loopback (``dialled``)
    ctx.ca.server_credentials([grpc_host, http_host, dialled(http_host).strip("[]"), *s.extra_names])
    return ctx.ca.dir / "server.pem", ctx.ca.dir / "server.key"


def dialled(host: str) -> str:
    """How a client reaches a listen host in a URL: a wildcard on loopback (which the CA's certificate covers),
    an IPv6 address in brackets."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    return f"[{host}]" if ":" in host else host


async def _start_parts(rc: RunningController) -> None:
    ctx, settings = rc.ctx, rc.ctx.settings
    rc.run("loop-lag", ctx.loop_lag.run(), _cancelling(rc, "loop-lag"))
    rc.run("housekeeping", housekeeping(ctx), _cancelling(rc, "housekeeping"))
    rc.run("job-watchdog", ctx.jobs.run_watchdog(), _cancelling(rc, "job-watchdog"))

    verification = ctx.verification.attach()  # records verify jobs as they finish; re-verifies on drift

    async def detach() -> None:
        verification.close()

    rc.started_part("verification", detach)
    await verification.recover()  # records an earlier fault left unrecorded (off the loop, retried)
    if settings.scheduler:
        # one controller of those sharing the database runs the schedules: the holder of a leader lease (docs/ha.md)
        async def run_schedules(_: Held) -> None:
            await verification.run_scheduler(settings.scheduler_tick)

        scheduler = LeaderDuty(ctx.store, "verify-scheduler", run_schedules, holder=ctx.registry.holder,
                               ttl=settings.rollout_lease_ttl)
        rc.run("verify-scheduler", scheduler.run(), scheduler.stop)
    # leader duties of every controller: the one holding each lease runs it (docs/ha.md)
    drift_checks = LeaderDuty(ctx.store, "drift-checks", verification.run_drift_checks, holder=ctx.registry.holder,
                              ttl=settings.rollout_lease_ttl)
    rc.run("drift-checks", drift_checks.run(), drift_checks.stop)
    cleanup = LeaderDuty(ctx.store, "cleanup", Cleanup(ctx.store, settings.cleanup).run, holder=ctx.registry.holder,
                         ttl=settings.rollout_lease_ttl)
    rc.run("cleanup", cleanup.run(), cleanup.stop)

    rc.run("webhooks", ctx.webhooks.run(), ctx.webhooks.stop)  # before the engine: it queues notifications
    engine = ctx.rollout_engine
    rc.run("rollout-engine", engine.run(), engine.stop)
    if settings.otel_endpoint:  # each ended rollout as one trace (controller/rollout_traces.py)
        traces = RolloutTraces(ctx.store, tracer_provider(settings.otel_endpoint))
        rc.run("rollout-traces", traces.run(), _cancelling(rc, "rollout-traces"))

    grpc_server = rc.grpc_server = await start_grpc(ctx)

    async def stop_grpc() -> None:
        await grpc_server.stop(rc.grace)

    rc.run("grpc", grpc_server.wait_for_termination(), stop_grpc)

    sock = _bind(settings.http_listen)
    host, port = sock.getsockname()[:2]
    try:
        tls = http_tls(ctx, host)
    except BaseException:
        sock.close()
        raise
    ctx.http_url = f"{'https' if tls else 'http'}://{dialled(host)}:{port}"
    app = rc.app = create_app(ctx)
    http = rc.http_server = _Uvicorn(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    ssl_certfile=tls[0] if tls else None,
                                                    ssl_keyfile=tls[1] if tls else None))

    async def stop_http() -> None:
        web.close(app)  # open dashboard event streams would hold the server ~5 s
        http.should_exit = True

    rc.run("http", http.serve(sockets=[sock]), stop_http)
    for _ in range(200):
        if http.started or rc.parts[-1].task is None or rc.parts[-1].task.done():
            break
        await asyncio.sleep(0.025)
    if not http.started:
        raise InputError(f"the HTTP server did not start on {settings.http_listen}",
                         hint="see the log line above; pick a free port with --http-listen")


async def start_controller(settings: ControllerSettings, ctx: ControllerContext | None = None) -> RunningController:
    rc = RunningController(ctx or ControllerContext(settings))
    try:
        await _start_parts(rc)
        write_discovery(rc.ctx)
    except BaseException:
        await rc.stop(grace=0)
        raise
    rc.ctx.gc_monitor.install()
    if settings.gc_tuning:
        rc.ctx.gc_monitor.tune(rc.ctx.registry.node_count)
    log.info("controller up: grpc %s, enroll %s, http %s, db %s (started %s)", rc.ctx.grpc_address,
             rc.ctx.enroll_address, rc.ctx.http_url, rc.ctx.store.url, ", ".join(rc.started))
    return rc


async def serve(settings: ControllerSettings) -> int:
    """``fleet-controller serve``: run until SIGINT/SIGTERM (exit status 0) or until a loop fails (1)."""
    # the handlers come first: controller.json is written during the start, and whoever waits for it (a service
    # manager, a test) may send SIGTERM at once; a signal during the start cancels it, and it stops what it started
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    starting = asyncio.create_task(start_controller(settings), name="start")
    signal_wait = asyncio.create_task(signalled.wait(), name="signal during start")
    await asyncio.wait({starting, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    signal_wait.cancel()
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped by a signal during the start")
        return 0
    running = starting.result()
    print(f"fleet-controller: grpc {running.ctx.grpc_address} (mTLS), enroll {running.ctx.enroll_address}, "
          f"http {running.ctx.http_url}, state {settings.state_dir}", flush=True)
    return await run_until_stopped(running, signalled)


async def run_until_stopped(running: RunningController, signalled: asyncio.Event) -> int:
    """Wait for ``signalled`` or the first loop to end, whichever comes first; then stop every part in reverse
    start order. 1 when a loop ended (it is said in one log line, with its traceback), else 0."""
    failure = asyncio.create_task(running.first_failure(), name="first-failure")
    signal_wait = asyncio.create_task(signalled.wait(), name="signal")
    await asyncio.wait({failure, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if failure.done():
        status = 1
        ended = failure.result()
        log.error("%s; stopping the controller (every part in reverse start order)", ended, exc_info=ended.error)
    else:
        log.info("stopping")
    for task in (failure, signal_wait):
        task.cancel()
    await running.stop()
    log.info("stopped: %s", ", ".join(running.stopped))
    return status
