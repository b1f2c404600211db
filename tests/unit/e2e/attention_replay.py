"""What the H200 attention replays (test_h200_attention_e2e.py, test_h200_attention_fa2_e2e.py) ask today's code
about the one node ``vm`` of a real run's controller database: its recommendations and its ``--prefer fastest``
dry-run plan."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from fleetctl.controller.attention import Recommendation, node_recommendations
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.registry import record_of
from fleetctl.controller.rollout.service import RolloutRequest, plan_rollout
from fleetctl.controller.store import Store
from fleetctl.controller.store.models import Node


def recommendations(st: Store, state_dir: Path) -> list[Recommendation]:
    with st.session() as s:
        rec = record_of(s.scalars(select(Node)).one())
        assert rec.facts is not None
        return node_recommendations(s, rec.facts, False, controller_catalog(s, state_dir))


def fastest_plan(st: Store, state_dir: Path, workload: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The node's dry-run plan under ``--prefer fastest --workload W``: variant, steps, reasons."""
    (node,) = plan_rollout(st, RolloutRequest(version="2.8.3.post1", nodes="vm", prefer="fastest",
                                              workload=workload, dry_run=True), state_dir=state_dir).nodes
    return node.plan.variant, tuple(node.plan.steps), tuple(node.plan.reasons)
