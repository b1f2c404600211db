"""``fleetctl version``: this installation's version, and the controller's when it answers."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.fleet.cli import add_output_args, print_structured, version_line
from fleetctl.fleet.errors import FleetError
from fleetctl.fleet.version import local_versions


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("version", help="print fleetctl's version and the controller's",
                              description="Print this fleetctl's version, Python and platform, and the version "
                                          "of the controller (GET /api/v1/live) when it can be reached.")
    add_output_args(p, what="the versions")
    add_controller_args(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {"client": local_versions()}
    try:  # an unreachable controller is part of the answer, not an error: the local version still matters
        client = ControllerClient.from_args(args, token_required=False)
        out["controller"] = {"url": client.base_url, "version": client.get("/live").get("version", "unknown")}
    except FleetError as exc:
        out["controller"] = {"error": exc.message}
    if print_structured(args, out):
        return 0
    print(version_line(args.program, out["client"]))
    ctl = out["controller"]
    print(f"controller {ctl['version']} at {ctl['url']}" if "version" in ctl
          else f"controller: not reachable ({ctl['error']})")
    return 0
