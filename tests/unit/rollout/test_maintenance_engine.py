"""The maintenance policy in the engine (real store, registry, verify_store; fake agents at the dispatcher seam) and
the webhook sender against a real loopback HTTP server: --max-unavailable counts a node degraded by its
verification health, and an unreachable webhook is retried, counted and never holds anything up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fleetctl.agent.profiles import load_profile
from fleetctl.controller.labels import parse_label_changes
from fleetctl.controller.rollout.models import Rollout
from fleetctl.controller.rollout.service import RolloutRequest
from fleetctl.controller.store import utcnow
from fleetctl.controller.testing import FakeFleet
from fleetctl.controller.verify_store.models import NodeVerifyState
from fleetctl.controller.webhooks import NOTIFICATION_RETRIES, NOTIFICATIONS, WebhookSender
from fleetctl.fleet.errors import UsageError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FakeFleet]:
    f = FakeFleet.create(tmp_path / "controller", engine_tick=0.05, job_seconds=0.05)
    await f.add_nodes(load_profile("a100", h) for h in ("a100-1", "a100-2", "a100-3"))
    yield f
    await f.close()


async def test_a_node_degraded_by_verification_counts_and_is_worked_on_first(fleet: FakeFleet) -> None:
    with fleet.ctx.store.session() as s:  # verify_store's verdict: a100-3's last verification failed
        s.add(NodeVerifyState(hostname="a100-3", degraded=True, since=utcnow(), reason="verification failed",
                              diagnosis=[], updated_at=utcnow()))
    rid = await fleet.start_rollout(RolloutRequest(nodes="a100-*", canary=0, batch="100%", max_unavailable="1"))
    await fleet.start_engine()
    st = await fleet.wait_rollout(rid, until=lambda st: bool(st["waiting"]))
    assert st["waiting"] == ("waiting: 1 of 3 nodes unavailable (0 offline, 1 degraded, 0 in a step); "
                             "--max-unavailable 1 allows 1")
    st = await fleet.wait_rollout(rid, "succeeded")
    started = [t["hostname"] for t in st["transitions"] if t["from"] == "planned"]
    assert started[0] == "a100-3"  # already unavailable: fixing it takes nothing more out of service
    assert st["waiting"] is None and st["hold"] is None


async def test_a_node_labelled_opt_out_is_skipped_and_listed(fleet: FakeFleet) -> None:
    fleet.ctx.registry.set_labels("a100-2", parse_label_changes(["fleetctl.io/opt-out=true"]), "admin")
    fleet.ctx.registry.set_labels("a100-3", parse_label_changes(["fleetctl.io/opt-out=false"]), "admin")
    rid = await fleet.start_rollout(RolloutRequest(nodes="a100-*", canary=0, batch="100%"))
    await fleet.start_engine()
    st = await fleet.wait_rollout(rid, "succeeded")
    assert st["opted_out"] == ["a100-2"]
    node = next(n for n in st["nodes"] if n["hostname"] == "a100-2")
    assert node["state"] == "skipped" and node["cause"] == "opted-out: the node is labelled fleetctl.io/opt-out=true"
    assert "a100-2" not in {host for host, _ in fleet.job_counts()}  # no job was sent there


async def test_bad_maintenance_options_store_nothing(fleet: FakeFleet) -> None:
    for req, says in ((RolloutRequest(max_unavailable="150%"), "bad --max-unavailable '150%'"),
                      (RolloutRequest(windows=("Sat 02:00",)), "bad --window 'Sat 02:00'"),
                      (RolloutRequest(windows=("Sat 02:00-06:00",), window_zone="Nowhere/Land"), "unknown time zone"),
                      (RolloutRequest(canary=0, pause_after_canary=True), "needs a canary batch"),
                      (RolloutRequest(notify_webhooks=("hooks.example/x",)), "not an http:// or https:// URL")):
        with pytest.raises(UsageError, match=says):
            await fleet.start_rollout(req)
    with fleet.ctx.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Rollout)) == 0


class Receiver:
    def __init__(self, status: int) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ok() -> Iterator[Receiver]:
    r = Receiver(200)
    yield r
    r.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/gone"


def counted(event: str, outcome: str) -> float:
    return float(NOTIFICATIONS.labels(event, outcome)._value.get())


async def test_sender_delivers_retries_gives_up_and_never_blocks(ok: Receiver) -> None:
    sender = WebhookSender(base_url=lambda: "http://controller.example:7480", attempts=3, backoff=0.05, timeout=2)
    task = asyncio.create_task(sender.run())
    failed_before, retries_before = counted("paused", "failed"), float(NOTIFICATION_RETRIES._value.get())
    try:
        started = time.monotonic()
        sender.submit([closed_port_url(), ok.url], {"schema": 1, "event": "paused", "rollout_id": "r-1"})
        assert time.monotonic() - started < 0.05  # submit only queues
        for _ in range(200):
            if ok.bodies and counted("paused", "failed") > failed_before:
                break
            await asyncio.sleep(0.02)
        assert ok.bodies == [{"schema": 1, "event": "paused", "rollout_id": "r-1",
                              "controller_url": "http://controller.example:7480",
                              "rollout_url": "http://controller.example:7480/rollouts/r-1"}]
        assert counted("paused", "failed") == failed_before + 1  # the dead endpoint: every attempt failed
        assert float(NOTIFICATION_RETRIES._value.get()) == retries_before + 2  # 3 attempts = 2 retries
    finally:
        await sender.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
