"""``fleetctl``: the operator's command line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from controller.client import add_controller_args
from fleet.cli import main_for

COMMAND_MODULES: list[str] = [
    # one line per command group; each module exposes register(subparsers)
    "controller.commands.plan",
    "controller.commands.catalog",
    "controller.commands.diagnose",
    "controller.commands.nodes",
    "controller.commands.tokens",
    "controller.commands.jobs",
    "controller.commands.artifacts",
    "controller.commands.bundle",
    "controller.commands.agents",
    "controller.commands.rollout",
    "controller.commands.verify",
    "controller.commands.schedule",
    "controller.commands.attention",
    "controller.commands.version",
]


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("fleetctl", "Get FlashAttention onto every GPU node of a fleet.", COMMAND_MODULES, argv,
                    global_options=add_controller_args)


if __name__ == "__main__":
    sys.exit(main())
