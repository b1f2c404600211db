"""``fleet-agent``: runs on each GPU node."""

from __future__ import annotations

import os
import sys

# The agent forks playbooks (ansible-runner → pexpect) and benchmarks while its grpc.aio channel is busy in
# other threads. gRPC's fork handlers then abort the child ("ev_epoll1_linux.cc Check failed: next_worker->state
# == KICKED"); every child here execs at once and never uses gRPC, so they are turned off before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
from collections.abc import Sequence

from fleetctl.fleet.cli import main_for

COMMAND_MODULES: list[str] = [
    # one line per command group; each module exposes register(subparsers)
    "fleetctl.agent.commands.facts",
    "fleetctl.agent.commands.run",
]


def main(argv: Sequence[str] | None = None) -> int:
    return main_for("fleet-agent", "Probe this GPU node and work for the fleet controller.", COMMAND_MODULES, argv)


if __name__ == "__main__":
    sys.exit(main())
