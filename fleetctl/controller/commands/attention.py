"""``fleetctl attention report``: per GPU model × torch, the attention implementations measured, the
recommended one, and how many nodes run something slower than their best (rules: controller/attention.py)."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args, add_label_selector_arg
from fleetctl.controller.commands.table import render
from fleetctl.controller.resolver.model import WORKLOADS
from fleetctl.fleet.cli import add_output_args, print_structured


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("attention", help="the fastest correct attention implementation per GPU class",
                              description="Attention recommendations from stored verifications, the fleet's and "
                                          "the built-in prior of real measurements (docs/verification.md).")
    sub = p.add_subparsers(dest="attention_cmd", required=True)
    r = sub.add_parser("report", help="per GPU model × torch: implementations, medians, the recommended one")
    r.add_argument("--nodes", metavar="SELECTOR", help="node selector (default: all), e.g. gpu=H200")
    add_label_selector_arg(r)
    r.add_argument("--workload", choices=WORKLOADS, default="prefill",
                   help="training (fwd+bwd), prefill (fwd, seqlen ≥ 4096) or decode (e2e tokens/s)")
    add_output_args(r, what="the report")
    add_controller_args(r)
    r.set_defaults(handler=handle_report)


def render_report(data: dict[str, Any]) -> str:
    lines = []
    for g in data["groups"]:
        impls = [i for i in g["implementations"]]
        lines.append(f"{g['gpu_model']}  torch {g['torch']}  ({g['nodes']} node(s), {data['workload']}, {g['unit']})")
        rows = [[("* " if i["impl"] == g["recommended"] else "  ") + i["impl"],
                 f"{i['median']:.0f}" if i["median"] is not None else "-", i["source"] or "-",
                 i["excluded"] or ""] for i in impls]
        lines.append(render(rows, ["implementation", "median", "measured by", "excluded"]))
        margin = f" ({g['margin'] * 100:+.0f} % over the runner-up)" if g["margin"] is not None else ""
        lines.append(f"recommended: {g['recommended'] or 'none'}{margin}; "
                     f"{g['slower_than_best']} of {g['nodes']} node(s) run something slower than their best")
        lines.extend(f"note: {n}" for n in g["notes"])
        lines.append("")
    if data.get("unreadable_facts"):
        lines.append(f"skipped (unreadable facts): {', '.join(data['unreadable_facts'])}")
    return "\n".join(lines).rstrip() or "no nodes"


def handle_report(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/attention/report", nodes=args.nodes, labels=args.labels,
                                                      workload=args.workload)
    if not print_structured(args, data):
        print(render_report(data))
    return 0


def render_node(data: dict[str, Any]) -> list[str]:
    """`fleetctl node HOST`'s attention section (from GET /attention/nodes/HOST)."""
    out = ["\nattention (fastest correct implementation; `fleetctl attention report` for the fleet):"]
    for r in data.get("recommendations", []):
        c = r["choice"]
        running = (data.get("running") or {}).get(r["workload"])
        if c is None:
            out.append(f"  {r['workload']:<9} no recommendation: {r['notes'][0] if r['notes'] else '-'}")
            continue
        margin = f" {r['margin'] * 100:+.0f} % over {r['runner_up']}" if r["margin"] is not None else ""
        out.append(f"  {r['workload']:<9} {c['impl']} {c['value']:.0f} {r['unit']}{margin} "
                   f"({c['source']['kind']}: {c['source']['origin']}); {c['install']['text']}; running now: "
                   f"{running}")
        s = c["setting"]
        head = f'attn_implementation="{s["transformers"]}"; ' if s["transformers"] else ""
        out.append(f"            use: {head}{s['code']}" + (f" — {s['note']}" if s["note"] else ""))
    return out
