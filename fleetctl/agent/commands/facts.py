"""``fleet-agent facts``: print this node's facts (DESIGN §3.1), probed for real or from a profile."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fleetctl.agent.probes import collect_facts
from fleetctl.agent.profiles import load_profile
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.facts import NodeFacts, parse_node


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "facts", help="print this node's facts",
        description="Probe NVML, nvcc, the target Python (torch, flash-attn), the OS and optionally apt, "
                    "and print the node's facts. Probe failures are reported as facts with reasons "
                    "(on stderr with --json), never as errors.")
    parser.add_argument("--json", action="store_true", help="print exactly the DESIGN §3.1 node object")
    parser.add_argument("--python", metavar="PATH",
                        help="the target interpreter to probe (default: $FLEET_TARGET_PYTHON, else python3 on PATH)")
    parser.add_argument("--apt", action="store_true", help="also run `apt-get update` and report its W:/E: lines")
    parser.add_argument("--root", metavar="DIR", help="with --apt: run apt-get inside this root (chroot DIR)")
    parser.add_argument("--apt-option", metavar="KEY=VALUE", action="append", default=[],
                        help="with --apt: pass `-o KEY=VALUE` to apt-get (repeatable)")
    parser.add_argument("--simulate", metavar="PROFILE",
                        help="report the facts of a simulation profile instead of probing (see docs/profiles.md)")
    parser.add_argument("--hostname", metavar="H", help="the hostname to report (default: this machine's)")
    parser.set_defaults(handler=handle)


def gather(args: argparse.Namespace) -> NodeFacts:
    if args.simulate:
        facts = load_profile(args.simulate, args.hostname)
    else:
        facts = collect_facts(args.python, check_apt=args.apt, root=args.root, hostname=args.hostname,
                              apt_options=args.apt_option)
    # What we print must be what the controller accepts: re-parse our own output (FactsError if not).
    # (through JSON: NodeFacts.to_json keeps tuples, which the strict parser refuses as lists)
    parse_node(json.loads(json.dumps(facts.to_json())))
    return facts


def handle(args: argparse.Namespace) -> int:
    facts = gather(args)
    problems = [str(p) for p in facts.extra.get("probe_errors", [])]
    if args.json:
        print_json(facts.to_json())
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        return 0
    print(summary(facts))
    return 0


def summary(facts: NodeFacts) -> str:
    """A few lines for people."""
    simulated = f" (simulated: {facts.extra.get('profile')})" if facts.extra.get("simulated") else ""
    lines = [f"{facts.hostname}{simulated}"]
    o = facts.os
    lines.append(f"  os        {o.id} {o.version_id} {o.arch}, kernel {o.kernel}, glibc {o.glibc or 'unknown'}")
    lines.append(f"  resources {facts.resources.cpu_cores} cores, {facts.resources.memory_mib} MiB")
    lines.append(f"  driver    {facts.driver.version} (CUDA {facts.driver.cuda_max} max)" if facts.driver
                 else "  driver    none")
    if facts.gpus:
        for gpu in facts.gpus:
            lines.append(f"  gpu {gpu.index:<5} {gpu.name}, cc {gpu.compute_capability}, {gpu.memory_mib} MiB")
    else:
        lines.append("  gpus      none")
    lines.append(f"  toolkit   nvcc {facts.toolkit.nvcc} at {facts.toolkit.path}" if facts.toolkit
                 else "  toolkit   none")
    for tk in facts.extra.get("toolkits", []):
        if not tk.get("active"):
            lines.append(f"            also nvcc {tk.get('nvcc')} at {tk.get('path')}")
    lines.append(f"  python    {facts.python.version} at {facts.python.executable}")
    if facts.torch:
        t = facts.torch
        lines.append(f"  torch     {t.version}, CUDA {t.cuda or 'none (CPU-only)'}, cxx11abi {t.cxx11abi}, "
                     f"archs {' '.join(t.arch_list) or 'none'}")
    else:
        lines.append("  torch     not installed")
    lines.append(f"  flash-attn {facts.flash_attn.version} ({facts.flash_attn.variant})" if facts.flash_attn
                 else "  flash-attn not installed")
    if facts.apt is not None:
        lines.append(f"  apt       {len(facts.apt.errors)} problem line(s)" if facts.apt.errors
                     else "  apt       healthy")
        lines.extend(f"            {line}" for line in facts.apt.errors)
    for problem in facts.extra.get("probe_errors", []):
        lines.append(f"  note      {problem}")
    return "\n".join(lines)
