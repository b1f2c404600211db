"""``fleetctl job ID``: one job with its events."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.fleet.cli import add_output_args, print_structured


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("job", help="show a job and its events")
    p.add_argument("job_id", metavar="ID")
    add_output_args(p, what="the job")
    add_controller_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    j = ControllerClient.from_args(args).get(f"/jobs/{args.job_id}")
    if print_structured(args, j):
        return 0
    print(f"job {j['id']}  {j['kind']} on {j['node']}: {j['status']}" + (f" rc={j['rc']}" if j["rc"] is not None
                                                                         else ""))
    print(f"  created {j['created_at']}  dispatched {j['dispatched_at']}  finished {j['finished_at']}")
    if j["error"]:
        print(f"  error: {j['error']}")
    if j["result"]:
        print(f"  result: {json.dumps(j['result'])}")
    for e in j["events"]:
        print(f"  #{e['counter']:<4} {e['created'][11:19]}  {e['event']}  {json.dumps(e['data'])[:160]}")
    return 0
