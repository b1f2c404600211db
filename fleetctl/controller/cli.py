"""``fleetctl``: the operator's command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fleetctl.controller.client import add_controller_args
from fleetctl.fleet.cli import main_for

COMMAND_MODULES: list[str] = [
    # one line per command group; each module exposes register(subparsers)
    "fleetctl.controller.commands.plan",
    "fleetctl.controller.commands.catalog",
    "fleetctl.controller.commands.diagnose",
    "fleetctl.controller.commands.nodes",
    "fleetctl.controller.commands.labels",
    "fleetctl.controller.commands.tokens",
    "fleetctl.controller.commands.jobs",
    "fleetctl.controller.commands.artifacts",
    "fleetctl.controller.commands.bundle",
    "fleetctl.controller.commands.agents",
    "fleetctl.controller.commands.rollout",
    "fleetctl.controller.commands.verify",
    "fleetctl.controller.commands.schedule",
    "fleetctl.controller.commands.attention",
    "fleetctl.controller.commands.version",
    "fleetctl.controller.commands.contexts",
]


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("fleetctl", "Get FlashAttention onto every GPU node of a fleet.", COMMAND_MODULES, argv,
                    global_options=add_controller_args)


if __name__ == "__main__":
    sys.exit(main())
