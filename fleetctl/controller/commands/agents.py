"""``fleetctl agents revoke|pending|approve|deny`` (also ``agent``): agent identities and the approval queue
(controller/enrollment.py)."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.controller.commands import agent_ssh
from fleetctl.controller.commands.table import render
from fleetctl.fleet.cli import print_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("agents", aliases=["agent"], help="manage agent identities and the approval queue")
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("revoke", help="revoke the agent enrolled for HOST",
                       description="Revoke the identity enrolled for HOST: every RPC with its certificate is "
                                   "refused from now on; the node may enroll again with a new token.")
    r.add_argument("hostname", metavar="HOST")
    r.add_argument("--json", action="store_true")
    add_controller_args(r)
    r.set_defaults(handler=handle_revoke)
    q = sub.add_parser("pending", help="enrollments waiting for approval",
                       description="List the enrollments waiting for an operator (tokens created with --approval, "
                                   "or a controller started with --enroll-approval).")
    q.add_argument("--json", action="store_true")
    add_controller_args(q)
    q.set_defaults(handler=handle_pending)
    for action, what in (("approve", "issue HOST's certificate: its waiting agent starts working"),
                         ("deny", "refuse HOST's enrollment: its waiting agent stops with an error")):
        a = sub.add_parser(action, help=what, description=what[0].upper() + what[1:] + " (audited).")
        a.add_argument("hostname", metavar="HOST")
        a.add_argument("--json", action="store_true")
        add_controller_args(a)
        a.set_defaults(handler=handle_decision, decision=action)
    agent_ssh.register(sub)  # install | upgrade | uninstall over SSH, and the agent wheels they copy


def handle_pending(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/agents/pending")
    if args.json:
        print_json(data)
        return 0
    print(render([[p["hostname"], p["source"], p["requested_at"][:19], p["token_id"], p["agent_id"]]
                  for p in data["pending"]], ["host", "from", "requested (UTC)", "token", "agent id"]))
    return 0


def handle_decision(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).post(f"/agents/{args.hostname}/{args.decision}")
    if args.json:
        print_json(data)
    else:
        print(f"{data['hostname']}: {'approved' if args.decision == 'approve' else 'denied'}")
    return 0


def handle_revoke(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).post(f"/nodes/{args.hostname}/revoke")
    if args.json:
        print_json(data)
    else:
        print(f"revoked agent(s) of {data['hostname']}: {', '.join(data['revoked'])}")
    return 0
