"""The agent's probes: each external system behind one small class with a real implementation.

``collect_facts`` runs them all and returns the node's ``NodeFacts`` (DESIGN §3.1). A probe
that fails becomes a fact with its reason — ``driver: null`` plus "NVML: driver not loaded"
in ``extra["probe_errors"]`` — never an exception. Dependencies: stdlib, ``pynvml`` (loaded
lazily), ``fleet.facts``; never torch, grpc, sqlalchemy or ansible.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetctl.agent.probes.apt import AptProbe
from fleetctl.agent.probes.nvcc import NvccProbe
from fleetctl.agent.probes.nvml import NvmlProbe
from fleetctl.agent.probes.os_info import OsProbe
from fleetctl.agent.probes.rocm import RocmProbe
from fleetctl.agent.probes.system import ProbeError
from fleetctl.agent.probes.target_python import TargetPythonProbe, default_target_python, fallback_python
from fleetctl.fleet.facts import HOSTNAME_RE, NodeFacts

__all__ = ["Probes", "collect_facts", "local_hostname"]


@dataclass
class Probes:
    """The probe set ``collect_facts`` uses; replace any member to inject a fake."""

    nvml: NvmlProbe = field(default_factory=NvmlProbe)
    nvcc: NvccProbe = field(default_factory=NvccProbe)
    target: TargetPythonProbe = field(default_factory=TargetPythonProbe)
    os: OsProbe = field(default_factory=OsProbe)
    apt: AptProbe = field(default_factory=AptProbe)
    rocm: RocmProbe = field(default_factory=RocmProbe)


def local_hostname() -> str:
    """This machine's short host name, made valid for the contract."""
    name = socket.gethostname().split(".")[0] or "localhost"
    if HOSTNAME_RE.match(name):
        return name
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("._-")
    return cleaned or "localhost"


def collect_facts(python_executable: str | None = None, *, check_apt: bool = False, root: str | None = None,
                  hostname: str | None = None, apt_options: Sequence[str] = (),
                  probes: Probes | None = None) -> NodeFacts:
    """Probe this node. ``check_apt`` runs ``apt-get update`` (inside ``root`` when given)."""
    probes = probes or Probes()
    errors: list[str] = []
    extra: dict[str, Any] = {}

    os_result = probes.os.probe()
    errors.extend(os_result.errors)

    nvml = probes.nvml.probe()
    errors.extend(nvml.errors)

    rocm = probes.rocm.probe()  # runs amd-smi/rocm-smi only where they are installed
    errors.extend(rocm.errors)

    nvcc = probes.nvcc.probe()
    errors.extend(nvcc.errors)
    extra["toolkits"] = [t.to_json() for t in nvcc.toolkits]

    interpreter = python_executable or default_target_python()
    try:
        target = probes.target.probe(interpreter)
    except ProbeError as exc:
        target = fallback_python(exc.message)
    errors.extend(target.errors)
    extra.update(target.extra)
    extra["target_python"] = interpreter

    apt = None
    if check_apt:
        apt_result = probes.apt.probe(root, apt_options)
        apt = apt_result.apt
        errors.extend(apt_result.errors)

    extra["probe_errors"] = errors
    return NodeFacts(
        hostname=hostname or local_hostname(),
        os=os_result.os,
        driver=nvml.driver,
        gpus=nvml.gpus + rocm.gpus,
        toolkit=nvcc.active,
        python=target.python,
        torch=target.torch,
        flash_attn=target.flash_attn,
        resources=os_result.resources,
        apt=apt,
        rocm=rocm.rocm,
        extra=extra,
    )
