"""Tests are marked by where they live, as pip's test suite does: ``tests/unit`` → ``unit`` (pure code, no
processes, no sockets beyond an in-process app), ``tests/integration`` → ``integration`` (real processes,
sockets, databases, ansible-runner).  ``pytest -m unit`` is the fast loop; CI runs both."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            kind = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # collected from outside tests/ (a path given on the command line)
            continue
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))
