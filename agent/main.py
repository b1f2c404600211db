"""``fleet-agent``: runs on each GPU node."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fleet.cli import build_parser, run

COMMAND_MODULES: list[str] = [
    # one line per command group; each module exposes register(subparsers)
    "agent.commands.facts",
    "agent.commands.run",
]


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    modules = [importlib.import_module(name) for name in COMMAND_MODULES]
    parser = build_parser("fleet-agent", "Probe this GPU node and work for the fleet controller.", modules)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
