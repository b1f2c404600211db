"""``fleetctl plan``: decide per node how to get FlashAttention onto it (offline, DESIGN §3.2)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from fleetctl.controller.catalog import Catalog, default_catalog, load_catalog_file
from fleetctl.controller.resolver import Decision, Policy, resolve_fleet
from fleetctl.controller.resolver.model import WORKLOADS
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import FactsError, InputError, NotFoundError
from fleetctl.fleet.facts import MAX_FACTS_BYTES, NodeFacts, parse_fleet
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR

MAX_FLEET_BYTES = 64 * 1024 * 1024


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("plan", help="decide how to install FlashAttention on each node (offline)",
                                   description="Read node facts and print, per node, the variant, artifact, "
                                               "toolkit and steps, with reasons (DESIGN §3.2).")
    parser.add_argument("--facts", required=True, metavar="FILE", help='{"nodes": [...]} facts file, or - for stdin')
    parser.add_argument("--catalog", metavar="FILE", help="wheel catalog (JSON or one filename per line); "
                                                          "default: built-in upstream wheels + user additions")
    parser.add_argument("--version", metavar="V",
                        help="target FA2 release (default: newest FA2 release in the catalog)")
    parser.add_argument("--policy", metavar="FILE", help='policy JSON: {"version", "fa3", "fa4", "source_builds"}')
    parser.add_argument("--fa3", action="store_true", help="build FA3 (hopper/) on Hopper nodes")
    parser.add_argument("--fa4", action="store_true", help="install FA4 (flash-attn-4) where it runs")
    parser.add_argument("--prefer", choices=("compatible", "fastest"),
                        help="fastest: plan the implementation measured fastest for --workload among those the "
                             "node may install (offline: the built-in prior of real measurements); default "
                             "compatible (FA2)")
    parser.add_argument("--workload", choices=WORKLOADS,
                        help="what --prefer fastest and the recommendation measure (default training)")
    parser.add_argument("--state-dir", default=os.environ.get("FLEETCTL_STATE_DIR", str(DEFAULT_STATE_DIR)),
                        help="controller state dir holding user catalog additions (catalog.json)")
    parser.add_argument("--explain", metavar="HOST", help="print the full reasoning for one node")
    parser.add_argument("--json", action="store_true", help="print the §3.2 JSON object")
    parser.set_defaults(handler=run_plan)


def read_text_arg(path: str, what: str, limit: int) -> str:
    """Read a file argument (``-`` is stdin), as InputError on any failure."""
    try:
        if path == "-":
            return sys.stdin.read(limit + 1)
        with open(path, encoding="utf-8") as handle:
            text = handle.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}", hint=f"check the {what} path") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text", hint=f"give a JSON {what}") from None
    if len(text) > limit:
        raise InputError(f"{what} {path} is larger than {limit // (1024 * 1024)} MiB", hint="split the fleet")
    return text


def load_fleet(path: str) -> list[NodeFacts | FactsError]:
    text = read_text_arg(path, "facts file", MAX_FLEET_BYTES)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FactsError(f"facts file {path} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         hint='the file must look like {"nodes": [node, ...]} (DESIGN §3.1)') from None
    entries = parse_fleet(obj)
    if not entries:
        raise FactsError(f"facts file {path} lists no nodes", field="nodes",
                         hint="add at least one node object (fleet-agent facts --json prints one)")
    items = obj.get("nodes", [obj])
    for i, item in enumerate(items):  # one node's facts are capped like the agent caps them
        if len(json.dumps(item)) > MAX_FACTS_BYTES and not isinstance(entries[i], FactsError):
            entries[i] = FactsError(f"facts larger than {MAX_FACTS_BYTES // 1024} KiB", node=f"#{i}")
    return entries


def policy_from_args(args: argparse.Namespace) -> Policy:
    """Policy file first, then flags on top (a flag always wins, and is never silently ignored)."""
    policy = Policy.load(Path(args.policy)) if args.policy else Policy()
    version = Policy.check_version(args.version) if args.version else policy.version
    return Policy(version=version, fa3=policy.fa3 or args.fa3, fa4=policy.fa4 or args.fa4,
                  source_builds=policy.source_builds, prefer=getattr(args, "prefer", None) or policy.prefer,
                  workload=getattr(args, "workload", None) or policy.workload)


def catalog_from_args(args: argparse.Namespace) -> Catalog:
    if args.catalog:
        return load_catalog_file(Path(args.catalog))
    return default_catalog(Path(args.state_dir))


def gpu_summary(decision_facts: NodeFacts | FactsError) -> str:
    if isinstance(decision_facts, FactsError) or not decision_facts.gpus:
        return "-"
    gpus = decision_facts.gpus
    name = gpus[0].name.removeprefix("NVIDIA ")
    return f"{len(gpus)}× {name} ({gpus[0].compute_capability})" if len(gpus) > 1 else \
        f"{name} ({gpus[0].compute_capability})"


def render_table(entries: list[NodeFacts | FactsError], decisions: list[Decision]) -> str:
    rows = [("NODE", "GPU", "VARIANT", "VERSION", "ARTIFACT / TOOLKIT", "STEPS")]
    for facts, d in zip(entries, decisions, strict=True):
        what = d.artifact or (f"toolkit {d.toolkit}" if d.toolkit else "") or "-"
        rows.append((d.hostname, gpu_summary(facts), d.variant, d.flash_attn_version or "-", what,
                     ",".join(d.steps) or ("manual: not executed by the agent yet" if d.execution else "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.variant] = counts.get(d.variant, 0) + 1
    lines.append("")
    lines.append(f"{len(decisions)} node(s): " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return "\n".join(lines)


def render_explain(d: Decision) -> str:
    out = [f"{d.hostname}: {d.variant}" + (f" flash-attn {d.flash_attn_version}" if d.flash_attn_version else "")]
    if d.artifact:
        out.append(f"  artifact: {d.artifact}")
    if d.toolkit:
        out.append(f"  toolkit:  CUDA {d.toolkit}")
    out.append(f"  steps:    {' → '.join(d.steps) or '(none)'}")
    if d.execution:
        out.append(f"  {d.execution}; run by hand:")
        out.extend(f"    {c}" for c in d.commands)
    out.append("why:")
    out.extend(f"  - {r}" for r in d.reasons)
    if d.build is not None:
        out.append("build:")
        out.extend(f"  {k}={v}" for k, v in d.build.env.items())
        out.append(f"  estimated: {d.build.estimated_minutes} min")
        out.append(f"  build key: {d.build.build_key}")
    out.append("rejected:")
    out.extend(f"  - {r.candidate}: {r.reason}" for r in d.rejected)
    return "\n".join(out)


def run_plan(args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    catalog = catalog_from_args(args)
    entries = load_fleet(args.facts)
    # offline: no store, so the recommendation reads the built-in prior of real measurements only
    from fleetctl.controller import (
        attention,  # local: ~0.15 s (the verification store's tables) `fleetctl --help` need not load
    )

    measured = {f.hostname: attention.recommend(attention.NodeContext.of(f), attention.builtin_prior(),
                                                attention.profile(policy.workload),
                                                attention.install_costs(f, catalog)).as_measurements()
                for f in entries if isinstance(f, NodeFacts)} if policy.prefer == "fastest" else None
    decisions = resolve_fleet(entries, catalog, policy, measured)
    unreadable = [e for e in entries if isinstance(e, FactsError)]
    for error in unreadable:
        print(f"error[{error.code}]: {error.message}", file=sys.stderr)
    if args.explain:
        chosen = [d for d in decisions if d.hostname == args.explain]
        if not chosen:
            raise NotFoundError(f"no node {args.explain!r} in {args.facts}",
                                hint="use a hostname from the facts file (fleetctl plan --facts FILE lists them)")
        facts = next(f for f in entries if isinstance(f, NodeFacts) and f.hostname == args.explain) \
            if any(isinstance(f, NodeFacts) and f.hostname == args.explain for f in entries) else None
        recs = attention.recommend_for(facts, catalog, ()) if facts is not None and facts.gpus else []
        if args.json:
            print_json({**chosen[0].to_json(), "attention": [r.to_json() for r in recs]})
        else:
            print(render_explain(chosen[0]))
            if recs:
                print("attention (built-in prior of real measurements; `fleetctl node` adds the node's own):")
                print("\n".join(attention.render(recs)))
    elif args.json:
        print_json({"nodes": [d.to_json() for d in decisions]})
    else:
        print(render_table(entries, decisions))
    if unreadable:
        print(f"hint: {len(unreadable)} node(s) had unreadable facts and are planned as blocked; "
              "fix the fields named above", file=sys.stderr)
        return InputError.exit_code
    return 0
