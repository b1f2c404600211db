"""``fleetctl nodes`` and ``fleetctl node HOST``: the registry as the controller sees it."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args, add_label_selector_arg
from fleetctl.controller.commands.attention import render_node
from fleetctl.controller.commands.table import render
from fleetctl.controller.commands.verify import print_node_health
from fleetctl.controller.rollout.core import TERMINAL
from fleetctl.fleet.cli import add_output_args, print_structured
from fleetctl.fleet.errors import FactsError, FleetError
from fleetctl.fleet.facts import NodeFacts, OsFacts, parse_node
from fleetctl.fleet.text import terminal_safe, terminal_safe_tree


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("nodes", help="list the fleet's nodes", description="List every registered node: "
                              "status, GPU, driver, toolkit, torch, flash-attn. Simulated nodes are marked.")
    add_output_args(p, what="{\"nodes\": [...]} (wide adds agent version and last verification)")
    p.add_argument("--facts", action="store_true", help="with -o json|yaml: include each node's full facts")
    add_label_selector_arg(p)
    add_controller_args(p)
    p.set_defaults(handler=handle_nodes)

    q = subparsers.add_parser("node", help="show one node: facts, history, status",
                              description="Show one node: status, identity, current facts, facts history "
                                          "and status transitions.")
    q.add_argument("hostname", metavar="HOST")
    add_output_args(q, what="the node")
    add_controller_args(q)
    q.set_defaults(handler=handle_node)


def handle_nodes(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/nodes", facts="true" if args.facts else None,
                                                selector=args.labels)
    if print_structured(args, data):
        return 0
    nodes = data["nodes"]
    headers = ["host", "status", "gpu", "cc", "driver", "nvcc", "torch", "python", "flash-attn", "last seen (UTC)"]
    rows = [[n["hostname"] + (" (sim)" if n["simulated"] else ""), n["status"], n["gpu"], n["compute_capability"],
             n["driver"], n["nvcc"], n["torch"], n["python"], n["flash_attn"], n["last_seen"][:19] if n["last_seen"]
             else None] for n in nodes]
    if args.output == "wide":
        headers += ["agent", "cert expires (UTC)", "last verification"]
        for row, n in zip(rows, nodes, strict=True):
            v = n.get("last_verification")
            support = n.get("agent_support")
            agent = (n.get("agent_version") or "?") + (f" ({support})" if support not in (None, "supported") else "")
            row += [agent, (n.get("cert_expires_at") or "")[:19] or None,
                    f"{v['status']} {(v['at'] or '')[:19]}" if v else None]
    if args.output == "wide":  # the user's labels last: the widest column
        headers.append("labels")
        for row, n in zip(rows, nodes, strict=True):
            row.append(",".join(f"{k}={v}" for k, v in (n.get("labels") or {}).items()) or None)
    print(render(rows, headers))
    skewed = [n for n in nodes if n.get("agent_support") in ("too-old", "too-new")]
    if skewed:  # flagged in every view: such an agent may miss or misread RPCs of this controller
        print(f"\n{len(skewed)} agent(s) outside the versions this controller supports "
              f"({data.get('supported_agent_versions', '?')}): "
              + ", ".join(f"{n['hostname']} {n.get('agent_version')} ({n['agent_support']})" for n in skewed)
              + "; upgrade them (docs/deploy.md, Version skew)")
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n["status"]] = counts.get(n["status"], 0) + 1
    print(f"\n{len(nodes)} nodes" + (": " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) if nodes else ""))
    return 0


def _os_additions(os_: OsFacts) -> str:
    """Windows/Jetson facts (issue 19) after the Linux ones; nothing on a node that reports none of them."""
    parts = [f"{key} {value}" for key, value in (("family", os_.family), ("msvc", os_.msvc), ("l4t", os_.l4t),
                                                 ("jetpack", os_.jetpack)) if value]
    return ("  " + " ".join(parts)) if parts else ""


def facts_lines(facts: NodeFacts) -> list[str]:
    """The facts part of ``fleetctl node HOST``."""
    os_, drv, tk, py, t, fa = facts.os, facts.driver, facts.toolkit, facts.python, facts.torch, facts.flash_attn
    lines = [f"  os          {os_.id} {os_.version_id} {os_.arch} kernel {os_.kernel} glibc {os_.glibc}"
             + _os_additions(os_),
             f"  driver      {drv.version + ' (CUDA ≤ ' + drv.cuda_max + ')' if drv else 'none'}"]
    for g in facts.gpus:
        arch = f" {g.arch}" if g.arch else ""
        lines.append(f"  gpu {g.index:<7} {g.name} cc {g.compute_capability}{arch} {g.memory_mib} MiB")
    lines.append(f"  toolkit     {tk.nvcc + ' at ' + tk.path if tk else 'none'}")
    abi = f" {py.abi}" if py.abi else ""
    lines.append(f"  python      {py.version}{abi} ({py.executable})")
    hip = f" hip {t.hip}" if t and t.hip else ""
    lines.append(f"  torch       {f'{t.version} cuda {t.cuda}{hip} cxx11abi {t.cxx11abi}' if t else 'none'}")
    if facts.rocm:
        lines.append(f"  rocm        {facts.rocm.version} (GPUs from {facts.rocm.smi})")
    lines.append(f"  flash-attn  {fa.version + ' (' + fa.variant + ')' if fa else 'none'}")
    if facts.apt and facts.apt.errors:
        lines += [("  apt errors  " if i == 0 else " " * 14) + e for i, e in enumerate(facts.apt.errors)]
    return lines

def handle_node(args: argparse.Namespace) -> int:
    client = ControllerClient.from_args(args)
    n = client.get(f"/nodes/{args.hostname}")
    n["verification"] = client.get(f"/verify/nodes/{args.hostname}")  # degraded, diagnosis, re-plan, results
    n["rollouts"] = client.get(f"/rollouts/nodes/{args.hostname}", limit=10)["rollouts"]  # its state in each
    try:  # the attention recommendation (controller/attention.py); an older controller has no such route
        n["attention"] = client.get(f"/attention/nodes/{args.hostname}")
    except FleetError as exc:
        n["attention"] = {"error": exc.message}
    if print_structured(args, n):
        return 0
    try:  # the stored facts JSON, parsed once; the controller says why when they do not parse (facts_error)
        facts: NodeFacts | None = parse_node(n["facts"])
    except FactsError as exc:
        facts = None
        n["facts_error"] = n.get("facts_error") or f"{exc.message} (the node's next facts report replaces them)"
    n = terminal_safe_tree(n)  # node-reported text is printed below: no escape sequences or newlines from it
    ident = n.get("identity") or {}
    print(f"{n['hostname']}{'  [SIMULATED]' if n['simulated'] else ''}")
    print(f"  status      {n['status']} (since {n['status_changed_at']}), last seen {n['last_seen']}")
    print(f"  agent       {ident.get('agent_id')} enrolled {ident.get('enrolled_at')}"
          f"{'  REVOKED' if ident.get('revoked') else ''}, version {n.get('agent_version') or 'not reported'}"
          + (f" ({n['agent_support']}: outside the versions this controller supports; see `fleetctl nodes`)"
             if n.get("agent_support") in ("too-old", "too-new") else ""))
    if n.get("cert_expires_at"):
        print(f"  certificate expires {n['cert_expires_at'][:19]} (UTC; the agent renews it when a third is left)")
    print(f"  labels      {', '.join(f'{k}={v}' for k, v in (n.get('labels') or {}).items()) or 'none'}")
    if facts is None:
        print(f"  facts       unreadable: {n['facts_error']}")
    else:
        print("\n".join(terminal_safe(line) for line in facts_lines(facts)))  # node-reported text, made safe
    print("\nfacts history (newest first):")
    for h in n["history"]:
        changed = ", ".join(h["changed"]) if h["changed"] != ["*"] else "(first report)"
        print(f"  {h['at'][:19]}  {changed}")
        if h["changed"] != ["*"]:
            for k in h["changed"]:
                print(f"      {k}: {h['old'].get(k)!r} → {h['new'].get(k)!r}")
    print("\nstatus history (newest first):")
    for e in n["status_history"]:
        print(f"  {e['at'][:19]}  {e['old'] or '-'} → {e['new']}  ({e['reason']})")
    print("\nrollouts (newest first):")
    for r in n["rollouts"]:
        step = f" at {r['step']}" if r["step"] and r["state"] not in TERMINAL else ""
        print(f"  {r['rollout_id']}  flash-attn {r['version']}  {r['variant'] or '-'}: {r['state']}{step}"
              f"  (rollout {r['rollout_status']})  {r['cause']}")
    if not n["rollouts"]:
        print(f"  none (`fleetctl rollout flash-attn --nodes {n['hostname']}`)")
    print_node_health(n["verification"])
    if "error" in n["attention"]:
        print(f"\nattention: unavailable ({n['attention']['error']})")
    else:
        print("\n".join(render_node(n["attention"])))
    return 0
