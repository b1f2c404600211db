"""requirements/*.txt (scripts/lock) still satisfy pyproject.toml: every declared dependency of an install target is
pinned, with hashes, at a version its range allows. A dependency changed without re-running scripts/lock fails here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1].parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(lock: str) -> dict[str, list[Version]]:
    """name → every version the lock pins for it (one per marker branch, e.g. per Python version)."""
    out: dict[str, list[Version]] = {}
    text = (ROOT / "requirements" / lock).read_text()
    entries = text.replace("\\\n", " ").splitlines()
    for line in entries:
        if "==" not in line or line.startswith((" ", "#")):
            continue
        assert "--hash=sha256:" in line, f"{lock}: {line.split()[0]} has no hash (scripts/lock --generate-hashes)"
        name, version = line.split(";")[0].split()[0].split("==")
        out.setdefault(canonicalize_name(name), []).append(Version(version))
    return out


@pytest.mark.parametrize(("lock", "declared"), [
    ("agent.txt", PROJECT["dependencies"]),
    ("controller.txt", PROJECT["dependencies"] + PROJECT["optional-dependencies"]["controller"]),
])
def test_each_declared_dependency_is_pinned_within_its_range(lock: str, declared: list[str]) -> None:
    pinned = pins(lock)
    for line in declared:
        req = Requirement(line)
        versions = pinned.get(canonicalize_name(req.name))
        assert versions, f"{req.name} is declared in pyproject.toml but not in requirements/{lock}: run scripts/lock"
        for version in versions:
            assert req.specifier.contains(version, prereleases=True), \
                f"requirements/{lock} pins {req.name}=={version}, outside {req.specifier}: run scripts/lock"


def test_the_agent_lock_holds_nothing_of_the_controller() -> None:
    """The controller's stack and the simulated nodes' bundle stay off GPU nodes (jinja2 is ansible-core's own)."""
    agent = pins("agent.txt")
    for name in ("sqlalchemy", "alembic", "psycopg", "fastapi", "uvicorn", "httpx", "prometheus-client", "ansible"):
        assert name not in agent, f"{name} is a controller/simulation dependency, yet the agent's lock pins it"
