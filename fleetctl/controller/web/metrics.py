"""/metrics: Prometheus exposition computed from the database at scrape time (docs/dashboard.md, "Metrics").

Fleet families: ``fleet_nodes{status}``, ``fleet_nodes_by_gpu_model{gpu_model}``, ``fleet_nodes_simulated``;
per node (label ``hostname``, one series per node and family, so cardinality = fleet size):
``fleet_node_info{hostname,gpu_model,flash_attn_version,flash_attn_variant,agent_version}`` (value 1),
``fleet_node_status{hostname,status}`` (value 1, the current status), ``fleet_node_last_heartbeat_timestamp_seconds``,
``fleet_node_verification_passed`` (1/0, nodes ever verified), ``fleet_node_verification_timestamp_seconds`` and
``fleet_node_agent_cert_expiry_timestamp_seconds``, ``fleet_node_attention_slower_than_best{hostname,workload}``
and per GPU class ``fleet_attention_recommended_info``; ``fleet_controller_ca_cert_expiry_timestamp_seconds``;
rollouts: ``fleet_rollouts{status}``, ``fleet_rollout_nodes{rollout,state}`` and
``fleet_rollout_progress_ratio{rollout,status}`` (the 20 newest); ``fleet_verifications{gpu_model,result}`` and
``fleet_verification_tflops_median{gpu_model}``; jobs: ``fleet_jobs{status}`` (queue depth) and
``fleet_job_duration_seconds{kind}`` (histogram over finished jobs). ``gpu_model``, never ``gpu``: DCGM's exporter
uses ``gpu`` for the GPU index, and a join with its series must not collide.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleetctl.controller import attention, jobs, telemetry
from fleetctl.controller.ca import client_cert_not_after
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.registry import AgentPulse, agent_pulses
from fleetctl.controller.rollout.core import RolloutStatus
from fleetctl.controller.store.db import Store
from fleetctl.controller.verify_store.views import GpuVerificationCounts
from fleetctl.controller.web import nodeindex, sources
from fleetctl.controller.web.attentionview import DEFAULT_WORKLOAD
from fleetctl.controller.web.models import DashboardNode
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.jobs import JobStatus

log = logging.getLogger(__name__)

ATTENTION_EVERY_S = 300.0
#: per database engine (one per controller; tests run several): when the attention report was made, and it
_attention_reports: weakref.WeakKeyDictionary[Any, tuple[float, attention.FleetReport]] = weakref.WeakKeyDictionary()

JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class _Collector:
    def __init__(self, store: Store, ca_expires_at: dt.datetime | None, state_dir: Path | None) -> None:
        self.store = store
        self.ca_expires_at = ca_expires_at
        self.state_dir = state_dir

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.ca_expires_at is not None:
            ca = GaugeMetricFamily("fleet_controller_ca_cert_expiry_timestamp_seconds",
                                   "Unix time the controller's CA certificate expires")
            ca.add_metric([], _timestamp(self.ca_expires_at))
            yield ca
        with self.store.session() as s:
            nodeindex.sync(s)
            nodes = GaugeMetricFamily("fleet_nodes", "Nodes by status", labels=["status"])
            counts = dict(s.execute(select(DashboardNode.status, func.count()).group_by(DashboardNode.status))
                          .all())
            for status in sorted({*NodeStatus, *counts}):
                nodes.add_metric([status], counts.get(status, 0))
            yield nodes
            by_gpu = GaugeMetricFamily("fleet_nodes_by_gpu_model", "Nodes by GPU model", labels=["gpu_model"])
            for gpu, n in s.execute(select(DashboardNode.gpu_model, func.count())
                                    .group_by(DashboardNode.gpu_model)):
                by_gpu.add_metric([gpu or "none"], n)
            yield by_gpu
            sim = GaugeMetricFamily("fleet_nodes_simulated", "Nodes whose GPU is simulated")
            sim.add_metric([], s.scalar(select(func.count()).select_from(DashboardNode)
                                        .where(DashboardNode.simulated.is_(True))) or 0)
            yield sim
            pulses = agent_pulses(s)
            rows = s.execute(select(DashboardNode.hostname, DashboardNode.status, DashboardNode.gpu_model,
                                    DashboardNode.fa_version, DashboardNode.fa_variant, DashboardNode.verify_result,
                                    DashboardNode.verify_at).order_by(DashboardNode.hostname)).all()
            unknown = AgentPulse(None, None, None)
            yield from _node_metrics([PerNode(host, status, gpu, fa, variant, result, at, pulses.get(host, unknown))
                                      for host, status, gpu, fa, variant, result, at in rows])
            yield from _attention_metrics(s, self.state_dir)
            yield from _rollout_metrics(sources.rollouts(s, limit=20), sources.rollout_counts(s))
            yield from _verification_metrics(sources.verification_metrics(s))
            queue = GaugeMetricFamily("fleet_jobs", "Jobs by status (pending and dispatched: the queue)",
                                      labels=["status"])
            counts = jobs.status_counts(s)
            for status in sorted({*JobStatus, *counts}):
                queue.add_metric([status], counts.get(status, 0))
            yield queue
            yield _job_histogram(jobs.run_spans(s))


@dataclass(frozen=True)
class PerNode:
    """What the per-node series show of one node (its dashboard index row and its last heartbeat)."""

    hostname: str
    status: str
    gpu_model: str
    fa_version: str
    fa_variant: str
    verify_result: str  # passed | failed | "" (never verified)
    verify_at: dt.datetime | None
    pulse: AgentPulse  # the registry's: last heartbeat, enrolment time, agent version


def _timestamp(at: dt.datetime) -> float:
    return (at if at.tzinfo else at.replace(tzinfo=dt.UTC)).timestamp()


def _node_metrics(nodes: list[PerNode]) -> Iterator[Metric]:
    """One series per node and family (label ``hostname``). Timestamps rather than ages, as Prometheus advises:
    ``time() - fleet_node_last_heartbeat_timestamp_seconds`` is the heartbeat age, and it keeps growing in
    Prometheus even when the controller stops being scraped."""
    info = GaugeMetricFamily("fleet_node_info", "A node's GPU model, installed FlashAttention and agent version "
                             "(value 1)", labels=["hostname", "gpu_model", "flash_attn_version", "flash_attn_variant",
                                                  "agent_version"])
    status = GaugeMetricFamily("fleet_node_status", "A node's current status (value 1)",
                               labels=["hostname", "status"])
    heartbeat = GaugeMetricFamily("fleet_node_last_heartbeat_timestamp_seconds",
                                  "Unix time of the node's last heartbeat", labels=["hostname"])
    passed = GaugeMetricFamily("fleet_node_verification_passed",
                               "1 if the node's latest verification passed, 0 if it failed (verified nodes only)",
                               labels=["hostname"])
    verified_at = GaugeMetricFamily("fleet_node_verification_timestamp_seconds",
                                    "Unix time of the node's latest verification", labels=["hostname"])
    cert_expiry = GaugeMetricFamily("fleet_node_agent_cert_expiry_timestamp_seconds",
                                    "Unix time the node's agent certificate expires (re-enroll the agent before)",
                                    labels=["hostname"])
    for n in nodes:
        info.add_metric([n.hostname, n.gpu_model or "none", n.fa_version, n.fa_variant, n.pulse.agent_version or ""], 1)
        status.add_metric([n.hostname, n.status], 1)
        if n.pulse.last_seen is not None:
            heartbeat.add_metric([n.hostname], _timestamp(n.pulse.last_seen))
        if n.verify_result:
            passed.add_metric([n.hostname], 1 if n.verify_result == "passed" else 0)
        if n.verify_at is not None:
            verified_at.add_metric([n.hostname], _timestamp(n.verify_at))
        if n.pulse.enrolled_at is not None:
            cert_expiry.add_metric([n.hostname], _timestamp(n.pulse.cert_not_after
                                                            or client_cert_not_after(n.pulse.enrolled_at)))
    yield from (info, status, heartbeat, passed, verified_at, cert_expiry)


def _attention_metrics(s: Session, state_dir: Path | None) -> Iterator[Metric]:
    """What ``fleetctl attention report`` says for the default workload: the recommended implementation per GPU
    model × torch, and per node whether what it runs measured slower than its own best. One workload only: the
    report runs a recommendation per node (~1.7 ms a node: 17 s for 10,000), so it is computed at most every
    ``ATTENTION_EVERY_S`` per store and the scrapes in between reuse it (it moves with new verifications, hours
    apart, not with heartbeats)."""
    now = time.monotonic()
    cached = _attention_reports.get(s.get_bind())
    if cached is not None and now - cached[0] < ATTENTION_EVERY_S:
        report = cached[1]
    else:
        try:
            report = attention.fleet_report(s, controller_catalog(s, state_dir), DEFAULT_WORKLOAD)
        except FleetError as exc:  # an unusable catalog: the page and fleetctl say why; the rest still goes out
            log.warning("/metrics: no attention recommendation: %s", exc)
            return
        _attention_reports[s.get_bind()] = (now, report)
    recommended = GaugeMetricFamily("fleet_attention_recommended_info", "The recommended attention implementation "
                                    "per GPU model and torch version (value 1)",
                                    labels=["gpu_model", "torch", "workload", "implementation"])
    slower = GaugeMetricFamily("fleet_node_attention_slower_than_best", "1 if the node runs an attention "
                               "implementation measured slower than its recommended one, else 0",
                               labels=["hostname", "workload"])
    for row in report.rows:
        choice = row.recommendation.choice
        if choice is not None:
            recommended.add_metric([row.gpu_model or "none", row.torch or "", row.workload, choice.impl], 1)
        for host in row.hostnames:
            slower.add_metric([host, row.workload], 1 if host in row.slower_hosts else 0)
    yield recommended
    yield slower


def _rollout_metrics(rollouts: list[dict[str, Any]], by_status: dict[str, int]) -> Iterator[Metric]:
    count = GaugeMetricFamily("fleet_rollouts", "Rollouts by status", labels=["status"])
    for status in sorted({*RolloutStatus, *by_status}):
        count.add_metric([status], by_status.get(status, 0))
    yield count
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
                              labels=["gpu_model", "result"])
    tflops = GaugeMetricFamily("fleet_verification_tflops_median", "Median FlashAttention TFLOP/s of the latest "
                               "verification, by GPU model", labels=["gpu_model"])
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


def render_metrics(store: Store, ca_expires_at: dt.datetime | None = None,
                   state_dir: Path | None = None) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(store, ca_expires_at, state_dir))
    return generate_latest(registry) + generate_latest(telemetry.REGISTRY), CONTENT_TYPE_LATEST


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
