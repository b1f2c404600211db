"""`fleetctl agents install|upgrade|uninstall` against three real SSH hosts (Debian's sshd, each chrooted into its
own Debian root: tests/integration/harness/sshhosts.py), a real controller, and the operator's inventory file.

The story, in order (one module-scoped run; each test reads one part of it):
0. the controller runs from its package: fleetctl's wheel with requirements/controller.txt in a fresh venv;
1. the agent's wheels (fleetctl's wheel built from this checkout + the locked dependencies) go into the
   controller's artifact store (`fleetctl agents wheels add`);
2. `agents install` over SSH: each host gets its own venv from those wheels (no index reachable), the CA, a token,
   and a running agent; all three come online, their version shown by `fleetctl nodes -o wide`;
3. `agents install` again changes nothing (idempotent: same agent process, no new enrollment);
4. a rollout with the real executor on the three hosts: the agents (inside the hosts) install the release wheel
   with pip into each host's target venv;
5. `agents upgrade --batch 2` moves them to fleetctl 0.1.1 (a wheel of this checkout with that version);
6. `agents uninstall --revoke` on one host removes the agent from it and revokes its identity.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.catalog import add_user_wheels, parse_catalog_json
from tests.integration.harness.installed import (
    build_wheel,
    controller_venv,
    locked_agent_wheels,
    require_wheelhouse,
)
from tests.integration.harness.sshhosts import SshHost, inventory, skip_reason, ssh_hosts
from tests.integration.realnode.rig import FA2, Controller, Result, TimedUpstream, catalog_entry, make_universes

pytestmark = pytest.mark.timeout(1200)

HOSTS = ("ssh-gpu-1", "ssh-gpu-2", "ssh-gpu-3")
AGENT_ARGS = "--simulate h200 --executor ansible --python /opt/target/bin/python"


@dataclass
class Story:
    controller: Controller
    hosts: list[SshHost]
    inventory: Path
    runs: dict[str, Result] = field(default_factory=dict)
    seen: dict[str, Any] = field(default_factory=dict)

    def agents(self, *args: str, timeout: float = 600) -> Result:
        return self.controller.fleetctl("agents", *args, "-i", str(self.inventory), "--controller",
                                        self.controller.url, timeout=timeout)


def agent_pid(host: SshHost) -> str:
    pid = host.file("/run/fleet-agent.pid")
    return pid.read_text().strip() if pid.exists() else ""


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    if (why := skip_reason()) is not None:
        pytest.skip(why)
    require_wheelhouse()
    root = tmp_path_factory.mktemp("agents-ssh")
    wheel = build_wheel(root / "v010")
    newer = build_wheel(root / "v011", "0.1.1")
    # the controller from its package: "fleetctl[controller]" installed from the wheel, outside the checkout; already
    # at the version the agents are upgraded to later (controllers first: docs/deploy.md, "Version skew")
    controller = controller_venv(root / "controller-venv", newer)
    universes = make_universes(root / "universes")
    with TimedUpstream(root=root / "upstream") as up, ssh_hosts(HOSTS) as (hosts, key):
        up.publish(universes.fa2)
        c = Controller(root / "controller", up, python=controller / "bin" / "python")
        add_user_wheels(c.state, parse_catalog_json({"wheels": [catalog_entry(universes.release_wheel)]}, "user",
                                                    "ssh"))
        for host in hosts:  # the users' target venv on each node, with the stand-in torch
            shutil.copy(universes.torch, host.file("/tmp") / universes.torch.name)
            host.run("python3", "-m", "venv", "/opt/target")
            host.run("/opt/target/bin/pip", "install", "-q", "--no-index", "--no-deps", f"/tmp/{universes.torch.name}")
        s = Story(c, hosts, inventory(hosts, key, root / "inventory.ini", host_vars=f'fleet_agent_args="{AGENT_ARGS}"'))
        c.start()
        try:
            wheels = [wheel, *locked_agent_wheels()]
            s.runs["wheels"] = c.fleetctl("agents", "wheels", "add", *map(str, wheels), "--json")
            s.runs["too_new"] = c.fleetctl("agents", "wheels", "add", str(build_wheel(root / "v020", "0.2.0")))
            s.runs["install_too_new"] = s.agents("install", "--version", "0.2.0")
            s.runs["install"] = s.agents("install", "--version", "0.1.0", "--json", "--wait", "120")
            if s.runs["install"].rc != 0:  # the rest of the story needs the agents: stop here, with the reason
                logs = {h.name: h.file("/var/log/fleet-agent.log").read_text(errors="replace")[-1500:]
                        for h in hosts if h.file("/var/log/fleet-agent.log").exists()}
                pytest.fail(f"agents install failed:\n{s.runs['install'].out}{s.runs['install'].err}\n{logs}")
            s.seen["nodes"] = c.fleetctl("nodes", "-o", "wide")
            s.seen["installed"] = {h.name: (h.file("/opt/fleetctl/agent/bin/fleet-agent").exists(),
                                            h.file("/etc/fleetctl/agent.env").stat().st_mode & 0o777) for h in hosts}
            s.seen["pids"] = {h.name: agent_pid(h) for h in hosts}
            s.seen["tokens_after_install"] = len(c.api("/tokens")["tokens"])
            s.runs["again"] = s.agents("install", "--version", "0.1.0", "--json")
            s.seen["pids_again"] = {h.name: agent_pid(h) for h in hosts}
            s.seen["tokens_again"] = len(c.api("/tokens")["tokens"])
            s.runs["rollout"] = c.fleetctl("rollout", "flash-attn", "--version", FA2, "--nodes", ",".join(HOSTS),
                                           "--canary", "0", "--max-failures", "100%", "--verify-mode", "quick",
                                           timeout=600)
            s.seen["jobs"] = {h: c.jobs(h) for h in HOSTS}
            s.seen["flash_attn"] = {h.name: h.run("/opt/target/bin/python", "-c",
                                                  "import importlib.metadata as m; print(m.version('flash-attn'))",
                                                  check=False).stdout.strip() for h in hosts}
            s.runs["wheels2"] = c.fleetctl("agents", "wheels", "add", str(newer))
            s.runs["upgrade"] = s.agents("upgrade", "--version", "0.1.1", "--batch", "2", "--max-failures", "0",
                                         "--json")
            s.runs["uninstall"] = c.fleetctl("agents", "uninstall", "-i", str(s.inventory), "--limit", HOSTS[2],
                                             "--revoke", "--purge", "--controller", c.url, "--json")
            s.seen["after_uninstall"] = {"venv": hosts[2].file("/opt/fleetctl/agent").exists(),
                                         "env": hosts[2].file("/etc/fleetctl/agent.env").exists(),
                                         "state": hosts[2].file("/var/lib/fleetctl/agent").exists()}
            yield s
        finally:
            c.stop()


def _hosts(res: Result) -> dict[str, dict[str, Any]]:
    assert res.rc == 0, res.out + res.err
    return {h["host"]: h for h in json.loads(res.out)["hosts"]}


def test_install_brings_every_host_online_with_its_agent_version(story: Story) -> None:
    assert story.runs["wheels"].rc == 0, story.runs["wheels"].err
    hosts = _hosts(story.runs["install"])
    assert {h: v["outcome"] for h, v in hosts.items()} == dict.fromkeys(HOSTS, "online")
    assert {v["agent_version"] for v in hosts.values()} == {"0.1.0"}
    table = story.seen["nodes"].out
    for name in HOSTS:
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert "online" in row and "0.1.0" in row, table
    # the agent runs inside each host, from its own venv, installed offline; its token file is private
    assert story.seen["installed"] == dict.fromkeys(HOSTS, (True, 0o600))


def test_install_again_changes_nothing(story: Story) -> None:
    hosts = _hosts(story.runs["again"])
    assert {v["outcome"] for v in hosts.values()} == {"online"}
    assert story.seen["pids_again"] == story.seen["pids"]  # the same agent processes: nothing was restarted
    assert story.seen["tokens_again"] == story.seen["tokens_after_install"]  # enrolled hosts get no new token


def test_a_rollout_on_the_installed_agents_runs_on_the_real_path(story: Story) -> None:
    for host, jobs in story.seen["jobs"].items():
        installs = [j for j in jobs if j["kind"] == "install-wheel"]
        assert [j["status"] for j in installs] == ["successful"], (host, jobs, story.runs["rollout"].out)
    assert story.seen["flash_attn"] == dict.fromkeys(HOSTS, FA2)


def test_upgrade_moves_every_host_to_the_new_version_in_batches(story: Story) -> None:
    hosts = _hosts(story.runs["upgrade"])
    assert {h: (v["outcome"], v["agent_version"]) for h, v in hosts.items()} == dict.fromkeys(HOSTS,
                                                                                             ("online", "0.1.1"))
    assert json.loads(story.runs["upgrade"].out)["batch"] == 2


def test_uninstall_removes_the_agent_and_revokes_it(story: Story) -> None:
    hosts = _hosts(story.runs["uninstall"])
    assert hosts[HOSTS[2]]["outcome"] == "removed"
    assert story.seen["after_uninstall"] == {"venv": False, "env": False, "state": False}


def test_an_agent_newer_than_the_controller_is_refused_before_touching_a_host(story: Story) -> None:
    res = story.runs["install_too_new"]
    assert res.rc != 0 and "agent 0.2.0 is outside what this controller supports" in res.err, res.out + res.err
    assert "upgrade the controller first" in res.err


def test_a_missing_inventory_is_a_clear_error(story: Story) -> None:
    res = story.controller.fleetctl("agents", "install", "-i", "/nonexistent.ini", "--controller",
                                    story.controller.url)
    assert res.rc != 0 and "inventory /nonexistent.ini does not exist" in res.err
