"""``fleetctl diagnose FILE|-``: explain a failed install/build/import log."""

from __future__ import annotations

import argparse
from typing import Any

from fleetctl.controller.commands.plan import read_text_arg
from fleetctl.controller.diagnose import diagnose
from fleetctl.fleet.cli import print_json

MAX_LOG_BYTES = 64 * 1024 * 1024
EXIT_NOTHING_FOUND = 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("diagnose", help="match a log against known FlashAttention errors",
                                   description="Print cause, remedy and plan change for every known error "
                                               "signature found in the log. Exit 1 when none matched.")
    parser.add_argument("file", metavar="FILE", help="log file, or - for stdin")
    parser.add_argument("--json", action="store_true", help='print {"diagnoses": [...]}')
    parser.add_argument("--explain", action="store_true",
                        help="also show which signature matched and why: its regex, the matched text and its "
                             "offsets, and the upstream source")
    parser.set_defaults(handler=run_diagnose)


def run_diagnose(args: argparse.Namespace) -> int:
    found = diagnose(read_text_arg(args.file, "log", MAX_LOG_BYTES))
    if args.json:
        print_json({"diagnoses": [d.to_json() for d in found]})
    elif not found:
        print("no known FlashAttention error signature found")
    for d in found if not args.json else ():
        note = " (usually not the real cause: read further)" if d.red_herring else ""
        print(f"[{d.id}] line {d.line}{note}: {d.excerpt}")
        print(f"  cause:  {d.cause}")
        print(f"  remedy: {d.remedy}")
        print(f"  plan:   {d.plan_change} ({d.action})")
        if args.explain:
            print(f"  regex:  {d.pattern}")
            print(f"  match:  {d.match!r} (characters {d.span[0]}–{d.span[1]}, line {d.line})")
            print(f"  source: {d.source}")
    return 0 if found else EXIT_NOTHING_FOUND
