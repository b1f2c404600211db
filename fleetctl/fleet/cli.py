"""The one wrapper that turns exceptions into messages and exit codes, for every console script.

Each command module exposes ``register(subparsers)``; a registered handler takes the parsed
``argparse.Namespace`` and returns an exit code (0 on success). Errors raised as
``FleetError`` are printed as ``error[code]: message`` plus a ``hint:`` line and exit with
the error's ``exit_code``; anything else is a bug and says so. Exit codes are documented in
docs/cli.md.

Conventions every program shares live here once: ``--version``, ``completion bash|zsh|fish``, the output formats of
read commands (``-o table|wide|json|yaml``, ``--json`` being ``-o json``) and global options, which are accepted
before the subcommand as well as after it.
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

import yaml

from fleetctl.fleet import completion
from fleetctl.fleet.errors import FleetError, UsageError
from fleetctl.fleet.text import terminal_safe
from fleetctl.fleet.version import local_versions

EXIT_OK = 0
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]
AddOptions = Callable[[argparse.ArgumentParser], None]

OUTPUT_FORMATS = ("table", "wide", "json", "yaml")
# the top-level copy of a global option is stored under this prefix, so that a subcommand's own default (None)
# cannot overwrite a value given before the subcommand (argparse copies the subparser's namespace over the parent's)
_GLOBAL_PREFIX = "global__"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default exits with its own format
        raise UsageError(message, hint=f"run `{self.prog} --help` for usage")


def build_parser(prog: str, description: str, modules: Sequence[ModuleType],
                 global_options: AddOptions | None = None) -> argparse.ArgumentParser:
    """The program's parser: every module's subcommands, ``--version``, ``completion``.

    ``global_options`` adds the options every subcommand that talks to a server takes (``--controller``, …);
    they are accepted before the subcommand too (``run`` hands them to the subcommand, whose own value wins).
    """
    parser = _Parser(prog=prog, description=description)
    parser.set_defaults(program=prog)  # for handlers that name the program (``version``)
    parser.add_argument("--version", action=_VersionAction, help="print the version, Python and platform, then exit")
    if global_options is not None:
        _add_global_options(parser, global_options)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module in modules:
        module.register(subparsers)
    if "version" not in subparsers.choices:  # a program that talks to a server registers its own (fleetctl's)
        ver = subparsers.add_parser("version", help="print the version, Python and platform")
        add_output_args(ver, what="the versions")
        ver.set_defaults(handler=_print_local_version)
    comp = subparsers.add_parser("completion", help="print a shell completion script",
                                 description=f"Print a completion script for {prog}'s subcommands and flags. "
                                             f"bash: `source <({prog} completion bash)`; zsh (after compinit "
                                             f"in ~/.zshrc): `source <({prog} completion zsh)`; fish: "
                                             f"`{prog} completion fish | source` (or save it as "
                                             f"~/.config/fish/completions/{prog}.fish).")
    comp.add_argument("shell", choices=completion.SHELLS)
    comp.set_defaults(handler=lambda args: _print_completion(parser, args.shell))
    return parser


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_line(parser.prog, local_versions()))
        parser.exit(EXIT_OK)


def _print_local_version(args: argparse.Namespace) -> int:
    versions = local_versions()
    if not print_structured(args, versions):
        print(version_line(args.program, versions))
    return EXIT_OK


def version_line(prog: str, versions: dict[str, str]) -> str:
    return f"{prog} {versions['version']} (Python {versions['python']} {versions['implementation']}, " \
           f"{versions['platform']})"


def _add_global_options(parser: argparse.ArgumentParser, global_options: AddOptions) -> None:
    template = argparse.ArgumentParser(add_help=False)
    global_options(template)
    group = parser.add_argument_group("global options (also accepted after the subcommand)")
    for action in template._actions:  # plain valued options (``--controller URL``): their value, type and help
        group.add_argument(*action.option_strings, dest=_GLOBAL_PREFIX + action.dest, type=action.type or str,
                           metavar=action.metavar, help=action.help, default=None)


def _apply_global_options(args: argparse.Namespace) -> None:
    """Options given before the subcommand fill the subcommand's options it left unset (after wins)."""
    for key, value in list(vars(args).items()):
        if key.startswith(_GLOBAL_PREFIX):
            delattr(args, key)
            dest = key.removeprefix(_GLOBAL_PREFIX)
            if value is not None and getattr(args, dest, None) is None:
                setattr(args, dest, value)


def _print_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    sys.stdout.write(completion.script(parser, shell))
    return EXIT_OK


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    try:
        args = parser.parse_args(argv)
        _apply_global_options(args)
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


def main_for(prog: str, description: str, module_names: Sequence[str], argv: Sequence[str] | None,
             global_options: AddOptions | None = None) -> int:
    """A console script's ``main``: import its command modules, parse, run; errors → exit codes."""
    modules = [importlib.import_module(name) for name in module_names]
    return run(build_parser(prog, description, modules, global_options), argv)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_yaml(obj: Any) -> None:
    yaml.safe_dump(obj, sys.stdout, sort_keys=False, allow_unicode=True, default_flow_style=False)


def add_output_args(parser: argparse.ArgumentParser, *, what: str = "the result") -> None:
    """``-o table|wide|json|yaml`` and ``--json`` (the same as ``-o json``) for a read command."""
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table",
                        help=f"how to print {what}: table (default), wide (more columns), json, yaml")
    parser.add_argument("--json", dest="output", action="store_const", const="json", help="the same as -o json")


def print_structured(args: argparse.Namespace, obj: Any) -> bool:
    """Print ``obj`` when ``-o json|yaml`` asked for it (True); False leaves the table to the command."""
    if args.output == "json":
        print_json(obj)
    elif args.output == "yaml":
        print_yaml(obj)
    else:
        return False
    return True
