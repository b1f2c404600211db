"""The agent's probes pointed inside a node root (``fleet-agent run --root DIR``: a rehearsal node).

A simulated node with its own Debian root runs its playbooks chrooted into that root, so the
software they change — the CUDA toolkit (``nvcc``), the target Python and its flash-attn — lives
there. ``probes_in_root(root)`` returns a :class:`agent.probes.Probes` whose nvcc and target-Python
probes run their commands with ``chroot ROOT …`` and look for files under ``ROOT``; paths they
report are the node's own (``/usr/local/cuda/bin/nvcc``), not the host's. GPU and driver stay
simulated (NVML has nothing to see in a root); ``AptProbe`` already takes ``root`` itself.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fleetctl.agent.probes import Probes
from fleetctl.agent.probes.nvcc import NvccProbe
from fleetctl.agent.probes.system import DEFAULT_TIMEOUT_S, CommandResult, CommandRunner, run_command
from fleetctl.agent.probes.target_python import TargetPythonProbe

#: PATH inside the root (what a login shell on a Debian node has before /etc/profile.d)
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def chroot_runner(root: str | os.PathLike[str]) -> CommandRunner:
    """A ``CommandRunner`` that runs ``argv`` inside ``root`` (``chroot ROOT argv…``; no shell)."""
    base = str(Path(root))

    def runner(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
               env: Mapping[str, str] | None = None) -> CommandResult:
        inner_env = {"PATH": ROOT_PATH, "LC_ALL": "C.UTF-8", "HOME": "/root", **(env or {})}
        return run_command(["chroot", base, *argv], timeout=timeout, env=inner_env)

    return runner


def nvcc_probe_in_root(root: str | os.PathLike[str]) -> NvccProbe:
    """The real nvcc probe, looking inside ``root`` (active toolkit: /usr/local/cuda/bin/nvcc, else newest)."""
    base = str(Path(root))
    runner = chroot_runner(base)

    def inside(pattern: str) -> str:
        return base + "/" + pattern.lstrip("/")

    def realpath(path: str) -> str:
        result = runner(["readlink", "-f", path])
        return result.stdout.strip() or path

    def is_executable(path: str) -> bool:
        # asked inside the root: symlinks there (/usr/local/cuda → /usr/local/cuda-12.4) point at its own paths
        return runner(["test", "-x", path]).returncode == 0

    return NvccProbe(runner, env={"PATH": ROOT_PATH}, which=lambda name, path: None,
                     glob_paths=lambda pattern: sorted(p[len(base):] for p in glob.glob(inside(pattern))),
                     is_executable=is_executable, realpath=realpath)


def probes_in_root(root: str | os.PathLike[str]) -> Probes:
    """``Probes`` whose nvcc and target-Python probes look inside ``root``."""
    return Probes(nvcc=nvcc_probe_in_root(root), target=TargetPythonProbe(chroot_runner(root), root=str(Path(root))))
