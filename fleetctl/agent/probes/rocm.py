"""AMD GPUs and the ROCm stack: ``amd-smi static --json`` (ROCm ≥ 6), else ``rocm-smi … --json`` (older stacks),
and the ROCm release from ``/opt/rocm/.info/version``.

The parsers are pure (fed captured output in tests/unit/agent/test_platform_probes.py); ``RocmProbe`` runs a tool
only when it is on PATH, so an NVIDIA or CPU node pays nothing and reports no error.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetctl.agent.probes.system import CommandRunner, FileReader, ProbeError, read_text, run_command
from fleetctl.fleet.facts import DOTTED_RE, GpuFacts, RocmFacts

ROCM_VERSION_FILE = "/opt/rocm/.info/version"
SMI_TIMEOUT_S = 30.0
_TARGET_RE = re.compile(r"^gfx[0-9a-f]{3,5}$")


@dataclass(frozen=True)
class RocmResult:
    rocm: RocmFacts | None
    gpus: tuple[GpuFacts, ...]
    errors: tuple[str, ...] = ()


def parse_rocm_version_file(text: str) -> str | None:
    """``6.2.0-66`` (release-build) → ``6.2.0``; None when the file holds something else."""
    release = text.strip().split("-", 1)[0]
    return release if DOTTED_RE.match(release) else None


def gfx_target(text: str) -> str | None:
    """The LLVM target name (``gfx90a``) from what the tools print.

    amd-smi prints the target (``gfx942``); rocm-smi prints KFD's gfx_target_version digit by digit, so MI250X's
    9.0.10 comes out as ``gfx9010`` (ROCm/rocm_smi_lib#159) — the stepping is hex in the target name (``a``)."""
    value = text.strip().lower()
    if not value.startswith("gfx"):
        return None
    digits = value[3:]
    if not digits.isdigit():  # already a target name with a hex stepping
        return value if _TARGET_RE.match(value) else None
    major_len = 2 if digits.startswith("1") and len(digits) >= 4 else 1  # gfx10xx/11xx/12xx vs gfx9xx
    if len(digits) < major_len + 2:
        return None
    major, minor, stepping = digits[:major_len], digits[major_len], int(digits[major_len + 1:])
    target = f"gfx{major}{minor}{stepping:x}"
    return target if _TARGET_RE.match(target) else None


def _capability(target: str) -> str:
    """``gfx942`` → ``9.4``: the (major, minor) torch.cuda.get_device_capability() reports on a ROCm build."""
    digits = target[3:]
    major_len = 2 if len(digits) == 4 else 1
    return f"{int(digits[:major_len])}.{int(digits[major_len], 16)}"


def _amd_gpu(index: int, name: str, target: str, memory_mib: int, uuid: str) -> GpuFacts:
    return GpuFacts(index=index, name=name, compute_capability=_capability(target), memory_mib=memory_mib,
                    uuid=uuid, vendor="amd", arch=target)


def _vram_mib(vram: Any) -> int:
    """amd-smi's ``vram.size`` ({"value": 196592, "unit": "MB"}); 0 when it printed none."""
    size = vram.get("size") if isinstance(vram, Mapping) else None
    if isinstance(size, Mapping) and isinstance(size.get("value"), int):
        return int(size["value"]) * (1024 if str(size.get("unit", "MB")).upper() == "GB" else 1)
    return 0


def _from_first_json_line(text: str) -> str:
    """amd-smi on a newer Python prints SyntaxWarnings before its JSON when both streams go to one place
    (nathaninline/ajean#39): start at the first line that opens an object or a list."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(("{", "["))), 0)
    return "\n".join(lines[start:])


def parse_amd_smi_static(text: str) -> tuple[GpuFacts, ...]:
    """``amd-smi static --json``: a list of GPUs, or ``{"gpu_data": [...]}`` in newer releases."""
    data = json.loads(_from_first_json_line(text))
    rows = data.get("gpu_data", []) if isinstance(data, Mapping) else data
    gpus = []
    for position, row in enumerate(rows if isinstance(rows, list) else []):
        asic = row.get("asic") if isinstance(row, Mapping) else None
        target = gfx_target(str(asic.get("target_graphics_version", ""))) if isinstance(asic, Mapping) else None
        if asic is None or target is None:
            continue
        index = row.get("gpu") if isinstance(row.get("gpu"), int) else position
        bus = row.get("bus") if isinstance(row.get("bus"), Mapping) else {}
        serial = str(asic.get("asic_serial") or "")
        uuid = serial if serial not in ("", "N/A") else str(bus.get("bdf") or f"amd-gpu-{index}")
        gpus.append(_amd_gpu(index, str(asic.get("market_name") or target), target, _vram_mib(row.get("vram")),
                             uuid))
    return tuple(gpus)


def parse_rocm_smi(text: str) -> tuple[GpuFacts, ...]:
    """``rocm-smi --showproductname --showmeminfo vram --json``: ``{"card0": {...}, "system": {...}}``.

    Key spelling changed across releases ("Card series" then "Card Series"); VRAM is in bytes when asked for."""
    data = json.loads(text)
    gpus = []
    for key, card in data.items() if isinstance(data, Mapping) else ():
        match = re.fullmatch(r"card(\d+)", key)
        if match is None or not isinstance(card, Mapping):
            continue  # "system": driver version and the like
        fields = {k.lower(): v for k, v in card.items()}
        target = gfx_target(str(fields.get("gfx version", "")))
        if target is None:
            continue
        vram = str(fields.get("vram total memory (b)", "0"))
        name = str(fields.get("card series") or fields.get("device name") or target)
        uuid = str(fields.get("unique id") or "")
        if uuid in ("", "N/A"):
            uuid = f"amd-guid-{fields.get('guid', match.group(1))}"
        gpus.append(_amd_gpu(int(match.group(1)), name, target, int(vram) // (1024 * 1024) if vram.isdigit() else 0,
                             uuid))
    return tuple(gpus)


class RocmProbe:
    def __init__(self, runner: CommandRunner = run_command, reader: FileReader = read_text, *,
                 which: Callable[[str], str | None] = shutil.which) -> None:
        self._runner = runner
        self._reader = reader
        self._which = which

    def probe(self) -> RocmResult:
        tools: list[tuple[str, list[str], Callable[[str], tuple[GpuFacts, ...]]]] = [
            ("amd-smi", ["static", "--json"], parse_amd_smi_static),
            ("rocm-smi", ["--showproductname", "--showmeminfo", "vram", "--json"], parse_rocm_smi),
        ]
        errors: list[str] = []
        for tool, args, parse in tools:
            path = self._which(tool)
            if path is None:
                continue
            try:
                result = self._runner([path, *args], timeout=SMI_TIMEOUT_S)
                gpus = parse(result.stdout) if result.returncode == 0 else ()
            except ProbeError as exc:
                errors.append(f"rocm: {exc.message}")
                continue
            except (ValueError, TypeError, AttributeError) as exc:  # not the JSON shape this parser knows
                errors.append(f"rocm: {tool} printed output this agent cannot read ({exc}); "
                              "report it with the tool's version")
                continue
            if result.returncode != 0:
                errors.append(f"rocm: {tool} exited {result.returncode}: {result.stderr.strip()[-200:]}")
                continue
            return RocmResult(self._rocm(tool), gpus, tuple(errors))
        return RocmResult(None, (), tuple(errors))

    def _rocm(self, tool: str) -> RocmFacts | None:
        try:
            version = parse_rocm_version_file(self._reader(ROCM_VERSION_FILE))
        except ProbeError:
            return None
        return None if version is None else RocmFacts(version=version, smi=tool)
