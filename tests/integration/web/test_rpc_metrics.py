"""The controller times agents' RPCs (issue 18, observability): a real controller and a real sim agent over mTLS
gRPC; /metrics then shows ``fleet_controller_grpc_request_duration_seconds`` by method and status code, and the
agent's version."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetctl.controller.api_tokens import create_token
from fleetctl.controller.app import RunningController
from fleetctl.controller.web.auth import add_user
from fleetctl.fleet.version import package_version
from tests.integration.fleet_support import SimAgents

pytestmark = pytest.mark.timeout(120)


async def test_agent_rpcs_are_timed_by_method_and_code(controller: RunningController, fleet: SimAgents) -> None:
    await fleet.start("rpc-node-1", "h100")
    store = controller.ctx.store
    await store.call(add_user, store, "prometheus", "metrics", "correct horse battery")
    token, _ = await store.call(create_token, store, "prometheus", dt.timedelta(hours=1))
    counts: dict[tuple[str, str], float] = {}
    info: dict[str, str] = {}
    assert controller.ctx.http_url
    async with httpx.AsyncClient(base_url=controller.ctx.http_url, timeout=30) as http:
        for _ in range(50):  # the agent enrolls, reports facts, heartbeats: wait for a heartbeat's RPC to end
            r = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
            counts = {(s.labels["method"], s.labels["code"]): s.value
                      for f in text_string_to_metric_families(r.text)
                      if f.name == "fleet_controller_grpc_request_duration_seconds"
                      for s in f.samples if s.name.endswith("_count")}
            info = {s.labels["hostname"]: s.labels["agent_version"] for f in text_string_to_metric_families(r.text)
                    if f.name == "fleet_node_info" for s in f.samples}
            if ("Heartbeat", "OK") in counts and info.get("rpc-node-1"):
                break
            await asyncio.sleep(0.2)
    assert counts[("Enroll", "OK")] >= 1  # process-wide histograms: other tests may have enrolled too
    assert counts[("ReportFacts", "OK")] >= 1 and counts[("Heartbeat", "OK")] >= 1
    assert info["rpc-node-1"] == package_version()  # the real agent reports its version with its facts
