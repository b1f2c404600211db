"""``fleetctl agent revoke HOST``: revoke an enrolled agent's identity (its certificate stops working)."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.fleet.cli import print_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("agent", help="manage agent identities")
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION")
    sub.required = True
    r = sub.add_parser("revoke", help="revoke the agent enrolled for HOST",
                       description="Revoke the identity enrolled for HOST: every RPC with its certificate is "
                                   "refused from now on; the node may enroll again with a new token.")
    r.add_argument("hostname", metavar="HOST")
    r.add_argument("--json", action="store_true")
    add_controller_args(r)
    r.set_defaults(handler=handle_revoke)


def handle_revoke(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).post(f"/nodes/{args.hostname}/revoke")
    if args.json:
        print_json(data)
    else:
        print(f"revoked agent(s) of {data['hostname']}: {', '.join(data['revoked'])}")
    return 0
