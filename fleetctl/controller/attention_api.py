"""The attention recommendation inside the controller: evidence from the verification store, and its routes.

The rules, and the loading of their evidence from the verification store, are controller/attention.py's;
this module only serves the results.

Routes (bearer token, any role): GET /api/v1/attention/nodes/{host}[?workload=] · GET /api/v1/attention/report
[?nodes=SELECTOR&labels=LABELS&workload=]
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from fleetctl.controller import attention
from fleetctl.controller.http_deps import API_PREFIX, Ctx, Viewer
from fleetctl.controller.local_wheels import controller_catalog
from fleetctl.controller.registry import read_facts, record_of, selection_info
from fleetctl.controller.resolver.model import WORKLOADS
from fleetctl.controller.rollout.core import parse_selector, select_nodes
from fleetctl.controller.store.models import Node
from fleetctl.fleet.errors import NotFoundError
from fleetctl.fleet.facts import NodeFacts


def _facts(row: Node) -> NodeFacts:
    facts, error = read_facts(row.facts)
    if facts is None:
        raise NotFoundError(f"node {row.hostname} has no readable facts: {error}",
                            hint="wait for the agent's next facts report, or fix the agent")
    return facts


def router() -> APIRouter:
    r = APIRouter(prefix=API_PREFIX)

    @r.get("/attention/nodes/{hostname}")
    def node(hostname: str, ctx: Ctx, _: Viewer, workload: str | None = None) -> dict[str, Any]:
        workloads = (attention.profile(workload).name,) if workload else WORKLOADS
        with ctx.store.session() as s:
            row = s.scalars(select(Node).where(Node.hostname == hostname)).first()  # id is the key
            if row is None:
                raise NotFoundError(f"no node {hostname!r}", hint="`fleetctl nodes` lists the registered nodes")
            facts = _facts(row)
            catalog = controller_catalog(s, ctx.settings.state_dir)
            recs = attention.node_recommendations(s, facts, bool(row.simulated), catalog, workloads)
        return {"hostname": hostname, "running": {w: attention.running_impl(facts, w) for w in workloads},
                "recommendations": [x.to_json() for x in recs]}

    @r.get("/attention/report")
    def report(ctx: Ctx, _: Viewer, nodes: str | None = None, labels: str | None = None,
               workload: str = "prefill") -> dict[str, Any]:
        selector = parse_selector(nodes, labels)
        with ctx.store.session() as s:
            registered = [selection_info(record_of(row)) for row in s.scalars(select(Node))]
            chosen = {n.hostname for n in select_nodes(selector, registered)}
            out = attention.fleet_report(s, controller_catalog(s, ctx.settings.state_dir), workload, chosen)
        return {"workload": workload, "selector": selector.text, "groups": [g.to_json() for g in out.rows],
                "unreadable_facts": list(out.unreadable_facts)}

    return r
