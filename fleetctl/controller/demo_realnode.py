"""The demo's node on the real executor: a real ``fleet-agent`` running the real playbooks with real pip.

Everything is real but two things, and both say so: the GPU facts come from a simulation profile
(``--simulate a10``: there is no GPU here), and the target environment's torch and the flash-attn wheel are
**stand-ins** (pure-Python wheels without kernels, named and versioned like the real ones). The agent runs
``--executor ansible`` against its own venv: the controller plans ``fa2-wheel``, finds the wheel in its artifact
store (put there with ``fleetctl artifact add``, as an operator would a wheel from a mirror), resolves its
dependency closure (``einops``) from the package index for the node's Python, the agent fetches everything from
the controller and pip installs it; the real verification benchmark then fails — correctly: no GPU; the rollback
removes flash-attn again. The venv's packages are shown before, after the install and after the rollback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.upstream import write_wheel
from fleetctl.fleet.errors import FleetError

PROFILE = "a10"  # an Ampere node whose plan is an upstream release wheel (fa2-wheel)
HOSTNAME = "real-a10"
STANDIN_TORCH = "2.4.1+cu121"  # the a10 profile's torch

_STANDIN_FA = '''"""Stand-in flash-attn (fleetctl demo): the real package's layout, no CUDA kernels."""
__version__ = "{version}"
STAND_IN = True
from flash_attn.flash_attn_interface import flash_attn_func  # noqa: E402,F401
'''
_STANDIN_INTERFACE = '''def flash_attn_func(*args, **kwargs):
    raise RuntimeError("stand-in flash-attn from the fleetctl demo: no CUDA kernels")
'''


class RealNode:
    """Start, drive and stop the demo's real-executor node. ``fleetctl`` runs the CLI with ``--state-dir``."""

    def __init__(self, state: Path, controller_address: str, enroll_address: str,
                 fleetctl: Callable[[Sequence[str]], int]) -> None:
        self.dir = state / "real-node"
        self.state = state
        self.controller_address = controller_address
        self.enroll_address = enroll_address
        self.fleetctl = fleetctl
        self.venv_python = self.dir / "venv" / "bin" / "python"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli_json(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "fleetctl.controller.cli", *args, "--json",
                              "--state-dir", str(self.state)],
                             capture_output=True, text=True, timeout=120, check=False)
        if out.returncode != 0:
            raise FleetError(f"fleetctl {' '.join(args)} failed: {(out.stderr or out.stdout).strip()[-500:]}")
        return json.loads(out.stdout)

    def make_venv(self) -> None:
        """The node's target environment: a venv with pip and a stand-in torch (no kernels)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(self.dir / "venv")], check=True, timeout=300)
        torch = write_wheel(self.dir, "torch", STANDIN_TORCH, files={
            "torch/__init__.py": f'__version__ = "{STANDIN_TORCH}"\nSTAND_IN = True\nfrom torch import cuda, version\n',
            "torch/version.py": f'__version__ = "{STANDIN_TORCH}"\ncuda = "12.1"\n',
            "torch/cuda/__init__.py": "def is_available():\n    return False\n"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
        subprocess.run([str(self.venv_python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(torch)],
                       check=True, timeout=300, env=env)

    def start_agent(self) -> None:
        token = self.cli_json("token", "create", "--ttl", "1h")["token"]
        args = [sys.executable, "-m", "fleetctl.agent.main", "run", "--controller", self.controller_address,
                "--enroll-address", self.enroll_address,
                "--ca", str(self.state / "ca" / "ca.pem"), "--state-dir", str(self.dir / "agent"),
                "--node-state-dir", str(self.dir / "node"), "--python", str(self.venv_python),
                "--simulate", PROFILE, "--hostname", HOSTNAME, "--executor", "ansible", "--token", token]
        log = (self.dir / "agent.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            nodes = self.cli_json("nodes")["nodes"]
            if any(n["hostname"] == HOSTNAME and n["status"] in (NodeStatus.ONLINE, NodeStatus.DEGRADED)
                   for n in nodes):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        tail = (self.dir / "agent.log").read_text(errors="replace")[-1500:]
        raise FleetError(f"the real-executor agent did not come up:\n{tail}", hint=f"see {self.dir / 'agent.log'}")

    def put_standin_wheel(self) -> str:
        """Build the stand-in under the exact file name the plan wants, and add it to the artifact store."""
        plan = self.cli_json("rollout", "flash-attn", "--dry-run", "--nodes", HOSTNAME, "--canary", "0")
        (node,) = plan["nodes"]
        name = node.get("artifact")
        if node.get("variant") != "fa2-wheel" or not isinstance(name, str):
            raise FleetError(f"the demo's real node was planned {node.get('variant')}, not fa2-wheel",
                             hint="the a10 profile or the catalog changed; see `fleetctl rollout flash-attn --dry-run`")
        version, _, rest = name[len("flash_attn-"):].partition("-")
        public = version.partition("+")[0]
        wheel = write_wheel(self.dir, "flash_attn", public, requires=("torch", "einops"),
                            tag=rest[: -len(".whl")], file_version=version,
                            files={"flash_attn/__init__.py": _STANDIN_FA.format(version=public),
                                   "flash_attn/flash_attn_interface.py": _STANDIN_INTERFACE})
        self.fleetctl(["artifact", "add", str(wheel), "--kind", "wheel", "--state-dir", str(self.state)])
        return name

    def packages(self) -> str:
        """The venv's flash-attn, einops and torch, one line (what pip sees)."""
        probe = ("from importlib import metadata as m\n"
                 "def v(d):\n    try:\n        return m.version(d)\n    except m.PackageNotFoundError:\n"
                 "        return 'absent'\n"
                 "print(', '.join(f'{d} {v(d)}' for d in ('flash-attn', 'einops', 'torch')))")
        out = subprocess.run([str(self.venv_python), "-c", probe], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, check=False)
        return out.stdout.strip() or out.stderr.strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
