"""The node's *target* Python environment (where torch and flash-attn live), probed by running it.

The agent never imports torch: it runs ``probe_target.py`` (its source passed with ``-c``)
under the target interpreter and parses the JSON line it prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from agent.probes.system import CommandRunner, ProbeError, run_command
from fleet.facts import (
    ARCH_RE,
    DOTTED_RE,
    PY_VERSION_RE,
    TORCH_VERSION_RE,
    FlashAttnFacts,
    PythonFacts,
    TorchFacts,
)

TARGET_TIMEOUT_S = 120.0  # importing torch on a cold disk can take tens of seconds
ENV_TARGET_PYTHON = "FLEET_TARGET_PYTHON"
# FA2/FA1 first: that is what the product installs and what "already at the target version" compares.
_VARIANT_ORDER = {"fa2": 0, "fa1": 1, "fa3": 2, "fa4": 3}


@dataclass(frozen=True)
class TargetResult:
    python: PythonFacts
    torch: TorchFacts | None
    flash_attn: FlashAttnFacts | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


def probe_script_source() -> str:
    return resources.files("agent.probes").joinpath("probe_target.py").read_text(encoding="utf-8")


def default_target_python(env: Mapping[str, str] | None = None,
                          which: Callable[[str, str | None], str | None] | None = None) -> str:
    """``$FLEET_TARGET_PYTHON``, else ``python3`` on PATH, else the agent's own interpreter."""
    env = os.environ if env is None else env
    which = which or (lambda name, path: shutil.which(name, path=path))
    return env.get(ENV_TARGET_PYTHON) or which("python3", env.get("PATH")) or sys.executable


def _normalise_version(text: str) -> str:
    """'3.0.0.b1' → '3.0.0b1' (PEP 440 spelling the facts contract accepts)."""
    return re.sub(r"\.(a|b|rc)(\d+)", r"\1\2", text.strip())


def parse_probe_output(stdout: str, *, interpreter: str) -> TargetResult:
    """Parse the JSON line ``probe_target.py`` printed; raise ``ProbeError`` when there is none."""
    lines = [line for line in stdout.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise ProbeError(f"target python {interpreter}: the probe printed no JSON")
    try:
        data = json.loads(lines[-1])
    except ValueError as exc:
        raise ProbeError(f"target python {interpreter}: the probe's JSON is malformed ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("python"), dict):
        raise ProbeError(f"target python {interpreter}: the probe's JSON has no python section")
    errors: list[str] = []

    py = data["python"]
    version = str(py.get("version", ""))
    if not PY_VERSION_RE.match(version):
        raise ProbeError(f"target python {interpreter}: unrecognised Python version {version!r}")
    python = PythonFacts(version=version, executable=str(py.get("executable") or interpreter))
    extra: dict[str, Any] = {"python_cp_tag": py.get("cp_tag"), "python_implementation": py.get("implementation")}

    torch = None
    torch_data = data.get("torch")
    if isinstance(torch_data, dict):
        torch, torch_errors = _torch_facts(torch_data)
        errors.extend(torch_errors)
        if torch_data.get("hip"):
            extra["torch_hip"] = torch_data["hip"]
        extra["torch_cuda_available"] = torch_data.get("cuda_available")
        extra["torch_device_count"] = torch_data.get("device_count")
    else:
        errors.append(f"torch: not importable in {python.executable}: {data.get('torch_error') or 'unknown reason'}")

    flash_attn = None
    installed = [d for d in data.get("flash_attn") or [] if isinstance(d, dict)]
    if data.get("flash_attn_error"):
        errors.append(f"flash-attn: {data['flash_attn_error']}")
    if installed:
        extra["flash_attn_installed"] = installed
        installed.sort(key=lambda d: _VARIANT_ORDER.get(str(d.get("variant")), 9))
        first = installed[0]
        fa_version = _normalise_version(str(first.get("version", "")))
        if TORCH_VERSION_RE.match(fa_version):
            flash_attn = FlashAttnFacts(version=fa_version, variant=str(first.get("variant")))
        else:
            errors.append(f"flash-attn: unrecognised version {first.get('version')!r} of {first.get('distribution')}")
    return TargetResult(python=python, torch=torch, flash_attn=flash_attn, extra=extra, errors=tuple(errors))


def _torch_facts(data: Mapping[str, Any]) -> tuple[TorchFacts | None, list[str]]:
    version = str(data.get("version", ""))
    if not TORCH_VERSION_RE.match(version):
        return None, [f"torch: unrecognised version {version!r}"]
    errors: list[str] = []
    cuda = data.get("cuda")
    if cuda is not None and not (isinstance(cuda, str) and DOTTED_RE.match(cuda)):
        errors.append(f"torch: unrecognised torch.version.cuda {cuda!r}; reported as null")
        cuda = None
    arch_list: list[str] = []
    for arch in data.get("arch_list") or []:
        if isinstance(arch, str) and ARCH_RE.match(arch):
            if arch not in arch_list:
                arch_list.append(arch)
        else:
            errors.append(f"torch: arch {arch!r} is not sm_XY/compute_XY; left out")
    if cuda is not None and not arch_list:
        errors.append("torch: CUDA build but no arch list could be read")
    return TorchFacts(version=version, cuda=cuda, cxx11abi=bool(data.get("cxx11abi")),
                      arch_list=tuple(arch_list)), errors


class TargetPythonProbe:
    def __init__(self, runner: CommandRunner = run_command, *, script: str | None = None,
                 timeout: float = TARGET_TIMEOUT_S) -> None:
        self._runner = runner
        self._script = script
        self._timeout = timeout

    def probe(self, interpreter: str) -> TargetResult:
        """Probe ``interpreter``. When it cannot run at all, raise ``ProbeError`` (the caller decides)."""
        script = self._script if self._script is not None else probe_script_source()
        result = self._runner([interpreter, "-c", script], timeout=self._timeout)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()
            raise ProbeError(f"target python {interpreter}: the probe exited {result.returncode}"
                             + (f": {tail[-1]}" if tail else ""))
        return parse_probe_output(result.stdout, interpreter=interpreter)


def fallback_python(reason: str) -> TargetResult:
    """When the target interpreter cannot run: describe the agent's own, and say so."""
    version = ".".join(str(p) for p in sys.version_info[:3])
    return TargetResult(
        python=PythonFacts(version=version, executable=sys.executable), torch=None, flash_attn=None,
        extra={"python_is_agent_fallback": True},
        errors=(reason, f"python: reporting the agent's own interpreter {sys.executable} instead; torch unknown"),
    )
