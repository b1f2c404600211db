"""``fleet-controller``: serves the agent API, the dashboard and the CLI API."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fleet.cli import build_parser, run

COMMAND_MODULES: list[str] = [
    # one line per command group; each module exposes register(subparsers)
    "controller.commands.serve",
    "controller.commands.fleet",
    "controller.commands.users",
]


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    parser = build_parser("fleet-controller", "Run the fleet controller.", modules)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
