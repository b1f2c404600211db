"""apt health, on demand: run ``apt-get update`` and keep its ``W:`` / ``E:`` lines.

``root`` runs it inside a chroot (``chroot ROOT apt-get update``) — the simulated nodes'
Debian roots; ``options`` are passed as ``-o KEY=VALUE`` (tests point apt at their own
sources and state directories this way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleetctl.agent.probes.system import CommandRunner, CommandTimeout, ProbeError, c_locale_env, run_command
from fleetctl.fleet.facts import MAX_APT_ERRORS, AptFacts

APT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class AptResult:
    apt: AptFacts | None
    errors: tuple[str, ...] = ()


def apt_error_lines(output: str) -> list[str]:
    """The ``W:`` and ``E:`` lines of apt's output, in order, without duplicates."""
    lines: list[str] = []
    for raw in output.splitlines():
        line = raw.rstrip()
        if (line.startswith("W: ") or line.startswith("E: ")) and line not in lines:
            lines.append(line)
    return lines[:MAX_APT_ERRORS]


class AptProbe:
    def __init__(self, runner: CommandRunner = run_command, *, timeout: float = APT_TIMEOUT_S) -> None:
        self._runner = runner
        self._timeout = timeout

    def command(self, root: str | None = None, options: Sequence[str] = ()) -> list[str]:
        argv = ["chroot", root] if root else []
        argv += ["apt-get", "update"]
        for option in options:
            argv += ["-o", option]
        return argv

    def probe(self, root: str | None = None, options: Sequence[str] = ()) -> AptResult:
        argv = self.command(root, options)
        try:
            result = self._runner(argv, timeout=self._timeout, env=c_locale_env())
        except ProbeError as exc:
            if isinstance(exc, CommandTimeout):
                return AptResult(AptFacts(errors=(f"E: apt-get update timed out after {self._timeout:g} s",)),
                                 (f"apt: {exc.message}",))
            return AptResult(None, (f"apt: {exc.message}",))
        lines = apt_error_lines(result.stdout + "\n" + result.stderr)
        if result.returncode != 0 and not any(line.startswith("E: ") for line in lines):
            tail = (result.stderr or result.stdout).strip().splitlines()
            lines.append(f"E: apt-get update exited {result.returncode}" + (f": {tail[-1]}" if tail else ""))
        return AptResult(AptFacts(errors=tuple(lines[:MAX_APT_ERRORS])))
