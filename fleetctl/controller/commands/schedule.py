"""``fleetctl schedule add|list|remove``: scheduled re-verification (run by the controller).

``schedule add "0 3 * * *" --nodes SELECTOR [--quick]`` stores a schedule in the controller's database;
the controller's scheduler runs it (cron in UTC), once per due time even with several controllers on
one database. See docs/verification.md, "Schedules".
"""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args, add_label_selector_arg
from fleetctl.controller.commands.table import render
from fleetctl.fleet.cli import print_json


def _actor() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("schedule", help="scheduled re-verification: add, list, remove",
                                description="Re-verify nodes on a cron schedule (UTC), run by the controller.")
    sub = top.add_subparsers(dest="schedule_command", metavar="COMMAND", required=True)

    a = sub.add_parser("add", help="add a schedule", description='e.g. fleetctl schedule add "0 3 * * *" '
                       "--nodes gpu=H100 --quick")
    a.add_argument("cron", metavar="CRON", help='5-field cron expression in UTC, e.g. "0 3 * * *"')
    a.add_argument("--nodes", default="all", metavar="SELECTOR",
                   help="node selector as in rollouts (default: all)")
    add_label_selector_arg(a)
    a.add_argument("--quick", action="store_true", help="quick verification (default: full)")
    a.add_argument("--json", action="store_true", help="print the schedule as JSON")
    add_controller_args(a)
    a.set_defaults(handler=handle_add)

    ls = sub.add_parser("list", help="list schedules with their last and next run")
    ls.add_argument("--json", action="store_true", help="print {\"schedules\": [...]} as JSON")
    add_controller_args(ls)
    ls.set_defaults(handler=handle_list)

    rm = sub.add_parser("remove", help="remove a schedule")
    rm.add_argument("id", type=int, metavar="ID")
    rm.add_argument("--json", action="store_true", help="print the removed schedule as JSON")
    add_controller_args(rm)
    rm.set_defaults(handler=handle_remove)


def handle_add(args: argparse.Namespace) -> int:
    # local: the schedule owner brings croniter and the store's tables (~30 ms) that `fleetctl --help` need not load
    from fleetctl.controller.verify_store.schedules import parse_cron

    parse_cron(args.cron)  # a clear error before talking to the controller
    row = ControllerClient.from_args(args).post("/schedules", {"cron": args.cron, "selector": args.nodes,
                                                                "labels": args.labels,
                                                               "mode": "quick" if args.quick else "full",
                                                               "actor": _actor()})
    if args.json:
        print_json(row)
    else:
        print(f"schedule {row['id']}: {row['cron']} on {row['selector']} ({row['mode']}), next run "
              f"{row['next_run_at'][:19]} UTC")
    return 0


def handle_list(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/schedules")
    if args.json:
        print_json(data)
        return 0
    rows = [[s["id"], s["cron"], s["selector"], s["mode"], (s["last_run_at"] or "")[:19] or None,
             s["next_run_at"][:19], s["created_by"]] for s in data["schedules"]]
    print(render(rows, ["id", "cron (UTC)", "nodes", "mode", "last run", "next run", "by"]))
    return 0


def handle_remove(args: argparse.Namespace) -> int:
    row = ControllerClient.from_args(args).request("DELETE", f"/schedules/{args.id}")
    if args.json:
        print_json(row)
    else:
        print(f"removed schedule {row['id']} ({row['cron']} on {row['selector']})")
    return 0
