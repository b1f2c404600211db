"""``fleet-controller``: serves the agent API, the dashboard and the CLI API."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fleetctl.fleet.cli import main_for

COMMAND_MODULES: list[str] = [
    # one line per command group; each module exposes register(subparsers)
    "fleetctl.controller.commands.serve",
    "fleetctl.controller.commands.config",
    "fleetctl.controller.commands.fleet",
    "fleetctl.controller.commands.users",
    "fleetctl.controller.commands.ca",
]


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("fleet-controller", "Run the fleet controller.", COMMAND_MODULES, argv)


if __name__ == "__main__":
    sys.exit(main())
