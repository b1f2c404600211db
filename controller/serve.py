"""Running the controller: gRPC (agents) and HTTP (API, dashboard) in one asyncio loop.

``start_controller(settings)`` starts everything and returns a ``RunningController``
(``await rc.stop()`` to end it); ``serve(settings)`` runs until SIGINT/SIGTERM. On start
it writes ``STATE/controller.json`` = ``{"grpc", "enroll", "http", "ca"}`` for fleetctl and
agents (docs/architecture.md, "Controller state and discovery").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import grpc.aio
import uvicorn
from fastapi import FastAPI

from controller import web
from controller.api import create_app
from controller.context import ControllerContext, ControllerSettings
from controller.server import housekeeping, start_grpc
from fleet.errors import InputError
from fleet.statedir import state_dir_error

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # the controller handles signals itself
        yield


@dataclass
class RunningController:
    ctx: ControllerContext
    grpc_server: grpc.aio.Server
    http_server: uvicorn.Server
    app: FastAPI
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def discovery_file(self) -> Path:
        return self.ctx.settings.state_dir / "controller.json"

    async def stop(self, grace: float = 1.0) -> None:
        web.close(self.app)  # open dashboard event streams would hold the server ~5 s
        self.http_server.should_exit = True
        for t in self.tasks:
            if t.get_name() != "http":
                t.cancel()
        await self.grpc_server.stop(grace)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), timeout=5)
        # last heartbeat batch
        with contextlib.suppress(Exception):
            self.ctx.registry.flush()
        self.ctx.gc_monitor.uninstall()
        self.ctx.close()


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

    data = {"grpc": reachable(ctx.grpc_address), "enroll": reachable(ctx.enroll_address),
            "http": ctx.http_url, "ca": "ca/ca.pem"}
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise state_dir_error(exc, path, "write") from exc
    return path


async def start_controller(settings: ControllerSettings, ctx: ControllerContext | None = None) -> RunningController:
    ctx = ctx or ControllerContext(settings)
    grpc_server = await start_grpc(ctx)
    sock = _bind(settings.http_listen)
    host, port = sock.getsockname()[:2]
    ctx.http_url = f"http://{host}:{port}"
    app = create_app(ctx)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    http = _Uvicorn(config)
    tasks = [asyncio.create_task(http.serve(sockets=[sock]), name="http"),
             asyncio.create_task(housekeeping(ctx), name="housekeeping"),
             asyncio.create_task(ctx.jobs.run_watchdog(), name="job-watchdog"),
             asyncio.create_task(ctx.loop_lag.run(), name="loop-lag")]
    for _ in range(200):
        if http.started:
            break
        await asyncio.sleep(0.025)
    ctx.gc_monitor.install()
    if settings.gc_tuning:
        ctx.gc_monitor.tune(ctx.registry.node_count)
    write_discovery(ctx)
    log.info("controller up: grpc %s, enroll %s, http %s, db %s", ctx.grpc_address, ctx.enroll_address,
             ctx.http_url, ctx.store.url)
    return RunningController(ctx, grpc_server, http, app, tasks)


async def serve(settings: ControllerSettings) -> None:
    running = await start_controller(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fleet-controller: grpc {running.ctx.grpc_address} (mTLS), enroll {running.ctx.enroll_address}, "
          f"http {running.ctx.http_url}, state {settings.state_dir}", flush=True)
    await stop.wait()
    log.info("stopping")
    await running.stop()
