"""Shell completion scripts generated from a program's argparse parser (``PROG completion bash|zsh|fish``).

The parser is the one description of the command line, so the script is derived from it each time rather than
kept by hand: subcommands at every level, each level's flags, and the values of flags and positionals that have
``choices``. zsh loads the same functions through its bash compatibility layer (``bashcompinit``); fish gets its own
``complete`` lines from the same walk of the parser.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh", "fish")
_SAFE_WORD = re.compile(r"^-{0,2}[A-Za-z0-9][A-Za-z0-9._:+=/-]*$")  # never quoted inside the generated script


@dataclass
class _Level:
    """One command level (``""`` for the program itself, else e.g. ``"rollout status"``)."""

    words: list[str] = field(default_factory=list)  # subcommands and positional choices offered here
    options: list[str] = field(default_factory=list)
    option_values: dict[str, list[str]] = field(default_factory=dict)
    subcommands: list[str] = field(default_factory=list)
    valued: set[str] = field(default_factory=set)  # options that take a value (fish completes one after them)


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
            if action.nargs != 0:
                level.valued.update(action.option_strings)
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


def _fish_quote(word: str) -> str:
    return "'" + word.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish_script(parser: argparse.ArgumentParser) -> str:
    """fish has no bash compatibility layer: its own ``complete`` lines, one set per command level, each guarded by
    the level the words typed so far reached (``__PROG_level``, which walks them like the bash function does)."""
    prog = parser.prog
    fn = "__" + re.sub(r"\W", "_", prog)
    levels: dict[str, _Level] = {}
    _levels(parser, "", levels)
    subs = [f"        case {_fish_quote(path)}\n            printf '%s\\n' {_words(lv.subcommands)}"
            for path, lv in levels.items() if lv.subcommands]
    lines = [
        f"# {prog} completion (fish), generated from its parser: {prog} completion fish | source",
        f"# (or save it as ~/.config/fish/completions/{prog}.fish)",
        f"function {fn}_subcommands",
        "    switch $argv[1]", *subs, "    end", "end",
        f"function {fn}_level",
        '    set -l path ""',
        "    for word in (commandline -opc)[2..-1]",
        f'        if not string match -q -- "-*" $word; and contains -- $word ({fn}_subcommands "$path")',
        '            set path (string trim -- "$path $word")',
        "        end",
        "    end",
        "    echo $path",
        "end",
        f"function {fn}_at",
        f'    test ({fn}_level) = "$argv[1]"',
        "end",
        f"complete -c {prog} -e",
    ]
    for path, lv in levels.items():
        at = f"-n {_fish_quote(f'{fn}_at {_fish_quote(path)}')}"
        words = _words(lv.words)
        if words:
            lines.append(f"complete -c {prog} {at} -f -a {_fish_quote(words)}")
        for opt in lv.options:
            if not _SAFE_WORD.match(opt):
                continue
            flag = f"-l {opt[2:]}" if opt.startswith("--") else f"-s {opt[1:]}" if len(opt) == 2 else f"-o {opt[1:]}"
            values = lv.option_values.get(opt)
            choice = f" -x -a {_fish_quote(_words(values))}" if values else (" -r" if opt in lv.valued else "")
            lines.append(f"complete -c {prog} {at} {flag}{choice}")
    return "\n".join(lines) + "\n"


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    return {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}[shell](parser)
