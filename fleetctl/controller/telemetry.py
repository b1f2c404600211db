"""The controller's own metrics (issue 18): how fast it answers agents (gRPC), browsers and fleetctl (HTTP), how
long its database calls and its rollouts' steps take. /metrics (controller/web/metrics.py) appends them to the
fleet's families; the gRPC interceptor that fills ``GRPC_SECONDS`` is controller/rpc_metrics.py (this module stays
free of grpc: the store imports it).

Process-wide histograms in their own registry (not prometheus_client's global one, which also carries the Python
process collectors under other names). Labels are bounded: gRPC ``method`` is one of the service's RPCs, HTTP
``route`` is the route's template (``/api/v1/nodes/{hostname}``, never the filled-in path; ``unmatched`` for 404s),
``code`` a status code.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REGISTRY = CollectorRegistry(auto_describe=True)

#: an agent's unary RPCs take milliseconds; its streams (Jobs, artifact transfers) last minutes to hours
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0)

GRPC_SECONDS = Histogram("fleet_controller_grpc_request_duration_seconds",
                         "Time the controller took to answer an agent's RPC (streams: how long they stayed open)",
                         ["method", "code"], buckets=RPC_BUCKETS, registry=REGISTRY)
HTTP_SECONDS = Histogram("fleet_controller_http_request_duration_seconds",
                         "Time the controller took to answer an HTTP request (API, dashboard, /metrics)",
                         ["method", "route", "code"], registry=REGISTRY)
#: install, build, verify… steps: seconds to an hour and more
STEP_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
ROLLOUT_STEP_SECONDS = Histogram("fleet_rollout_step_duration_seconds",
                                 "Time a rollout step (the job kind: install-wheel, build, verify, …) took on a node, "
                                 "from its start to the node's next state, however it ended",
                                 ["kind"], buckets=STEP_BUCKETS, registry=REGISTRY)
DB_CALL_SECONDS = Histogram("fleet_controller_db_call_duration_seconds",
                            "Time of a database call on the store's thread pool, the wait for a free worker included",
                            registry=REGISTRY)


class HttpMetrics:
    """ASGI middleware: times every HTTP request by method, route template and status code."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_SECONDS.labels(scope.get("method", ""), template, str(status)).observe(
                time.perf_counter() - started)
