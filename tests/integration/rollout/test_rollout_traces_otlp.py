"""``otel_endpoint`` end to end: a controller started with it sends an ended rollout's trace with the real OTLP/HTTP
exporter to a collector on a loopback socket (a plain HTTP server that decodes the protobuf request as an
OpenTelemetry collector would)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from fleetctl.controller.app import start_controller
from tests.integration.fleet_support import SimAgents, controller_settings, wait_for
from tests.integration.rollout.simrunner import Script, SimRunner

pytestmark = pytest.mark.timeout(120)


class Collector(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receive)
        self.spans: list[tuple[str, str]] = []  # (service.name, span name)
        self.paths: list[str] = []


class _Receive(BaseHTTPRequestHandler):
    server: Collector

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                self.server.spans += [(service, span.name) for span in scope.spans]
        self.server.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def test_a_controller_with_an_endpoint_sends_rollout_traces(collector: Collector, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    rc = await start_controller(controller_settings(tmp_path / "controller", otel_endpoint=endpoint))
    fleet = SimAgents(rc, tmp_path / "agents")
    try:
        assert "rollout-traces" in rc.started
        runner = SimRunner.for_profile("a100-1", "a100", Script(), tmp_path / "work")
        runner.agent = (await fleet.start("a100-1", "a100", runner=runner, facts=runner.current_facts)).agent
        headers = {"Authorization": f"Bearer {rc.ctx.admin_token}"}
        async with httpx.AsyncClient(base_url=str(rc.ctx.http_url), headers=headers, timeout=10) as http:
            rid = (await http.post("/api/v1/rollouts", json={"canary": 0, "batch": "100%"})).json()["id"]
        await wait_for(lambda: ("fleet-controller", f"rollout {rid}") in collector.spans, timeout=60, interval=0.2)
    finally:
        await fleet.stop_all()
        await rc.stop(grace=0.2)
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    names = {name for _, name in collector.spans}
    assert {"batch 0", "install a100-1", "verify a100-1"} <= names
