"""The rollout's maintenance policy end to end: a real controller (gRPC mTLS + HTTP + engine + webhook sender +
SQLite), real agents over sockets with the simulated executor, fleetctl as a process, and a real local HTTP server
that receives the webhook notifications (docs/rollout.md, "Maintenance" and "Notifications")."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from fleetctl.controller.app import RunningController, start_controller
from fleetctl.controller.node_status import NodeStatus
from tests.integration.fleet_support import SimAgents, controller_settings, wait_for
from tests.integration.rollout.simrunner import Script
from tests.integration.rollout.test_rollout_cli import fleetctl, start_fleet

pytestmark = pytest.mark.timeout(300)  # fleetctl runs as a process, on a shared 2-core machine

NODES = [("a100-1", "a100"), ("a100-2", "a100"), ("h100-1", "h100"), ("h100-2", "h100")]


class Hooks:
    """A webhook receiver on a loopback port: every POST's path and JSON body; paths in ``fail_once`` answer 500
    to their first POST (the sender must retry)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.fail_once: set[str] = set()
        self.failed: list[str] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path in hooks.fail_once:
                    hooks.fail_once.discard(self.path)
                    hooks.failed.append(self.path)
                    self.send_response(500)
                    self.end_headers()
                    return
                assert self.headers.get("Content-Type") == "application/json"
                hooks.received.append((self.path, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self, path: str) -> list[str]:
        return [p["event"] for at, p in self.received if at == path]

    def payload(self, path: str, event: str) -> dict[str, Any]:
        return next(p for at, p in self.received if at == path and p["event"] == event)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    h = Hooks()
    try:
        yield h
    finally:
        h.close()


@pytest_asyncio.fixture
async def controller(tmp_path: Path, hooks: Hooks) -> AsyncIterator[RunningController]:
    """The controller with a controller-wide webhook (settings.notify_webhooks)."""
    rc = await start_controller(controller_settings(tmp_path / "controller", notify_webhooks=(f"{hooks.url}/all",)))
    try:
        yield rc
    finally:
        await rc.stop(grace=0.2)


@pytest_asyncio.fixture
async def fleet(controller: RunningController, tmp_path: Path) -> AsyncIterator[SimAgents]:
    agents = SimAgents(controller, tmp_path / "agents")
    try:
        yield agents
    finally:
        await agents.stop_all()


async def status(rc: RunningController, rid: str) -> dict[str, Any]:
    code, out, err = await fleetctl(rc, "rollout", "status", rid, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def test_pause_after_canary_approve_bake_and_webhooks(controller: RunningController, fleet: SimAgents,
                                                            hooks: Hooks, tmp_path: Path) -> None:
    await start_fleet(fleet, Script(), tmp_path, NODES[:3])
    hooks.fail_once.add("/mine")  # the rollout's own webhook fails once: retried with backoff
    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--nodes", "a100-1,a100-2,h100-1",
                                  "--canary", "1", "--batch", "1", "--pause-after-canary", "--bake-time", "2s",
                                  "--notify-webhook", f"{hooks.url}/mine")
    assert rc == 10, out + err  # needs an operator
    assert "awaiting approval: canary batch finished: 1 done, 0 failed" in out, out
    rid = out.split()[1]
    st = await status(controller, rid)
    assert st["status"] == "awaiting-approval" and st["active"]
    assert st["approval"] == {"required": True, "approved_by": None, "approved_at": None}
    assert [n["state"] for n in st["nodes"] if not n["canary"]] == ["planned", "planned"]
    rc, _, err = await fleetctl(controller, "rollout", "resume", rid)
    assert rc == 5 and f"fleetctl rollout approve {rid}" in err

    await wait_for(lambda: hooks.events("/all") == ["awaiting-approval"] and hooks.events("/mine"), timeout=20)
    assert hooks.failed == ["/mine"]  # delivered on the retry
    note = hooks.payload("/all", "awaiting-approval")
    assert note == hooks.payload("/mine", "awaiting-approval")
    assert note["schema"] == 1 and note["rollout_id"] == rid and note["status"] == "awaiting-approval"
    assert note["counts"] == {"total": 3, "done": 1, "failed": 0, "skipped": 0, "active": 2}
    assert note["controller_url"] == controller.ctx.http_url and note["rollout_url"].endswith(f"/rollouts/{rid}")
    assert note["failed_nodes"] == [] and dt.datetime.fromisoformat(note["time"]).tzinfo is not None

    rc, out, err = await fleetctl(controller, "rollout", "approve", rid)  # follows the rollout to its end
    assert rc == 0, out + err
    assert f"rollout {rid}: approve by tester → running" in out
    st = await status(controller, rid)
    assert st["status"] == "succeeded" and st["approval"]["approved_by"] == "admin", st["approval"]
    # bake time: each batch after the canaries started at least 2 s after the batch before it finished
    ends: dict[int, dt.datetime] = {}
    starts: dict[int, dt.datetime] = {}
    batch_of = {n["hostname"]: n["batch"] for n in st["nodes"]}
    for t in st["transitions"]:
        at, b = dt.datetime.fromisoformat(t["at"]), batch_of[t["hostname"]]
        if t["from"] == "planned":
            starts[b] = min(starts.get(b, at), at)
        if t["to"] in ("done", "failed", "skipped"):
            ends[b] = max(ends.get(b, at), at)
    assert sorted(starts) == [0, 1, 2]
    for b in (1, 2):
        assert (starts[b] - ends[b - 1]).total_seconds() >= 2.0, (b, starts, ends)

    rc, out, err = await fleetctl(controller, "rollout", "audit", rid, "--json")
    audit = [(a["actor"], a["action"], a["detail"].get("on_behalf_of")) for a in json.loads(out)["audit"]]
    assert ("engine", "rollout.awaiting-approval", None) in audit and ("admin", "rollout.approve", "tester") in audit
    rc, _, err = await fleetctl(controller, "rollout", "approve", rid)
    assert rc == 5 and "not awaiting approval" in err

    await wait_for(lambda: hooks.events("/all") == ["awaiting-approval", "completed"], timeout=20)
    await wait_for(lambda: hooks.events("/mine") == ["awaiting-approval", "completed"], timeout=20)
    done = hooks.payload("/all", "completed")
    assert done["status"] == "succeeded" and done["counts"]["done"] == 3
    async with httpx.AsyncClient(timeout=10) as c:
        metrics = (await c.get(f"{controller.ctx.http_url}/metrics",
                               headers={"Authorization": f"Bearer {controller.ctx.admin_token}"})).text
    assert 'fleet_rollout_notifications_total{event="completed",outcome="delivered"}' in metrics
    retries = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("fleet_rollout_notification_retries_total")]
    assert retries and retries[0] >= 1


