"""fleetctl as a user installs it: its wheel in fresh venvs outside the checkout, one per install target.

- the agent's venv: ``requirements/agent.txt`` (hash-locked) + the wheel, ``--no-deps``; it must hold only what a
  node needs (no web stack, no database drivers, no ``ansible`` bundle) and find its playbooks and profiles as
  package data;
- the controller's venv: ``requirements/controller.txt`` + the wheel;
- then the controller from its venv and a real ``fleet-agent --executor ansible`` from the agent's venv run one
  rollout: the release wheel reaches the node through the controller and pip installs it into a real target venv.

The locked wheels come from ``.venv/wheelhouse`` (scripts/bootstrap downloads them): no index is used here.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetctl.controller.catalog import add_user_wheels, parse_catalog_json
from tests.integration.harness.installed import (
    ROOT,
    build_wheel,
    controller_venv,
    fresh_venv,
    pip_install,
    require_wheelhouse,
)
from tests.integration.realnode.rig import (
    FA2,
    AgentProc,
    Controller,
    TargetVenv,
    TimedUpstream,
    catalog_entry,
    make_universes,
    running,
)

pytestmark = pytest.mark.timeout(900)

#: what a GPU node must never carry (the controller's stack and the simulated nodes' ansible bundle)
NOT_ON_A_NODE = {"sqlalchemy", "alembic", "psycopg", "psycopg-binary", "fastapi", "starlette", "uvicorn", "httpx",
                 "jinja2-time", "prometheus-client", "croniter", "ansible"}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    agent: Path        # the agent venv
    controller: Path   # the controller venv
    root: Path

    def run(self, venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=300, cwd=self.root, env=env, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    require_wheelhouse()
    root = tmp_path_factory.mktemp("installed")
    wheel = build_wheel(root)
    agent = fresh_venv(root / "agent")
    pip_install(agent, "--require-hashes", "-r", str(ROOT / "requirements" / "agent.txt"))
    pip_install(agent, "--no-deps", str(wheel))
    return Installed(wheel, agent, controller_venv(root / "controller", wheel), root)


def _distributions(venv: Path) -> set[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json",
                          "--disable-pip-version-check"], capture_output=True, text=True, timeout=120, check=True)
    return {d["name"].lower().replace("_", "-") for d in json.loads(out.stdout)}


def _locked(name: str) -> set[str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return {line.split("==")[0].lower() for line in lines if "==" in line and not line.startswith((" ", "#"))}


def test_the_agent_install_holds_only_what_a_node_needs(installed: Installed) -> None:
    dists = _distributions(installed.agent)
    assert "fleetctl" in dists
    assert dists & NOT_ON_A_NODE == set()
    assert dists - {"fleetctl", "pip", "setuptools"} <= _locked("agent.txt")
    probe = installed.run(installed.agent, "python", "-c", "import sqlalchemy")
    assert probe.returncode != 0 and "No module named 'sqlalchemy'" in probe.stderr


def test_the_installed_agent_finds_its_package_data_outside_the_checkout(installed: Installed) -> None:
    code = ("import fleetctl, fleetctl.agent.executor as e, fleetctl.agent.verify.runner as r; "
            "print(fleetctl.__file__); print(e.DEFAULT_PLAYBOOKS_DIR); print(r.BENCH_PATH)")
    out = installed.run(installed.agent, "python", "-c", code)
    assert out.returncode == 0, out.stderr
    package, playbooks, bench = (Path(line) for line in out.stdout.split())
    site = installed.agent / "lib"
    for path in (package, playbooks, bench):
        assert path.is_relative_to(site), f"{path} is not in the installed venv (it would be the checkout's)"
    assert (playbooks / "install-wheel.yml").is_file() and (playbooks / "tasks").is_dir()
    assert bench.is_file()
    version = installed.run(installed.agent, "fleet-agent", "--version")
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stdout + version.stderr


def test_the_controller_install_runs_its_migrations_and_commands(installed: Installed) -> None:
    assert {"sqlalchemy", "alembic", "fastapi", "uvicorn"} <= _distributions(installed.controller)
    assert "ansible" not in _distributions(installed.controller)  # the bundle is fleetctl[simulate]'s
    example = installed.run(installed.controller, "fleet-controller", "config", "example")
    assert example.returncode == 0 and "state_dir" in example.stdout, example.stderr


@pytest.fixture(scope="module")
def rollout(installed: Installed) -> Iterator[tuple[Controller, dict[str, object], TargetVenv]]:
    root = installed.root / "fleet"
    universes = make_universes(root / "universes")
    with TimedUpstream(root=root / "upstream") as up:
        up.publish(universes.fa2)
        c = Controller(root / "controller", up, python=installed.controller / "bin" / "python")
        add_user_wheels(c.state, parse_catalog_json({"wheels": [catalog_entry(universes.release_wheel)]}, "user",
                                                    "installed"))
        venv = TargetVenv.make(root / "target", universes.torch)
        agent = AgentProc(c, "pkg-h200", "h200", venv, root / "node", bin_dir=installed.agent / "bin")
        with running(c, [agent]):
            res = c.fleetctl("rollout", "flash-attn", "--version", FA2, "--nodes", "pkg-h200", "--canary", "0",
                             "--max-failures", "100%", "--verify-mode", "quick")
            started = [line.split()[1] for line in res.out.splitlines() if " started by " in line]
            assert started, res.out + res.err + agent.log_tail()
            rid = started[0]
            yield c, {"status": c.rollout(rid), "jobs": c.jobs("pkg-h200"), "log": agent.log_tail(200)}, venv


def test_a_rollout_through_the_installed_programs_installs_on_the_real_path(
        rollout: tuple[Controller, dict[str, object], TargetVenv]) -> None:
    _, seen, venv = rollout
    jobs = seen["jobs"]
    assert isinstance(jobs, list)
    installs = [j for j in jobs if j["kind"] == "install-wheel"]
    assert [j["status"] for j in installs] == ["successful"], f"{jobs}\n{seen['log']}"
    assert venv.versions()["flash-attn"] == FA2
    # verify ran the installed agent's bench.py in the target venv: a stand-in torch without a GPU fails it and
    # says so (nothing is faked); the install stands
    verifies = [j for j in jobs if j["kind"] == "verify"]
    assert verifies and verifies[-1]["status"] in ("successful", "failed"), jobs
