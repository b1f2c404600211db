"""The one wrapper that turns exceptions into messages and exit codes, for every console script.

Each command module exposes ``register(subparsers)``; a registered handler takes the parsed
``argparse.Namespace`` and returns an exit code (0 on success). Errors raised as
``FleetError`` are printed as ``error[code]: message`` plus a ``hint:`` line and exit with
the error's ``exit_code``; anything else is a bug and says so. Exit codes are documented in
docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from fleet.errors import FleetError, UsageError
from fleet.text import terminal_safe

EXIT_OK = 0
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default exits with its own format
        raise UsageError(message, hint=f"run `{self.prog} --help` for usage")


def build_parser(prog: str, description: str, modules: Sequence[ModuleType]) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module in modules:
        module.register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    try:
        args = parser.parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except FleetError as exc:
        # messages may quote node- or client-supplied text: nothing in them may drive the terminal
        print(f"error[{exc.code}]: {terminal_safe(exc.message)}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {terminal_safe(exc.hint)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception:
        traceback.print_exc()
        print(f"error[internal]: {parser.prog} hit a bug (traceback above)", file=sys.stderr)
        print("hint: please report it with the traceback", file=sys.stderr)
        return EXIT_INTERNAL


def main_for(prog: str, description: str, module_names: Sequence[str], argv: Sequence[str] | None) -> int:
    """A console script's ``main``: import its command modules, parse, run; errors → exit codes."""
    modules = [importlib.import_module(name) for name in module_names]
    return run(build_parser(prog, description, modules), argv)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