def closed_window(now: dt.datetime) -> str:
    """A one-hour window three days from now: closed for the whole test."""
    day = (now + dt.timedelta(days=3)).strftime("%a")
    return f"{day} 00:00-01:00"


async def test_bad_input_opt_out_window_and_abort_notice(controller: RunningController, fleet: SimAgents, hooks: Hooks,
                                                 tmp_path: Path) -> None:
    await start_fleet(fleet, Script(), tmp_path, NODES[:2])
    for args, says in ((["--window", "Sat 25:00-26:00"], "bad --window 'Sat 25:00-26:00'"),
                       (["--window", "Sat 02:00-06:00 Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
                       (["--max-unavailable", "150%"], "bad --max-unavailable '150%'"),
                       (["--bake-time", "soon"], "bad --bake-time 'soon'"),
                       (["--canary", "0", "--pause-after-canary"], "--pause-after-canary needs a canary batch"),
                       (["--notify-webhook", "ftp://hooks.example"], "not an http:// or https:// URL")):
        rc, out, err = await fleetctl(controller, "rollout", "flash-attn", *args)
        assert rc == 2 and says in err and "hint:" in err, (args, out, err)
    rc, out, _ = await fleetctl(controller, "rollout", "list", "--json")
    assert json.loads(out)["rollouts"] == []  # nothing was stored

    rc, out, err = await fleetctl(controller, "label", "a100-2", "fleetctl.io/opt-out=true")
    assert rc == 0, out + err
    window = closed_window(dt.datetime.now(dt.UTC))
    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--canary", "0", "--window", window,
                                  "--detach")
    assert rc == 0, out + err
    rid = out.split()[1]

    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {controller.ctx.admin_token}"}) as c:
        for _ in range(200):  # the engine's first tick writes the hold
            st = (await c.get(f"{controller.ctx.http_url}/api/v1/rollouts/{rid}")).json()
            if st["waiting"]:
                break
            await asyncio.sleep(0.05)
    assert st["waiting"].startswith("waiting for window (opens in ") and window in st["waiting"]
    assert st["hold"]["kind"] == "window" and st["status"] == "running"
    assert {n["hostname"]: n["state"] for n in st["nodes"]} == {"a100-1": "planned", "a100-2": "skipped"}
    assert st["opted_out"] == ["a100-2"]
    rc, out, _ = await fleetctl(controller, "rollout", "status", rid)
    assert "waiting for window (opens in " in out
    assert "opted out (label fleetctl.io/opt-out=true): a100-2" in out
    assert controller.ctx.jobs.list_jobs() == []  # nothing started outside the window

    rc, out, err = await fleetctl(controller, "rollout", "abort", rid)
    assert rc == 0, err
    await wait_for(lambda: hooks.events("/all") == ["aborted"], timeout=20)
    assert hooks.payload("/all", "aborted")["counts"]["skipped"] == 2


async def test_max_unavailable_counts_the_offline_node_and_failure_notice(
        controller: RunningController, fleet: SimAgents, hooks: Hooks, tmp_path: Path) -> None:
    script = Script(default_delay=0.3)
    script.fail[("h100-2", "install-wheel")] = "pip: No space left on device"
    await start_fleet(fleet, script, tmp_path, NODES)
    await fleet.agents["a100-2"].stop()  # offline: skipped by the rollout, and counted as unavailable
    await wait_for(lambda: controller.ctx.registry.status_of("a100-2") == NodeStatus.OFFLINE, timeout=20)

    rc, out, err = await fleetctl(controller, "rollout", "flash-attn", "--canary", "0", "--batch", "100%",
                                  "--max-unavailable", "2", "--max-failures", "0")
    assert rc == 10, out + err  # paused by the failure budget
    rid = out.split()[1]
    st = await status(controller, rid)
    states = {n["hostname"]: n["state"] for n in st["nodes"]}
    assert states == {"a100-1": "done", "a100-2": "skipped", "h100-1": "done", "h100-2": "failed"}
    # one node offline + at most one in a step = 2: the steps never overlapped
    spans: dict[str, list[dt.datetime]] = {}
    for t in st["transitions"]:
        if t["hostname"] != "a100-2" and (t["from"] == "planned" or t["to"] in ("done", "failed")):
            spans.setdefault(t["hostname"], []).append(dt.datetime.fromisoformat(t["at"]))
    ordered = sorted(spans.values())
    assert len(ordered) == 3
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert start >= end, spans

    await wait_for(lambda: hooks.events("/all") == ["paused"], timeout=20)
    note = hooks.payload("/all", "paused")
    assert [n["hostname"] for n in note["failed_nodes"]] == ["h100-2"]
    assert "No space left on device" in note["failed_nodes"][0]["reason"]
    assert note["reason"].startswith("failure budget exceeded") and note["counts"]["failed"] == 1
