"""Shared helpers for the agent probe tests: recorded outputs and a scripted command runner."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from fleetctl.agent.probes.system import DEFAULT_TIMEOUT_S, CommandResult

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "probes"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


class ScriptedRunner:
    """Answers commands from a table keyed by argv tuple (or a callable); records every call."""

    def __init__(self, answers: Mapping[tuple[str, ...], CommandResult | Exception]
                 | Callable[[tuple[str, ...]], CommandResult | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[tuple[str, ...], float, Mapping[str, str] | None]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                 env: Mapping[str, str] | None = None) -> CommandResult:
        key = tuple(argv)
        self.calls.append((key, timeout, env))
        answer = self.answers(key) if callable(self.answers) else self.answers.get(key)
        if answer is None:
            raise AssertionError(f"unexpected command {key}")
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(argv: Sequence[str], stdout: str = "", stderr: str = "", rc: int = 0) -> CommandResult:
    return CommandResult(tuple(argv), rc, stdout, stderr)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
