"""`fleet-agent facts` as a user runs it: a real subprocess on this machine (no GPU, no torch is fine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.fleet.facts import parse_node

ROOT = Path(__file__).resolve().parents[3]
FLEET_AGENT = ROOT / ".venv" / "bin" / "fleet-agent"


def _agent(*args: str) -> list[str]:
    if FLEET_AGENT.exists():
        return [str(FLEET_AGENT), *args]
    return [sys.executable, "-m", "fleetctl.agent.main", *args]


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_console_script_prints_contract_json() -> None:
    if not FLEET_AGENT.exists():
        pytest.skip("console script not installed; run `.venv/bin/pip install -e . --no-deps`")
    proc = _run([str(FLEET_AGENT), "facts", "--json", "--hostname", "probe-test"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data) == ["hostname", "os", "driver", "gpus", "toolkit", "python", "torch", "flash_attn",
                          "resources", "apt"]
    facts = parse_node(data)
    assert facts.hostname == "probe-test" and facts.apt is None
    if facts.driver is None:
        assert "warning: NVML: " in proc.stderr


def test_python_m_agent_main_and_target_python() -> None:
    proc = _run([sys.executable, "-m", "fleetctl.agent.main", "facts", "--json", "--python", sys.executable])
    assert proc.returncode == 0, proc.stderr
    facts = parse_node(json.loads(proc.stdout))
    assert facts.python.executable == sys.executable


def test_env_target_python_and_missing_interpreter() -> None:
    proc = _run(_agent("facts", "--json"), FLEET_TARGET_PYTHON="/nonexistent/bin/python3")
    assert proc.returncode == 0, proc.stderr
    parse_node(json.loads(proc.stdout))
    assert "/nonexistent/bin/python3: not found" in proc.stderr


def test_simulate_profile() -> None:
    proc = _run(_agent("facts", "--json", "--simulate", "gh200", "--hostname", "sim-7"))
    assert proc.returncode == 0, proc.stderr
    facts = parse_node(json.loads(proc.stdout))
    assert facts.hostname == "sim-7" and facts.os.arch == "aarch64" and facts.gpus[0].compute_capability == "9.0"


def test_unknown_profile_exit_code_and_hint() -> None:
    proc = _run(_agent("facts", "--simulate", "nope"))
    assert proc.returncode == 4
    assert "error[not-found]" in proc.stderr and "hint: available profiles:" in proc.stderr


def test_bad_hostname_is_refused() -> None:
    proc = _run(_agent("facts", "--json", "--simulate", "t4", "--hostname", "bad host!"))
    assert proc.returncode == 3 and "hostname" in proc.stderr


def test_human_summary() -> None:
    proc = _run(_agent("facts", "--simulate", "apt-nopubkey"))
    assert proc.returncode == 0, proc.stderr
    assert "simulated: apt-nopubkey" in proc.stdout and "NO_PUBKEY" in proc.stdout
    real = _run(_agent("facts"))
    assert real.returncode == 0, real.stderr
    assert "driver" in real.stdout and "python" in real.stdout


def test_importing_probes_stays_light() -> None:
    code = ("import sys, fleetctl.agent.probes, fleetctl.agent.profiles, fleetctl.agent.commands.facts; "
            "bad = [m for m in ('grpc', 'sqlalchemy', 'ansible', 'ansible_runner', 'torch', 'fleetctl.controller') "
            "if m in sys.modules]; print(bad)")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
