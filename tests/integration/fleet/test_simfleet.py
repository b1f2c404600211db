"""`fleet-controller fleet up/down`: real controller + agent processes, each node with its own address."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.controller.client import ControllerClient
from fleetctl.controller.simfleet import SimFleet, netns_available

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[3]


def _peers(state: Path) -> dict[str, str]:
    """hostname → the address the controller saw it enroll from (controller log)."""
    out = {}
    for line in (state / "logs" / "controller.log").read_text().splitlines():
        if " enrolled " in line and " from " in line:
            parts = line.split()
            host = parts[parts.index("enrolled") + 1]
            out[host] = parts[-1].removeprefix("ipv4:").rsplit(":", 1)[0]
    return out


@pytest.mark.parametrize("network", [pytest.param("netns", marks=pytest.mark.root), "loopback"])
def test_fleet_up_registers_every_node_with_its_own_address(tmp_path: Path, network: str) -> None:
    if network == "netns" and not netns_available():
        pytest.skip("network namespaces not available here (needs root and iproute2)")
    state = tmp_path / "controller"
    fleet = SimFleet(state, nodes=3, profiles=["h100", "t4", "cpu-only-torch"], network=network,
                     heartbeat_interval=1)
    try:
        st = fleet.up(timeout=90)
        assert st.mode == network
        client = ControllerClient.discover(state_dir=state)
        nodes = {n["hostname"]: n for n in client.get("/nodes")["nodes"]}
        assert sorted(nodes) == ["sim-cpu-only-torch-03", "sim-h100-01", "sim-t4-02"]
        assert all(n["simulated"] and n["status"] == "online" for n in nodes.values())
        addrs = [n.address for n in st.nodes]
        assert len(set(addrs)) == 3
        if network == "netns":
            assert _peers(state) == {n.hostname: n.address for n in st.nodes}  # the controller sees each address
        # fleetctl against the fleet, as a real process
        out = subprocess.run([sys.executable, "-m", "fleetctl.controller.cli", "nodes", "--json",
                              "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout
        assert len(json.loads(out)["nodes"]) == 3
        client.close()
    finally:
        fleet.down()
    assert not (state / "fleet.json").exists()
    if network == "netns":
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(n.netns and n.netns in listing for n in st.nodes)


def test_fleet_up_refuses_a_profile_the_agent_does_not_know_before_starting_anything(tmp_path: Path) -> None:
    state = tmp_path / "controller"
    done = subprocess.run([sys.executable, "-m", "fleetctl.controller.main", "fleet", "up", "--nodes", "2",
                           "--profiles", "h100,no-such-gpu", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 4, done.stderr  # not-found, as the agent says it
    assert "error[not-found]: no simulation profile 'no-such-gpu'" in done.stderr
    assert "hint: available profiles: " in done.stderr and "h100" in done.stderr
    assert not (state / "fleet.json").exists()  # no controller, no agents
    assert not (state / "logs").exists()
