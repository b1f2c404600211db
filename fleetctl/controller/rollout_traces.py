"""A finished rollout as an OpenTelemetry trace (``otel_endpoint`` setting; docs/operations.md, "Traces").

One trace per rollout: the root span covers the rollout from its creation to its end, a child span per batch,
and under each batch a span per node step (keyring, toolkit, waiting, build, install, verify, rolling-back) from the
node's transition into the step to its transition out of it. The spans are built from what the rollout engine
already records (``rollout_transitions``), after the rollout has ended, with those recorded times: a rollout that
survived controller restarts or moved between controllers (its lease) is still one whole trace, and the engine
carries no tracing code. ``trace_of`` is pure; ``RolloutTraces`` finds rollouts that ended since it started and
exports each once, through the OTLP/HTTP exporter when ``opentelemetry-sdk`` is installed and an endpoint is
set. Without an endpoint nothing is built and the SDK is never imported.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from fleetctl.controller.rollout.core import STEP_STATES, State
from fleetctl.controller.rollout.models import Rollout, RolloutNode, RolloutTransition
from fleetctl.controller.store.db import Store, utcnow
from fleetctl.fleet.errors import FleetError, UsageError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

#: the states a node spends time in that are shown as step spans (the steps, and waiting for another node's build)
TRACED_STATES = frozenset({*STEP_STATES, State.WAITING})
SERVICE_NAME = "fleet-controller"


@dataclass
class SpanRecord:
    """One span to export: times as recorded, attributes in OpenTelemetry's flat form, children below it."""

    name: str
    start: dt.datetime
    end: dt.datetime
    attributes: dict[str, str | int | bool] = field(default_factory=dict)
    error: str | None = None  # the span's status description when it ended in failure
    children: list[SpanRecord] = field(default_factory=list)


def _steps(host: str, moves: Sequence[RolloutTransition], ended: dt.datetime) -> list[SpanRecord]:
    """A node's step spans: each traced state from the transition into it to the next one."""
    spans = []
    for i, move in enumerate(moves):
        if move.to_state not in TRACED_STATES:
            continue
        after = moves[i + 1] if i + 1 < len(moves) else None
        span = SpanRecord(f"{move.to_state} {host}", move.at, after.at if after else ended,
                          {"fleetctl.node": host, "fleetctl.step": move.to_state,
                           "fleetctl.next_state": after.to_state if after else "unfinished"})
        if move.job_id:
            span.attributes["fleetctl.job_id"] = move.job_id
        if after is not None and after.to_state == State.FAILED:
            span.error = after.cause[:500] or "failed"
        spans.append(span)
    return spans


def trace_of(rollout: Rollout, nodes: Sequence[RolloutNode], transitions: Sequence[RolloutTransition]) -> SpanRecord:
    """The span tree of one ended rollout (pure)."""
    ended = rollout.finished_at or rollout.updated_at
    by_host: dict[str, list[RolloutTransition]] = {}
    for move in sorted(transitions, key=lambda t: (t.at, t.id)):
        by_host.setdefault(move.hostname, []).append(move)
    root = SpanRecord(f"rollout {rollout.id}", rollout.created_at, ended,
                      {"fleetctl.rollout.id": rollout.id, "fleetctl.rollout.version": rollout.version,
                       "fleetctl.rollout.status": rollout.status, "fleetctl.rollout.batches": rollout.batches,
                       "fleetctl.rollout.created_by": rollout.created_by})
    if rollout.status not in ("succeeded", "rolled-back"):
        root.error = rollout.reason[:500] or rollout.status
    for batch in sorted({n.batch for n in nodes}):
        members = [n for n in nodes if n.batch == batch]
        steps = [span for n in members for span in _steps(n.hostname, by_host.get(n.hostname, []), ended)]
        if not steps:  # every node of the batch skipped: nothing happened in it
            continue
        span = SpanRecord(f"batch {batch}", min(s.start for s in steps), max(s.end for s in steps),
                          {"fleetctl.batch": batch, "fleetctl.batch.nodes": len(members),
                           "fleetctl.batch.canary": any(n.canary for n in members)},
                          children=sorted(steps, key=lambda s: s.start))
        failed = sorted({str(s.attributes["fleetctl.node"]) for s in steps if s.error})
        if failed:
            span.error = f"failed on {', '.join(failed)}"
        root.children.append(span)
    return root


def _ns(t: dt.datetime) -> int:
    return int((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp() * 1_000_000_000)


def tracer_provider(endpoint: str | None = None, exporter: SpanExporter | None = None) -> TracerProvider:
    """An SDK tracer provider that exports to ``exporter``, else over OTLP/HTTP to ``endpoint``
    (``http://collector:4318``; the exporter appends ``/v1/traces``)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise UsageError("otel_endpoint is set but the OpenTelemetry SDK is not installed",
                         hint="pip install 'fleetctl[otel]', or unset otel_endpoint") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        traces = endpoint.rstrip("/") + "/v1/traces" if endpoint and not endpoint.endswith("/v1/traces") else endpoint
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces)))
    return provider


def export(provider: TracerProvider, root: SpanRecord) -> None:
    """Emit ``root`` and its children as one trace, with their recorded times."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    tracer = provider.get_tracer("fleetctl.rollout")

    def emit(span: SpanRecord, parent: Any) -> None:
        context = trace.set_span_in_context(parent) if parent is not None else None
        live = tracer.start_span(span.name, context=context, start_time=_ns(span.start),
                                 attributes=span.attributes)
        if span.error is not None:
            live.set_status(Status(StatusCode.ERROR, span.error))
        for child in span.children:
            emit(child, live)
        live.end(end_time=_ns(span.end))

    emit(root, None)


class RolloutTraces:
    """Exports every rollout that ends after ``since`` (default: now) once, checking every ``tick`` seconds."""

    def __init__(self, store: Store, provider: TracerProvider, *, since: dt.datetime | None = None) -> None:
        self.store = store
        self.provider = provider
        self.since = since or utcnow()
        self._exported: set[str] = set()

    def _ended(self) -> list[SpanRecord]:
        with self.store.session() as s:
            rollouts = s.scalars(select(Rollout).where(Rollout.finished_at.is_not(None),
                                                       Rollout.finished_at >= self.since)).all()
            out = []
            for r in rollouts:
                key = f"{r.id}@{r.finished_at}"  # a rollout resumed after it ended ends again: a new trace
                if key in self._exported:
                    continue
                nodes = s.scalars(select(RolloutNode).where(RolloutNode.rollout_id == r.id)).all()
                moves = s.scalars(select(RolloutTransition).where(RolloutTransition.rollout_id == r.id)).all()
                out.append(trace_of(r, nodes, moves))
                self._exported.add(key)
            return out

    async def export_ended(self) -> int:
        """Export the rollouts that ended since the last call; returns how many."""
        traces = await self.store.call(self._ended)
        for root in traces:
            await asyncio.to_thread(export, self.provider, root)
        return len(traces)

    async def run(self, tick: float = 5.0) -> None:
        try:
            while True:
                try:
                    await self.export_ended()
                except FleetError as exc:  # a database fault: the next tick tries again
                    log.warning("rollout traces not exported: %s", exc.message)
                await asyncio.sleep(tick)
        finally:
            await asyncio.to_thread(self.provider.shutdown)  # flush what the batch processor holds
