"""``fleet-controller config example``: print a config file with every key at its default.

The text is made from controller/settings.py's ``FILE_KEYS``, the same list ``serve --config`` reads, so
the example cannot name a key the controller refuses or miss one it reads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fleetctl.controller import settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("config", help="the controller's config file",
                                   description="The TOML file `fleet-controller serve --config FILE` reads "
                                               "(docs/deploy.md).")
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    example = sub.add_parser("example", help="print a commented config file with every key at its default")
    example.set_defaults(handler=handle_example)


def handle_example(args: argparse.Namespace) -> int:
    sys.stdout.write(settings.config_example())
    return 0
