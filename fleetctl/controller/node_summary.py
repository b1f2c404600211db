"""The one node summary: what a node row shows in ``fleetctl nodes``, the JSON API and the dashboard.

``summarize`` is pure: a ``NodeRecord`` (typed facts from the registry) plus the node's latest verification
(verify_store's read view) and rollout state, which ``summaries`` reads for many nodes at once. A new fact shown in
the node row is added here once; the CLI, the API and the dashboard's node index only render these fields.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.ca import client_cert_not_after
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.registry import NodeRecord
from fleetctl.controller.rollout.models import Rollout, RolloutNode
from fleetctl.controller.verify_store.views import VerificationView, latest_by_node
from fleetctl.fleet.version import AgentSupport, agent_support


@dataclass(frozen=True)
class RolloutState:
    """The node's state in the newest rollout it takes part in."""

    rollout_id: str
    state: str
    step: str | None


@dataclass(frozen=True)
class NodeSummary:
    hostname: str
    status: NodeStatus
    simulated: bool
    last_seen: dt.datetime | None
    agent_id: str | None
    agent_version: str | None
    labels: Mapping[str, str]  # the user's (`fleetctl label`)
    gpu_model: str | None
    gpu_count: int
    compute_capability: str | None
    driver: str | None
    cuda_max: str | None
    nvcc: str | None
    torch: str | None
    torch_cuda: str | None
    cxx11abi: bool | None
    python: str | None
    arch: str | None
    flash_attn: str | None  # the installed version
    flash_attn_variant: str | None
    facts_updated_at: dt.datetime
    facts_error: str | None  # why the stored facts could not be read (the fields above are then empty)
    last_verification: VerificationView | None
    rollout: RolloutState | None
    agent_support: AgentSupport = AgentSupport.UNKNOWN  # its agent's version against fleet/version.py's range
    cert_expires_at: dt.datetime | None = None  # its agent's client certificate (renewed when a third is left)

    @property
    def gpu(self) -> str | None:
        """"2× NVIDIA H100 80GB HBM3": the GPU column of every node table."""
        return f"{self.gpu_count}× {self.gpu_model}" if self.gpu_count else None

    def to_json(self) -> dict[str, Any]:
        """The API's node row (``GET /api/v1/nodes``; ``fleetctl nodes --json``)."""
        v, r = self.last_verification, self.rollout
        return {
            "hostname": self.hostname, "status": str(self.status), "last_seen": _iso(self.last_seen),
            "simulated": self.simulated, "gpu": self.gpu, "gpu_model": self.gpu_model, "gpu_count": self.gpu_count,
            "compute_capability": self.compute_capability, "driver": self.driver, "cuda_max": self.cuda_max,
            "nvcc": self.nvcc, "torch": self.torch, "torch_cuda": self.torch_cuda, "cxx11abi": self.cxx11abi,
            "python": self.python, "flash_attn": self.flash_attn, "flash_attn_variant": self.flash_attn_variant,
            "arch": self.arch, "agent_id": self.agent_id, "agent_version": self.agent_version,
            "labels": dict(self.labels),
            "agent_support": str(self.agent_support), "cert_expires_at": _iso(self.cert_expires_at),
            "facts_updated_at": _iso(self.facts_updated_at),
            "facts_error": self.facts_error,
            "last_verification": None if v is None else {"result": v.result, "status": v.status, "at": _iso(v.at),
                                                          "tflops": v.tflops},
            "rollout": None if r is None else {"rollout_id": r.rollout_id, "state": r.state, "step": r.step},
        }


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


def summarize(record: NodeRecord, *, last_verification: VerificationView | None = None,
              rollout: RolloutState | None = None) -> NodeSummary:
    f = record.facts
    gpu0 = f.gpus[0] if f is not None and f.gpus else None
    return NodeSummary(
        hostname=record.hostname, status=record.status, simulated=record.simulated, last_seen=record.last_seen,
        agent_id=record.agent.agent_id if record.agent else None, agent_version=record.agent_version,
        labels=record.labels,
        gpu_model=gpu0.name if gpu0 else None, gpu_count=len(f.gpus) if f is not None else 0,
        compute_capability=gpu0.compute_capability if gpu0 else None,
        driver=f.driver.version if f is not None and f.driver else None,
        cuda_max=f.driver.cuda_max if f is not None and f.driver else None,
        nvcc=f.toolkit.nvcc if f is not None and f.toolkit else None,
        torch=f.torch.version if f is not None and f.torch else None,
        torch_cuda=f.torch.cuda if f is not None and f.torch else None,
        cxx11abi=f.torch.cxx11abi if f is not None and f.torch else None,
        python=f.python.version if f is not None else None,
        arch=f.os.arch if f is not None else None,
        flash_attn=f.flash_attn.version if f is not None and f.flash_attn else None,
        flash_attn_variant=f.flash_attn.variant if f is not None and f.flash_attn else None,
        facts_updated_at=record.facts_updated_at, facts_error=record.facts_error,
        last_verification=last_verification, rollout=rollout, agent_support=agent_support(record.agent_version),
        cert_expires_at=None if record.agent is None else (
            record.agent.cert_not_after or (client_cert_not_after(record.agent.enrolled_at)
                                            if record.agent.enrolled_at else None)))


def summaries(session: Session, records: Sequence[NodeRecord]) -> list[NodeSummary]:
    """Summaries of ``records`` with each node's latest verification and rollout state (one query each)."""
    hosts = [r.hostname for r in records]
    verified = latest_by_node(session, hosts)
    states: dict[str, RolloutState] = {}
    for start in range(0, len(hosts), 500):
        newest_rollout = (select(RolloutNode.hostname, RolloutNode.rollout_id, RolloutNode.state, RolloutNode.step)
                          .join(Rollout, Rollout.id == RolloutNode.rollout_id)
                          .where(RolloutNode.hostname.in_(hosts[start:start + 500])).order_by(Rollout.created_at))
        for host, rid, state, step in session.execute(newest_rollout):
            states[host] = RolloutState(rollout_id=rid, state=state, step=step)  # ascending: the newest wins
    return [summarize(r, last_verification=verified.get(r.hostname), rollout=states.get(r.hostname))
            for r in records]


def list_json(session: Session, records: Sequence[NodeRecord], *, with_facts: bool = False) -> list[dict[str, Any]]:
    """``GET /api/v1/nodes``: one summary per node (with its stored facts object when asked)."""
    out = [s.to_json() for s in summaries(session, records)]
    if with_facts:
        for item, record in zip(out, records, strict=True):
            item["facts"] = dict(record.facts_json)
    return out


def detail_json(session: Session, record: NodeRecord, history: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``GET /api/v1/nodes/HOST`` (``fleetctl node``): the summary, the stored facts, identity and history."""
    [summary] = summaries(session, [record])
    agent = record.agent
    return summary.to_json() | {
        "facts": dict(record.facts_json),
        "extra": dict(record.extra),
        "registered_at": _iso(record.registered_at),
        "status_changed_at": _iso(record.status_changed_at),
        "identity": None if agent is None else {
            "agent_id": agent.agent_id, "hostname": record.hostname, "cert_serial": agent.cert_serial,
            "cert_fingerprint": agent.cert_fingerprint, "enrolled_at": _iso(agent.enrolled_at),
            "revoked": agent.revoked, "revoked_at": _iso(agent.revoked_at)},
    } | history
