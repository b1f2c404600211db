"""Shared environments (docs/rollout.md, "Shared environments"): nodes whose target env is one directory (a venv on
NFS) report the same ``python.env_fs`` + ``env_path``; a rollout installs it once — on the first of them — and
verifies it on each. Two simulated nodes point at one shared dir, a third at its own; real controller, agents over
sockets, engine and SQLite."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fleetctl.agent.probes.probe_target import env_identity
from fleetctl.controller.app import RunningController
from fleetctl.controller.rollout import service
from fleetctl.fleet.jobs import JobSpec
from tests.integration.fleet_support import SimAgents, wait_for
from tests.integration.rollout.simrunner import Script, SimRunner
from tests.integration.rollout.test_rollout_cli import fleetctl

pytestmark = pytest.mark.timeout(200)


@dataclasses.dataclass
class SharedEnvRunner(SimRunner):
    """A node of a shared env: what any node of it installs shows on every one (they import from one directory)."""

    group: list[SimRunner] = dataclasses.field(default_factory=list)

    def _installed(self, job: JobSpec) -> None:
        for runner in self.group:
            SimRunner._installed(runner, job)


async def test_a_shared_env_is_installed_once_and_verified_on_each_node(controller: RunningController,
                                                                       fleet: SimAgents, tmp_path: Path) -> None:
    shared, own = tmp_path / "nfs" / "venv", tmp_path / "local" / "venv"
    shared.mkdir(parents=True)
    own.mkdir(parents=True)
    script = Script()
    group: list[SimRunner] = []
    runners = {}
    for host, env in (("a100-1", shared), ("a100-2", shared), ("a100-3", own)):
        runner = SharedEnvRunner(host, script, tmp_path / "work" / host, group=group if env == shared else [])
        runner.facts = SimRunner.for_profile(host, "a100", script, tmp_path).facts
        where = env_identity(str(env))
        assert where is not None, "the test host reports no filesystem identity (/proc/self/mountinfo, machine-id)"
        assert runner.facts is not None
        runner.facts = dataclasses.replace(runner.facts, python=dataclasses.replace(runner.facts.python, **where))
        if env == shared:
            group.append(runner)
        else:
            runner.group = [runner]
        runners[host] = runner
        sim = await fleet.start(host, "a100", runner=runner, facts=runner.current_facts)
        runner.agent = sim.agent

    code, out, err = await fleetctl(controller, "rollout", "flash-attn", "--dry-run", "--canary", "0")
    assert code == 0, out + err
    assert "shared env: a100-1 installs it" in out

    code, out, err = await fleetctl(controller, "rollout", "flash-attn", "--canary", "0", "--batch", "100%",
                                    "--detach")
    assert code == 0, out + err
    rid = out.split()[1]
    st = await wait_for(lambda: (s := service.get_status(controller.ctx.store, rid))["active"] is False and s,
                        timeout=90)
    assert st["status"] == "succeeded", st["reason"]
    ran = sorted((h, k) for h, k, _ in script.ran)
    assert ran == [("a100-1", "install-wheel"), ("a100-1", "verify"), ("a100-2", "verify"),
                   ("a100-3", "install-wheel"), ("a100-3", "verify")]  # installed once per env, verified on each
    order = [(h, k) for h, k, _ in script.ran if h in ("a100-1", "a100-2")]
    assert order.index(("a100-2", "verify")) > order.index(("a100-1", "install-wheel"))
    follower = next(n for n in st["nodes"] if n["hostname"] == "a100-2")
    assert follower["state"] == "done" and "verification passed" in follower["cause"]
