"""``fleetctl label NODE KEY=VALUE… KEY-…``: set and remove a node's user labels.

The syntax is Kubernetes' (controller/labels.py, the one parser, which the controller applies again); the labels
are the registry's (``POST /api/v1/nodes/HOST/labels``, an operator's change, audited). Every command that takes
nodes selects by them with ``-l`` (docs/cli.md, "Labels and selectors").
"""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.controller.labels import parse_label_changes
from fleetctl.fleet.cli import print_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("label", help="set or remove a node's labels (KEY=VALUE sets, KEY- removes)",
                              description="Set (KEY=VALUE; an empty value is allowed) or remove (KEY-) user labels "
                                          "on a node. Keys are [prefix/]name, e.g. env or example.com/rack; select "
                                          "nodes by them with -l on nodes, rollout, verify, schedule, attention "
                                          "and bundle export.")
    p.add_argument("hostname", metavar="NODE")
    p.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
    p.add_argument("--json", action="store_true", help="print {\"hostname\", \"labels\"}")
    add_controller_args(p)
    p.set_defaults(handler=handle_label)


def handle_label(args: argparse.Namespace) -> int:
    changes = parse_label_changes(args.changes)  # refused here, before anything is sent
    out = ControllerClient.from_args(args).post(f"/nodes/{args.hostname}/labels",
                                                {"set": dict(changes.set), "remove": list(changes.remove)})
    if args.json:
        print_json(out)
        return 0
    print(f"{out['hostname']}: " + (", ".join(f"{k}={v}" for k, v in out["labels"].items()) or "no labels"))
    return 0
