"""Issue 19 over the wire: MI300X, Windows and Jetson agents (real processes, gRPC over TLS) register with a real
controller, which stores their added facts (ROCm, gfx arch, OS family, MSVC, L4T/JetPack) and plans each right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.simfleet import SimFleet

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[3]


def fleetctl(state: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "fleetctl.controller.cli", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout


def test_rocm_windows_and_jetson_agents_report_their_facts_and_get_their_plans(tmp_path: Path) -> None:
    state = tmp_path / "controller"
    fleet = SimFleet(state, nodes=3, profiles=["mi300x", "windows-rtx4090", "jetson-orin"], network="loopback",
                     heartbeat_interval=1)
    try:
        fleet.up(timeout=120)
        amd, win, jetson = "sim-mi300x-01", "sim-windows-rtx4090-02", "sim-jetson-orin-03"

        facts = {h: json.loads(fleetctl(state, "node", h, "--json"))["facts"] for h in (amd, win, jetson)}
        assert facts[amd]["rocm"] == {"version": "6.2.0", "smi": "amd-smi"}
        assert {(g["vendor"], g["arch"]) for g in facts[amd]["gpus"]} == {("amd", "gfx942")}
        assert facts[amd]["torch"]["hip"] == "6.2.41133-dd7f95766"
        assert (facts[win]["os"]["family"], facts[win]["os"]["msvc"]) == ("windows", "14.42")
        assert (facts[jetson]["os"]["l4t"], facts[jetson]["os"]["jetpack"]) == ("36.4.0", "6.1")
        shown = fleetctl(state, "node", amd)
        assert "gfx942" in shown and "rocm        6.2.0 (GPUs from amd-smi)" in shown and "hip 6.2.41133" in shown
        assert "family windows msvc 14.42" in fleetctl(state, "node", win)

        dry = json.loads(fleetctl(state, "rollout", "flash-attn", "--dry-run", "--json"))
        nodes: dict[str, dict[str, Any]] = {n["hostname"]: n for n in dry["nodes"]}
        assert nodes[amd]["variant"] == "fa2-source" and nodes[amd]["steps"] == ["build-from-source", "verify"]
        assert "backend=rocm-ck" in nodes[amd]["build_key"] and "archs=gfx942" in nodes[amd]["build_key"]
        assert nodes[amd]["decision"]["build"]["env"]["GPU_ARCHS"] == "gfx942"
        assert nodes[jetson]["steps"] == ["build-from-source", "verify"]
        assert "platform=linux_aarch64" in nodes[jetson]["build_key"] and "archs=80" in nodes[jetson]["build_key"]
        assert nodes[win]["steps"] == [] and nodes[win]["skip"].startswith("manual: run these commands by hand")
        assert win not in {h for batch in dry["batches"] for h in batch}
    finally:
        fleet.down()
