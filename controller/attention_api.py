"""The attention recommendation inside the controller: evidence from the verification store, and its routes.

The rules are controller/attention.py's; this module only loads typed evidence (the node's latest stored
verification, the fleet's latest of the same GPU model) and serves the results.

Routes (bearer token, any role): GET /api/v1/attention/nodes/{host}[?workload=] · GET /api/v1/attention/report
[?nodes=SELECTOR&workload=]
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import attention
from controller.api import API_PREFIX, Ctx, Viewer
from controller.store.models import Node
from fleet.errors import FactsError, NotFoundError
from fleet.facts import NodeFacts, parse_node


def node_evidence(s: Session, facts: NodeFacts, simulated: bool) -> list[attention.Evidence]:
    """The node's latest stored result (kind node) and the fleet's latest per other node of its GPU model."""
    from controller.verify_store import store

    gpu = facts.gpus[0].name if facts.gpus else None
    out = []
    for r in store.latest_results(s, gpu_model=gpu, simulated=simulated):
        kind = "node" if r.hostname == facts.hostname else "fleet"
        out.append(attention.evidence_from_result(r, kind, origin=r.hostname))
    return out


def measurements_for(s: Session, facts: NodeFacts, simulated: bool, catalog: Any, workload: str) -> Any:
    """The resolver's typed input for ``--prefer fastest`` on one node."""
    rec = attention.recommend(attention.NodeContext.of(facts),
                              (*node_evidence(s, facts, simulated), *attention.builtin_prior()),
                              attention.profile(workload), attention.install_costs(facts, catalog))
    return rec.as_measurements()


def _facts(row: Node) -> NodeFacts:
    try:
        return parse_node(row.facts)
    except FactsError as exc:
        raise NotFoundError(f"node {row.hostname} has unreadable facts: {exc.message}",
                            hint="wait for the agent's next facts report, or fix the agent") from None


def router() -> APIRouter:
    r = APIRouter(prefix=API_PREFIX)

    @r.get("/attention/nodes/{hostname}")
    def node(hostname: str, ctx: Ctx, _: Viewer, workload: str | None = None) -> dict[str, Any]:
        from controller.local_wheels import controller_catalog

        workloads = (attention.profile(workload).name,) if workload else attention.WORKLOADS
        with ctx.store.session() as s:
            row = s.get(Node, hostname)
            if row is None:
                raise NotFoundError(f"no node {hostname!r}", hint="`fleetctl nodes` lists the registered nodes")
            facts = _facts(row)
            catalog = controller_catalog(s, ctx.settings.state_dir)
            recs = attention.recommend_for(facts, catalog, node_evidence(s, facts, bool(row.simulated)), workloads)
        return {"hostname": hostname, "running": {w: attention.running_impl(facts, w) for w in workloads},
                "recommendations": [x.to_json() for x in recs]}

    @r.get("/attention/report")
    def report(ctx: Ctx, _: Viewer, nodes: str | None = None, workload: str = "prefill") -> dict[str, Any]:
        from controller.local_wheels import controller_catalog
        from controller.rollout.core import parse_selector, select_nodes
        from controller.rollout.service import _node_info

        attention.profile(workload)
        with ctx.store.session() as s:
            rows = list(s.scalars(select(Node)))
            chosen = {n.hostname for n in select_nodes(parse_selector(nodes), [_node_info(x) for x in rows])}
            catalog = controller_catalog(s, ctx.settings.state_dir)
            members = []
            skipped = []
            for row in sorted(rows, key=lambda x: x.hostname):
                if row.hostname not in chosen:
                    continue
                try:
                    facts = parse_node(row.facts)
                except FactsError:
                    skipped.append(row.hostname)
                    continue
                own = [e for e in node_evidence(s, facts, bool(row.simulated)) if e.source.kind == "node"]
                members.append((facts, own))
            out = attention.report(members, workload, catalog)
        return {"workload": workload, "selector": nodes or "all", "groups": [g.to_json() for g in out],
                "unreadable_facts": skipped}

    return r
