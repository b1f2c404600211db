"""A rollout as an OpenTelemetry trace (controller/rollout_traces.py): a real controller and agents (simulated
executor) run a canary rollout with one failing node; once it has ended, its trace goes to the SDK's in-memory
span exporter: one root span, a span per batch under it, a span per node step under its batch, with the recorded
times, the failed step marked as an error — and a rollout is exported once."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from fleetctl.controller.app import RunningController
from fleetctl.controller.rollout_traces import RolloutTraces, tracer_provider
from fleetctl.fleet.errors import UsageError
from tests.integration.fleet_support import SimAgents
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = pytest.mark.timeout(120)

NODES = [("a100-1", "a100"), ("a100-2", "a100"), ("a100-3", "a100")]


async def test_an_ended_rollout_is_one_trace(controller: RunningController, fleet: SimAgents, tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    traces = RolloutTraces(controller.ctx.store, tracer_provider(exporter=exporter))
    script = Script()
    script.fail[("a100-3", "install-wheel")] = "ImportError: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    for host, profile in NODES:
        runner = SimRunner.for_profile(host, profile, script, tmp_path / "work" / host)
        runner.agent = (await fleet.start(host, profile, runner=runner, facts=runner.current_facts)).agent
    assert await traces.export_ended() == 0  # nothing ended yet

    headers = {"Authorization": f"Bearer {controller.ctx.admin_token}"}
    async with httpx.AsyncClient(base_url=str(controller.ctx.http_url), headers=headers, timeout=10) as http:
        created = (await http.post("/api/v1/rollouts", json={"canary": 1, "batch": "100%", "max_failures": "2",
                                                               "actor": "tester"})).json()
        rid = created["id"]

        async def status() -> str:
            return str((await http.get(f"/api/v1/rollouts/{rid}")).json()["status"])

        for _ in range(600):
            if await status() not in ("running", "aborting", "rolling-back"):
                break
            await asyncio.sleep(0.1)
        final = await status()
    assert final == "partial", final

    assert await traces.export_ended() == 1
    assert await traces.export_ended() == 0  # once
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.parent is None]
    assert root.name == f"rollout {rid}" and root.attributes is not None
    assert root.attributes["fleetctl.rollout.status"] == "partial" and root.status.status_code is StatusCode.ERROR
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    batches = sorted((s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
                     key=lambda s: s.start_time or 0)
    assert [b.name for b in batches] == ["batch 0", "batch 1"]
    assert batches[0].attributes is not None and batches[0].attributes["fleetctl.batch.canary"] is True
    steps = {b.name: [s for s in spans if s.parent is not None and s.parent.span_id == b.context.span_id]
             for b in batches}
    assert len({str((s.attributes or {})["fleetctl.node"]) for s in steps["batch 0"]}) == 1  # the canary
    assert {str((s.attributes or {})["fleetctl.node"]) for s in steps["batch 1"]} == {
        h for h, _ in NODES} - {str((s.attributes or {})["fleetctl.node"]) for s in steps["batch 0"]}
    for batch in batches:
        children = steps[batch.name]
        assert children and all((s.attributes or {})["fleetctl.step"] in (
            "keyring", "toolkit", "waiting", "build", "install", "verify") for s in children)
        assert batch.start_time == min(s.start_time or 0 for s in children)
        assert batch.end_time == max(s.end_time or 0 for s in children)
        assert all((root.start_time or 0) <= (s.start_time or 0) <= (s.end_time or 0) <= (root.end_time or 0)
                   for s in children)
    failed = [s for s in spans if s.status.status_code is StatusCode.ERROR and s.name.endswith("a100-3")]
    assert [s.name for s in failed] == ["install a100-3"]
    assert "undefined symbol" in (failed[0].status.description or "")
    assert all(s.name.startswith(("install ", "verify ", "build ", "waiting ", "keyring ", "toolkit "))
               for s in spans if s not in batches and s is not root)


def test_without_the_sdk_an_endpoint_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as where the extra is not installed
    with pytest.raises(UsageError) as err:
        tracer_provider("http://127.0.0.1:4318")
    assert err.value.hint and "fleetctl[otel]" in err.value.hint
