"""The dashboard's attention views: the fleet table (/attention) and a node's recommendation (node page).

Both only shape what controller/attention.py decides (the recommendation, the report) for the templates; the
fleet table is the same JSON ``fleetctl attention report`` prints (``ReportRow.to_json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from fleetctl.controller import attention
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.registry import NodeRecord
from fleetctl.controller.resolver.model import WORKLOADS
from fleetctl.fleet.errors import FleetError

DEFAULT_WORKLOAD = "prefill"


@dataclass(frozen=True)
class NodeAttention:
    """One workload's recommendation for a node and what the node runs now."""

    recommendation: dict[str, Any]  # Recommendation.to_json()
    running: str
    slower: bool  # what it runs measured more than attention.TIE_MARGIN under the recommended one


def workload_of(value: str | None) -> str:
    """The page's workload: the query's when it is one (an unknown one falls back to the default, as the page's
    own links only offer the known ones)."""
    return value if value in WORKLOADS else DEFAULT_WORKLOAD


def fleet_table(s: Session, state_dir: Path | None, workload: str) -> dict[str, Any]:
    """Per GPU model × torch: every implementation's median, the recommended one with its setting, the margin,
    the install cost and which nodes run something slower than their best."""
    report = attention.fleet_report(s, controller_catalog(s, state_dir), workload)
    return {"workload": workload, "profile": attention.profile(workload).describe(),
            "workloads": WORKLOADS, "groups": [row.to_json() for row in report.rows],
            "unreadable_facts": list(report.unreadable_facts)}


def node_attention(s: Session, record: NodeRecord, simulated: bool,
                   state_dir: Path | None) -> list[NodeAttention] | str | None:
    """The node's recommendation per workload; None without facts; a sentence when it cannot be made (the
    resolver refused the catalog, say), which the page shows in its place."""
    facts = record.facts
    if facts is None:
        return None
    try:
        recs = attention.node_recommendations(s, facts, simulated, controller_catalog(s, state_dir))
    except FleetError as exc:
        return exc.message + (f" ({exc.hint})" if exc.hint else "")
    out = []
    for rec in recs:
        running = attention.running_impl(facts, rec.profile.name)
        out.append(NodeAttention(rec.to_json(), running, attention.slower_than_best(rec, running)))
    return out
