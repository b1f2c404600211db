"""The attention recommendation inside the controller: evidence from the verification store, and its routes.

The rules, and the loading of their evidence from the verification store, are controller/attention.py's;
this module only serves the results.

Routes (bearer token, any role): GET /api/v1/attention/nodes/{host}[?workload=] · GET /api/v1/attention/report
[?nodes=SELECTOR&workload=]
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from controller import attention
from controller.http_deps import API_PREFIX, Ctx, Viewer
from controller.store.models import Node
from fleet.errors import FactsError, NotFoundError
from fleet.facts import NodeFacts, parse_node


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
            evidence = attention.node_evidence(s, facts, bool(row.simulated))
            recs = attention.recommend_for(facts, catalog, evidence, workloads)
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
                own = [e for e in attention.node_evidence(s, facts, bool(row.simulated)) if e.source.kind == "node"]
                members.append((facts, own))
            out = attention.report(members, workload, catalog)
        return {"workload": workload, "selector": nodes or "all", "groups": [g.to_json() for g in out],
                "unreadable_facts": skipped}

    return r
