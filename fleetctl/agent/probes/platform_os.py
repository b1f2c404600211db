"""OS facts beyond os-release: Jetson's L4T release (``/etc/nv_tegra_release``) and, on Windows, the MSVC toolset
vswhere.exe finds. Pure parsers fed captured output in tests/unit/agent/test_platform_probes.py; the runners read
or run only what is there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping

from fleetctl.agent.probes.system import CommandRunner, FileReader, ProbeError, read_text, run_command
from fleetctl.fleet.facts import DOTTED_RE

NV_TEGRA_RELEASE = "/etc/nv_tegra_release"
# "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: …"
_TEGRA_RE = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", re.MULTILINE)
VSWHERE = r"C:\Program Files (x86)\Microsoft Visual Studio\Installer\vswhere.exe"
# the C++ x64 build tools component: a Visual Studio without it cannot build CUDA extensions
VSWHERE_ARGS = ("-latest", "-products", "*", "-requires", "Microsoft.VisualStudio.Component.VC.Tools.x86.x64",
                "-format", "json")
VC_TOOLS_VERSION_FILE = ("VC", "Auxiliary", "Build", "Microsoft.VCToolsVersion.default.txt")


def parse_nv_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.0, …`` → ``36.4.0``; ``# R32 (release), REVISION: 7.1`` → ``32.7.1``."""
    match = _TEGRA_RE.search(text)
    if match is None:
        return None
    return f"{match.group(1)}.{match.group(2)}.{match.group(3) or 0}"


def parse_vswhere(text: str) -> str | None:
    """The installation path of the newest Visual Studio with the C++ x64 tools (``[]``: none)."""
    data = json.loads(text or "[]")
    for install in data if isinstance(data, list) else []:
        if isinstance(install, Mapping) and isinstance(install.get("installationPath"), str):
            return str(install["installationPath"])
    return None


def parse_vc_tools_version(text: str) -> str | None:
    """``14.40.33807`` (Microsoft.VCToolsVersion.default.txt) → ``14.40``: the toolset nvcc's host check reads."""
    parts = text.strip().split(".")
    version = ".".join(parts[:2])
    return version if len(parts) >= 2 and DOTTED_RE.match(version) else None


def probe_l4t(reader: FileReader = read_text,
              exists: Callable[[str], bool] = os.path.exists) -> tuple[str | None, list[str]]:
    """The L4T release of a Jetson; (None, []) on any other machine."""
    if not exists(NV_TEGRA_RELEASE):
        return None, []
    try:
        text = reader(NV_TEGRA_RELEASE)
    except ProbeError as exc:
        return None, [f"os: {exc.message}"]
    release = parse_nv_tegra_release(text)
    if release is None:
        return None, [f"os: {NV_TEGRA_RELEASE} is not in the '# R36 (release), REVISION: 4.0' form"]
    return release, []


def probe_msvc(runner: CommandRunner = run_command, reader: FileReader = read_text,
               exists: Callable[[str], bool] = os.path.exists) -> tuple[str | None, list[str]]:
    """The MSVC toolset of the newest Visual Studio/Build Tools with the C++ x64 tools; None with the reason."""
    if not exists(VSWHERE):
        return None, ["os: no vswhere.exe: Visual Studio / Build Tools not installed "
                      "(install Build Tools with the 'Desktop development with C++' workload)"]
    try:
        result = runner([VSWHERE, *VSWHERE_ARGS], timeout=30.0)
        path = parse_vswhere(result.stdout) if result.returncode == 0 else None
    except (ProbeError, ValueError) as exc:
        return None, [f"os: vswhere.exe failed: {exc}"]
    if path is None:
        return None, ["os: no Visual Studio with the C++ x64 build tools "
                      "(Microsoft.VisualStudio.Component.VC.Tools.x86.x64)"]
    try:
        version = parse_vc_tools_version(reader(os.path.join(path, *VC_TOOLS_VERSION_FILE)))
    except ProbeError as exc:
        return None, [f"os: {exc.message}"]
    return version, [] if version else [f"os: unreadable MSVC toolset version under {path}"]
