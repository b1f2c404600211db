"""``fleet-controller user add|list|remove``: dashboard accounts (roles ``viewer``, ``operator``, ``admin``,
and ``metrics``: a scrape-only account for Prometheus, with an API token and no password);
``fleet-controller user token create|list|revoke``: their API tokens for fleetctl (controller/api_tokens.py).

Runs on the controller host against its database (``--state-dir``/``--db`` as for ``serve``).
The password is read from stdin with ``--password-stdin`` (first line), else prompted twice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from fleetctl.controller.api_tokens import create_token, list_tokens, revoke_token
from fleetctl.controller.dashboard_sessions import live_sessions_by_user
from fleetctl.controller.store.db import Store, open_store, utcnow
from fleetctl.controller.users import METRICS_ROLE, ROLES, validate_name
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.statedir import DEFAULT_STATE_DIR

# The user handlers import the dashboard's accounts (controller.web.auth: FastAPI and scrypt, ~1 s) when they run,
# not here: the command line imports every command module to build its parser, and `--help` should not pay for them.


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("user", help="dashboard users: add, list, remove",
                                   description="Manage dashboard users and their API tokens (metrics: may only scrape "
                                               "/metrics, viewer: read-only, operator: may steer rollouts and "
                                               "verification, admin: everything).")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="controller state dir")
    parser.add_argument("--db", metavar="URL", help="database URL (default sqlite:///STATE/controller.db)")
    sub = parser.add_subparsers(dest="user_command", metavar="ACTION")
    sub.required = True
    add = sub.add_parser("add", help="create a user (or --replace an existing one)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="viewer",
                     help="metrics: a Prometheus scrape account (no password asked; give it an API token with "
                          "`user token create NAME`)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    add.add_argument("--replace", action="store_true", help="change role and password of an existing user")
    add.set_defaults(handler=_add)
    lister = sub.add_parser("list", help="list users and their live dashboard sessions")
    lister.add_argument("--json", action="store_true")
    lister.set_defaults(handler=_list)
    rm = sub.add_parser("remove", help="delete a user (their sessions end at once)")
    rm.add_argument("name")
    rm.set_defaults(handler=_remove)
    tok = sub.add_parser("token", help="API tokens for fleetctl: create, list, revoke",
                         description="Bearer tokens for the JSON API that act as the user, with the user's role "
                                     "(fleetctl: $FLEETCTL_TOKEN or --token-file). Only a hash is stored.")
    tsub = tok.add_subparsers(dest="token_command", metavar="ACTION")
    tsub.required = True
    tc = tsub.add_parser("create", help="create a token for user NAME (printed once)")
    tc.add_argument("name")
    tc.add_argument("--ttl", default="30d", help="validity, e.g. 12h, 30d, 365d at most (default 30d)")
    tc.add_argument("--json", action="store_true")
    tc.set_defaults(handler=_token_create)
    tl = tsub.add_parser("list", help="list tokens (never the token itself)")
    tl.add_argument("name", nargs="?", help="only this user's tokens")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(handler=_token_list)
    tr = tsub.add_parser("revoke", help="revoke a token by id or prefix (as listed), effective at once")
    tr.add_argument("ref")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(handler=_token_revoke)


def _store(args: argparse.Namespace) -> Store:
    url = args.db or f"sqlite:///{(args.state_dir / 'controller.db').resolve()}"
    return open_store(url)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsageError("no terminal to prompt for a password", hint="pass --password-stdin and pipe it in")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the passwords differ", hint="run the command again")
    return first


def _add(args: argparse.Namespace) -> int:
    from fleetctl.controller.web.auth import add_user  # local: FastAPI and scrypt (~1 s), see above
    validate_name(args.name)
    # a metrics account never logs in (the dashboard refuses it): its password is a random secret nobody knows
    password = secrets.token_urlsafe(32) if args.role == METRICS_ROLE else _password(args)
    store = _store(args)
    try:
        user = add_user(store, args.name, args.role, password, replace=args.replace)
    finally:
        store.close()
    if user.role == METRICS_ROLE:
        print(f"user {user.name} ({user.role}) saved; give Prometheus its token: "
              f"`fleet-controller user token create {user.name} --ttl 365d` (docs/dashboard.md, /metrics)")
    else:
        print(f"user {user.name} ({user.role}) saved; log in at the controller's http address /login")
    return 0


def _list(args: argparse.Namespace) -> int:
    from fleetctl.controller.web.auth import list_users  # local: FastAPI and scrypt (~1 s), see above
    store = _store(args)
    try:
        users = list_users(store)
        with store.session() as s:
            live = live_sessions_by_user(s, utcnow())
    finally:
        store.close()
    rows = [{"name": u.name, "role": u.role, "created_at": u.created_at.isoformat(),
             "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None, "disabled": u.disabled,
             "sessions": live[u.id].count if u.id in live else 0,
             "session_last_used_at": live[u.id].last_seen_at.isoformat() if u.id in live else None}
            for u in users]
    if args.json:
        print_json({"users": rows})
        return 0
    for u in users:
        login = u.last_login_at.isoformat()[:19] if u.last_login_at else "never"
        sessions = live.get(u.id)
        used = f"{sessions.count} live session(s), last used {sessions.last_seen_at.isoformat()[:19]}" \
            if sessions else "no live session"
        print(f"{u.name:<24} {u.role:<9} last login {login:<19}  {used}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from fleetctl.controller.web.auth import remove_user  # local: FastAPI and scrypt (~1 s), see above
    store = _store(args)
    try:
        remove_user(store, args.name)
    finally:
        store.close()
    print(f"user {args.name} removed")
    return 0


def _local_actor() -> str:
    """Audit actor of token commands run on the controller host: the OS user who ran them."""
    try:
        return f"host:{os.environ.get('USER') or getpass.getuser()}"
    except (KeyError, OSError):
        return "host:unknown"


def _token_create(args: argparse.Namespace) -> int:
    from fleetctl.controller.commands.tokens import (
        parse_ttl,  # local: fleetctl's module, its HTTP client (httpx) with it
    )
    ttl = dt.timedelta(seconds=parse_ttl(args.ttl))
    store = _store(args)
    try:
        token, listing = create_token(store, args.name, ttl, actor=_local_actor())
    finally:
        store.close()
    if args.json:
        print_json({"token": token, **listing})
        return 0
    print(token)
    print(f"API token {listing['id']} ({listing['prefix']}…) for {listing['user']} ({listing['role']}), expires "
          f"{listing['expires_at']}; shown once — give it to fleetctl as $FLEETCTL_TOKEN or --token-file FILE",
          file=sys.stderr)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        rows = list_tokens(store, args.name)
    finally:
        store.close()
    if args.json:
        print_json({"tokens": rows})
        return 0
    for r in rows:
        print(f"{r['id']:>4}  {r['prefix']}…  {r['user']:<20} {r['role']:<9} {r['state']:<8} "
              f"expires {r['expires_at'][:19]}  last used {(r['last_used_at'] or 'never')[:19]}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        listing = revoke_token(store, args.ref, actor=_local_actor())
    finally:
        store.close()
    if args.json:
        print_json(listing)
        return 0
    print(f"API token {listing['id']} ({listing['prefix']}…) of {listing['user']} revoked")
    return 0
