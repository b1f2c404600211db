"""Shell completion scripts generated from a program's argparse parser (``PROG completion bash|zsh``).

The parser is the one description of the command line, so the script is derived from it each time rather than
kept by hand: subcommands at every level, each level's flags, and the values of flags and positionals that have
``choices``. zsh loads the same functions through its bash compatibility layer (``bashcompinit``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh")
_SAFE_WORD = re.compile(r"^-{0,2}[A-Za-z0-9][A-Za-z0-9._:+=/-]*$")  # never quoted inside the generated script


@dataclass
class _Level:
    """One command level (``""`` for the program itself, else e.g. ``"rollout status"``)."""

    words: list[str] = field(default_factory=list)  # subcommands and positional choices offered here
    options: list[str] = field(default_factory=list)
    option_values: dict[str, list[str]] = field(default_factory=dict)
    subcommands: list[str] = field(default_factory=list)


def _levels(parser: argparse.ArgumentParser, path: str, out: dict[str, _Level]) -> None:
    level = out.setdefault(path, _Level())
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                level.subcommands.append(name)
                level.words.append(name)
                _levels(sub, f"{path} {name}".strip(), out)
        elif action.option_strings:
            level.options += action.option_strings
            if action.choices:
                for opt in action.option_strings:
                    level.option_values[opt] = [str(c) for c in action.choices]
        elif action.choices:
            level.words += [str(c) for c in action.choices]


def _words(words: list[str]) -> str:
    return " ".join(w for w in words if _SAFE_WORD.match(w))


def bash_script(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    fn = "_" + re.sub(r"\W", "_", prog)
    levels: dict[str, _Level] = {}
    _levels(parser, "", levels)
    subs = [f'    "{path}") echo "{_words(lv.subcommands)}" ;;' for path, lv in levels.items() if lv.subcommands]
    words = [f'    "{path}") echo "{_words(lv.words)}" ;;' for path, lv in levels.items() if lv.words]
    opts = [f'    "{path}") echo "{_words(lv.options)}" ;;' for path, lv in levels.items()]
    values = [f'    "{path}|{opt}") echo "{_words(vals)}" ;;'
              for path, lv in levels.items() for opt, vals in lv.option_values.items() if _SAFE_WORD.match(opt)]
    return "\n".join([
        f"# {prog} completion (bash), generated from its parser: source <({prog} completion bash)",
        f"{fn}_subcommands() {{", '  case "$1" in', *subs, "  esac", "}",
        f"{fn}_words() {{", '  case "$1" in', *words, "  esac", "}",
        f"{fn}_options() {{", '  case "$1" in', *opts, "  esac", "}",
        f"{fn}_values() {{", '  case "$1" in', *values, "  esac", "}",
        f"{fn}() {{",
        '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="" path="" word i values',
        '  [[ $COMP_CWORD -gt 0 ]] && prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "  for ((i = 1; i < COMP_CWORD; i++)); do",
        '    word="${COMP_WORDS[i]}"',
        f'    if [[ "$word" != -* && " $({fn}_subcommands "$path") " == *" $word "* ]]; then',
        '      path="${path:+$path }$word"',
        "    fi",
        "  done",
        f'  values="$({fn}_values "$path|$prev")"',
        '  if [[ -n "$values" ]]; then',
        '    COMPREPLY=($(compgen -W "$values" -- "$cur"))',
        '  elif [[ "$cur" == -* ]]; then',
        f'    COMPREPLY=($(compgen -W "$({fn}_options "$path")" -- "$cur"))',
        "  else",
        f'    COMPREPLY=($(compgen -W "$({fn}_words "$path")" -- "$cur"))',
        "  fi",
        "}",
        f"complete -o default -F {fn} {prog}",
        "",
    ])


def zsh_script(parser: argparse.ArgumentParser) -> str:
    return "\n".join([f"# {parser.prog} completion (zsh, sourced after compinit): the bash functions, through "
                      "zsh's bashcompinit",
                      "autoload -U +X bashcompinit && bashcompinit", bash_script(parser)])


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    return bash_script(parser) if shell == "bash" else zsh_script(parser)
