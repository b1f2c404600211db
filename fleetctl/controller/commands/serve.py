"""``fleet-controller serve``: run the controller (gRPC for agents, HTTP API) until SIGINT/SIGTERM.

The flags, and the environment variables they override, are controller/settings.py's; this command only
reads them into ``ControllerSettings`` once and hands that to the composition root (controller/app.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from fleetctl.controller import settings
from fleetctl.fleet.text import install_safe_logging


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the controller",
                              description="Serve the agent API (gRPC, mutual TLS; enrollment on the next port) "
                                          "and the HTTP API in one process. Writes STATE/controller.json.")
    settings.add_arguments(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    chosen = settings.settings_from(args, os.environ)
    # every message one line, control characters escaped: node- and client-supplied text is logged (fleet/text.py)
    install_safe_logging(chosen.log_level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from fleetctl.controller.app import (
        serve,  # local: the whole controller (FastAPI, gRPC: ~1 s), not at every start-up
    )

    return asyncio.run(serve(chosen))
