"""/metrics: Prometheus exposition computed from the database at scrape time.

Families: ``fleet_nodes{status}``, ``fleet_nodes_by_gpu{gpu}``, ``fleet_heartbeat_lag_seconds``
(summary quantiles over online nodes) and ``fleet_heartbeat_lag_max_seconds``,
``fleet_rollout_nodes{rollout,state}`` and ``fleet_rollout_progress_ratio{rollout}``,
``fleet_verifications{gpu,result}`` and ``fleet_verification_tflops_median{gpu}``,
``fleet_job_duration_seconds{kind}`` (histogram over finished jobs).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from controller.node_status import NodeStatus
from controller.store.db import Store, utcnow
from controller.store.models import Job, Node
from controller.verify_store.views import GpuVerificationCounts
from controller.web import nodeindex, sources
from controller.web.models import DashboardNode

JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class _Collector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self.store.session() as s:
            nodeindex.sync(s)
            nodes = GaugeMetricFamily("fleet_nodes", "Nodes by status", labels=["status"])
            counts = dict(s.execute(select(DashboardNode.status, func.count()).group_by(DashboardNode.status))
                          .all())
            for status in sorted({*NodeStatus, *counts}):
                nodes.add_metric([status], counts.get(status, 0))
            yield nodes
            by_gpu = GaugeMetricFamily("fleet_nodes_by_gpu", "Nodes by GPU model", labels=["gpu"])
            for gpu, n in s.execute(select(DashboardNode.gpu_model, func.count())
                                    .group_by(DashboardNode.gpu_model)):
                by_gpu.add_metric([gpu or "none"], n)
            yield by_gpu
            sim = GaugeMetricFamily("fleet_nodes_simulated", "Nodes whose GPU is simulated")
            sim.add_metric([], s.scalar(select(func.count()).select_from(DashboardNode)
                                        .where(DashboardNode.simulated.is_(True))) or 0)
            yield sim

            now = utcnow()
            lags = sorted((now - seen).total_seconds() for seen in s.scalars(
                select(Node.last_seen).where(Node.status != NodeStatus.OFFLINE, Node.last_seen.is_not(None))) if seen)
            lag = GaugeMetricFamily("fleet_heartbeat_lag_seconds", "Seconds since the last heartbeat, quantiles "
                                    "over nodes not offline", labels=["quantile"])
            for q in (0.5, 0.9, 0.99):
                lag.add_metric([str(q)], lags[min(len(lags) - 1, int(q * len(lags)))] if lags else 0.0)
            yield lag
            lag_max = GaugeMetricFamily("fleet_heartbeat_lag_max_seconds", "Largest heartbeat lag (nodes not offline)")
            lag_max.add_metric([], lags[-1] if lags else 0.0)
            yield lag_max

            yield from _rollout_metrics(sources.rollouts(s, limit=20))
            yield from _verification_metrics(sources.verification_metrics(s))
            yield _job_histogram(s.execute(select(Job.kind, Job.started_at, Job.finished_at).where(
                Job.finished_at.is_not(None), Job.started_at.is_not(None))).all())


def _rollout_metrics(rollouts: list[dict[str, Any]]) -> Iterator[Metric]:
    states = GaugeMetricFamily("fleet_rollout_nodes", "Nodes of a rollout by state", labels=["rollout", "state"])
    ratio = GaugeMetricFamily("fleet_rollout_progress_ratio", "Finished fraction of a rollout's nodes",
                              labels=["rollout", "status"])
    for r in rollouts:
        rid = str(r.get("id"))
        by_state: dict[str, int] = r.get("by_state") or {}
        for state, n in sorted(by_state.items()):
            states.add_metric([rid, state], n)
        total = sum(by_state.values())
        ratio.add_metric([rid, str(r.get("status", ""))], (r.get("done", 0) / total) if total else 0.0)
    yield states
    yield ratio


def _verification_metrics(rows: list[GpuVerificationCounts]) -> Iterator[Metric]:
    count = GaugeMetricFamily("fleet_verifications", "Latest verification per node, by GPU model and result",
                              labels=["gpu", "result"])
    tflops = GaugeMetricFamily("fleet_verification_tflops_median", "Median FlashAttention TFLOP/s of the latest "
                               "verification, by GPU model", labels=["gpu"])
    for row in rows:
        count.add_metric([row.gpu, "passed"], row.passed)
        count.add_metric([row.gpu, "failed"], row.failed)
        if row.tflops_median is not None:
            tflops.add_metric([row.gpu], row.tflops_median)
    yield count
    yield tflops


def _job_histogram(rows: Iterable[tuple[str, Any, Any]]) -> Metric:
    per_kind: dict[str, list[float]] = defaultdict(list)
    for kind, started, finished in rows:
        per_kind[kind].append(max(0.0, (finished - started).total_seconds()))
    hist = HistogramMetricFamily("fleet_job_duration_seconds", "Duration of finished jobs", labels=["kind"])
    for kind, values in sorted(per_kind.items()):
        buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in JOB_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        hist.add_metric([kind], buckets, sum(values))
    return hist


def render_metrics(store: Store) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(store))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
