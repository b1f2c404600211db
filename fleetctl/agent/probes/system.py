"""The two seams every probe goes through: running a command and reading a file.

Probes take a ``CommandRunner`` and a ``FileReader`` in their constructors so unit tests can
feed recorded outputs; the real implementations here use ``subprocess`` and ``open``.
Foreign failures (``OSError``, ``subprocess.TimeoutExpired``) are translated into
``CommandNotFound`` / ``CommandTimeout`` / ``FileUnreadable`` at this boundary.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetctl.fleet.errors import ExecutionError

DEFAULT_TIMEOUT_S = 30.0


class ProbeError(ExecutionError):
    """A probe could not get its answer; probes turn this into a ``probe_errors`` entry."""

    code = "probe"


class CommandNotFound(ProbeError):
    code = "probe-command-not-found"


class CommandTimeout(ProbeError):
    code = "probe-timeout"


class FileUnreadable(ProbeError):
    code = "probe-file"


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None) -> CommandResult: ...


class FileReader(Protocol):
    def __call__(self, path: str) -> str: ...


def run_command(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` without a shell; text output, decoding errors replaced."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout,
                              env=dict(env) if env is not None else None, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as exc:
        raise CommandNotFound(f"{argv[0]}: not found", hint="install it or put it on PATH") from exc
    except PermissionError as exc:
        raise CommandNotFound(f"{argv[0]}: not executable ({exc.strerror})",
                              hint="check the file's permissions") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(f"{' '.join(argv)}: no answer within {timeout:g} s",
                             hint="the command hangs; run it by hand to see why") from exc
    except OSError as exc:
        raise CommandNotFound(f"{argv[0]}: cannot run ({exc.strerror or exc})") from exc
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError as exc:
        raise FileUnreadable(f"{path}: {exc.strerror or exc}") from exc


def c_locale_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment with messages forced to English, so output parses the same everywhere."""
    env = dict(os.environ if base is None else base)
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env.pop("LANGUAGE", None)
    return env
