"""``fleetctl config use-context|get-contexts|set-context|current-context``: the contexts of fleetctl's own config
file (controller/contexts.py; docs/cli.md, "Contexts"). Nothing here talks to a controller."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleetctl.controller import contexts
from fleetctl.controller.commands.table import render
from fleetctl.fleet.cli import print_json
from fleetctl.fleet.errors import UsageError


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("config", help="fleetctl's contexts: named controllers and credentials",
                                description="Named controllers and their credentials, kubeconfig-style, in "
                                            f"~/.config/fleetctl/config.toml (${contexts.CONFIG_ENV} names another "
                                            "file). Flags win over environment variables, which win over the "
                                            "context; --context NAME picks another context for one command.")
    sub = top.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    use = sub.add_parser("use-context", help="make NAME the current context")
    use.add_argument("name", metavar="NAME")
    use.set_defaults(handler=handle_use)
    get = sub.add_parser("get-contexts", help="list the contexts (* marks the current one)")
    get.add_argument("--json", action="store_true", help="print {\"current\", \"contexts\": [...]}")
    get.set_defaults(handler=handle_get)
    cur = sub.add_parser("current-context", help="print the current context's name")
    cur.set_defaults(handler=handle_current)
    put = sub.add_parser("set-context", help="create or change a context",
                         description="Create the context NAME, or change the given fields of an existing one. "
                                     "The token file must be readable by its owner only (chmod 600).")
    put.add_argument("name", metavar="NAME")
    put.add_argument("--server", metavar="URL", help="the controller's HTTP API, e.g. https://controller:7480")
    put.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the API token (mode 0600)")
    put.add_argument("--ca", type=Path, metavar="FILE",
                     help="CA certificate the controller's HTTPS certificate must chain to (its STATE/ca/ca.pem)")
    put.add_argument("--use", action="store_true", help="also make it the current context")
    put.set_defaults(handler=handle_set)


def _load() -> contexts.ClientConfig:
    return contexts.load(contexts.config_path(os.environ))


def handle_use(args: argparse.Namespace) -> int:
    config = _load()
    config.context(args.name)  # an unknown name: error naming the known ones
    contexts.save(replace(config, current=args.name))
    print(f"current context: {args.name}")
    return 0


def handle_get(args: argparse.Namespace) -> int:
    config = _load()
    if args.json:
        print_json({"current": config.current, "contexts": [c.to_json() for c in config.contexts.values()]})
        return 0
    rows = [["*" if c.name == config.current else "", c.name, c.server, c.token_file, c.ca]
            for c in config.contexts.values()]
    print(render(rows, ["current", "name", "server", "token file", "ca"]) if rows
          else f"no contexts in {config.path} (create one: fleetctl config set-context NAME --server URL ...)")
    return 0


def handle_current(args: argparse.Namespace) -> int:
    config = _load()
    if config.current is None:
        raise UsageError(f"no current context in {config.path}", hint="fleetctl config use-context NAME")
    print(config.current)
    return 0


def handle_set(args: argparse.Namespace) -> int:
    config = _load()
    if args.server is not None and not args.server.startswith(("http://", "https://")):
        raise UsageError(f"--server {args.server!r} is not an http(s) URL", hint="e.g. --server https://controller:7480")
    token_file = args.token_file.expanduser().resolve() if args.token_file else None
    ca = args.ca.expanduser().resolve() if args.ca else None
    if token_file is not None:
        contexts.check_token_file(token_file)
    if ca is not None and not ca.is_file():
        raise UsageError(f"--ca {ca}: no such file", hint="give the controller's CA certificate (STATE/ca/ca.pem)")
    old = config.contexts.get(args.name) or contexts.Context(args.name)
    new = contexts.Context(args.name, args.server or old.server, token_file or old.token_file, ca or old.ca)
    current = args.name if args.use or config.current is None else config.current
    contexts.save(replace(config, current=current, contexts={**config.contexts, args.name: new}))
    print(f"context {args.name} {'changed' if args.name in config.contexts else 'created'} in {config.path}"
          + (" (current)" if current == args.name else ""))
    return 0
