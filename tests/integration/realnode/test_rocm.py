"""Issue 19: a simulated MI300X node (``fleet-agent --simulate mi300x --executor ansible``) rolled out for real.

A real controller and a real agent process (rig.py); the node's target venv holds a stand-in ROCm torch
(``torch.version.hip`` set, ``torch.version.cuda`` None), which the agent probes for real. The controller plans a
Composable Kernel source build for gfx942, fetches the sdist from the fake upstream, and the agent runs the real
build-from-source playbook with ``gpu_backend rocm-ck`` / ``gpu_archs gfx942``: the stand-in build saw
``BUILD_TARGET=rocm GPU_ARCHS=gfx942`` and no CUDA variable, and the wheel is installed. Verification then fails
as on every GPU-less node here (no faked pass).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness.upstream import fa2_universe, torch_wheel
from tests.integration.realnode.rig import (
    FA2,
    AgentProc,
    Controller,
    TargetVenv,
    TimedUpstream,
    require_ansible,
    running,
)

pytestmark = pytest.mark.timeout(600)
HIP = "6.2.41133-dd7f95766"


def test_mi300x_rollout_builds_for_gfx942_through_the_real_playbook(tmp_path: Path) -> None:
    require_ansible()
    up = TimedUpstream(root=tmp_path / "upstream")
    with up:
        up.publish(fa2_universe(tmp_path / "fa2", FA2))
        c = Controller(tmp_path / "controller", up)
        venv = TargetVenv.make(tmp_path / "venv", torch_wheel(tmp_path / "torch", "2.5.1+rocm6.2", hip=HIP),
                               with_pip=True)
        agent = AgentProc(c, "rn-mi300x", "mi300x", venv, tmp_path / "node")
        with running(c, [agent]):
            out = c.fleetctl("rollout", "flash-attn", "--version", FA2, "--nodes", "rn-mi300x", "--canary", "0",
                             "--max-failures", "100%", "--verify-mode", "quick")
            rid = next(line.split()[1] for line in out.out.splitlines()
                       if line.startswith("rollout ") and " started by " in line)
            st = c.rollout(rid)
            jobs = c.jobs("rn-mi300x")
    (node,) = st["nodes"]
    steps = "\n".join(f"{t['from']} → {t['to']}: {t['cause']}" for t in st["transitions"])
    assert node["variant"] == "fa2-source" and "backend=rocm-ck" in node["build_key"], steps
    (build,) = [j for j in jobs if j["kind"] == "build-from-source"]
    assert (build["vars"]["gpu_backend"], build["vars"]["gpu_archs"]) == ("rocm-ck", "gfx942"), build["vars"]
    assert "cuda_archs" not in build["vars"]
    assert build["status"] == "successful", steps
    assert any(t["cause"].startswith("install-wheel succeeded") for t in st["transitions"]), steps
    assert venv.versions()["flash-attn"] == FA2
    seen = json.loads(subprocess.run(
        [str(venv.python), "-c", "import importlib.resources as r; "
         "print(r.files('flash_attn').joinpath('_build_env.json').read_text())"],
        capture_output=True, text=True, check=True).stdout)
    assert (seen["BUILD_TARGET"], seen["GPU_ARCHS"], seen["torch_hip"], seen["torch_cuda"]) == (
        "rocm", "gfx942", HIP, None)
    assert seen["FLASH_ATTN_CUDA_ARCHS"] is None and seen["CUDA_HOME"] is None
    assert node["state"] == "failed" and node["cause"].startswith("verification failed"), steps
