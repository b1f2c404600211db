"""``fleetctl tokens create|list|revoke`` (also ``token``): enrollment tokens for agents — one-time by default,
reusable with ``--uses N``, limited to a hostname glob or a source network, or putting agents in the approval
queue (controller/enrollment.py)."""

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
    p = subparsers.add_parser("tokens", aliases=["token"], help="enrollment tokens for agents",
                              description="Create, list and revoke enrollment tokens (one-time unless --uses N).")
    sub = p.add_subparsers(dest="token_command", metavar="ACTION")
    sub.required = True
    c = sub.add_parser("create", help="create a token (printed once)",
                       description="Create an enrollment token, printed once. One agent may enroll with it, or N "
                                   "with --uses N (each enrollment counts one use, atomically); limits combine.")
    c.add_argument("--ttl", default="24h", help="validity, e.g. 30m, 24h, 7d (default 24h)")
    c.add_argument("--uses", type=int, default=1, metavar="N", help="how many agents may enroll with it (default 1)")
    c.add_argument("--hostname", metavar="H", help="only an agent enrolling as H may use it")
    c.add_argument("--hostname-pattern", metavar="GLOB", help="only hostnames matching GLOB, e.g. 'gpu-*'")
    c.add_argument("--source-network", metavar="CIDR",
                   help="only agents connecting from this network, e.g. 10.0.0.0/8 (as the controller sees them)")
    c.add_argument("--approval", action="store_true",
                   help="agents enrolling with it wait for `fleetctl agents approve HOST`")
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
    data = ControllerClient.from_args(args).post("/tokens", {
        "ttl_seconds": parse_ttl(args.ttl), "hostname": args.hostname, "uses": args.uses,
        "hostname_pattern": args.hostname_pattern, "source_network": args.source_network, "approval": args.approval})
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
    print(render([[t["id"], t["prefix"] + "…", t["state"], f"{t.get('uses', 0)}/{t.get('max_uses', 1)}",
                   _limits(t), "approval" if t.get("approval") else "", t["expires_at"][:19], t["used_by"]]
                  for t in data["tokens"]],
                 ["id", "prefix", "state", "uses", "for", "", "expires (UTC)", "last used by"]))
    return 0


def _limits(token: dict[str, Any]) -> str:
    """Who may use the token: "gpu-01", "gpu-* from 10.0.0.0/8", or empty for anyone."""
    who = token.get("hostname") or token.get("hostname_pattern") or ""
    network = token.get("source_network")
    return f"{who} from {network}".strip() if network else who


def handle_revoke(args: argparse.Namespace) -> int:
    data = ControllerClient.from_args(args).post(f"/tokens/{args.token}/revoke")
    if args.json:
        print_json(data)
    else:
        print(f"token {data['id']} ({data['prefix']}…) revoked")
    return 0
