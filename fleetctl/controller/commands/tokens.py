"""``fleetctl token create|list|revoke``: one-time enrollment tokens for agents."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.client import ControllerClient, add_controller_args
from fleetctl.controller.commands.table import render
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """'90s', '15m', '24h', '7d' or plain seconds → seconds."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _UNITS:
            return int(float(text[:-1]) * _UNITS[text[-1]])
        return int(text)
    except ValueError as exc:
        raise UsageError(f"bad --ttl {text!r}", hint="use e.g. 30m, 24h, 7d or seconds") from exc


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("token", help="enrollment tokens for agents",
                              description="Create, list and revoke one-time enrollment tokens.")
    sub = p.add_subparsers(dest="token_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("create", help="create a one-time token (printed once)")
    c.add_argument("--ttl", default="24h", help="validity, e.g. 30m, 24h, 7d (default 24h)")
    c.add_argument("--hostname", metavar="H", help="only an agent enrolling as H may use it")
    c.add_argument("--json", action="store_true")
    add_controller_args(c)
    c.set_defaults(handler=handle_create)
    ls = sub.add_parser("list", help="list tokens (never their secret)")
    ls.add_argument("--json", action="store_true")
    add_controller_args(ls)
    ls.set_defaults(handler=handle_list)
    r = sub.add_parser("revoke", help="revoke a token by id or prefix")
    r.add_argument("token", metavar="ID|PREFIX|TOKEN")
    r.add_argument("--json", action="store_true")
    add_controller_args(r)
    r.set_defaults(handler=handle_revoke)


def handle_create(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).post("/tokens", {"ttl_seconds": parse_ttl(args.ttl),
                                                             "hostname": args.hostname})
    if args.json:
        print_json(data)
    else:
        print(data["token"])
    return 0


def handle_list(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).get("/tokens")
    if args.json:
        print_json(data)
        return 0
    print(render([[t["id"], t["prefix"] + "…", t["state"], t["hostname"], t["expires_at"][:19], t["used_by"]]
                  for t in data["tokens"]], ["id", "prefix", "state", "hostname", "expires (UTC)", "used by"]))
    return 0


def handle_revoke(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).post(f"/tokens/{args.token}/revoke")
    if args.json:
        print_json(data)
    else:
        print(f"token {data['id']} ({data['prefix']}…) revoked")
    return 0
