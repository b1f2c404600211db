"""Issue 19 probes fed real captured output (each fixture names where it was published): AMD (amd-smi, rocm-smi,
/opt/rocm/.info/version), Jetson (/etc/nv_tegra_release → L4T → JetPack), Windows (vswhere.exe → MSVC toolset)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.probes import Probes, collect_facts
from fleetctl.agent.probes.nvcc import NvccProbe
from fleetctl.agent.probes.os_info import OsProbe
from fleetctl.agent.probes.platform_os import (
    NV_TEGRA_RELEASE,
    VSWHERE,
    VSWHERE_ARGS,
    parse_nv_tegra_release,
    parse_vc_tools_version,
    parse_vswhere,
)
from fleetctl.agent.probes.rocm import (
    ROCM_VERSION_FILE,
    RocmProbe,
    gfx_target,
    parse_amd_smi_static,
    parse_rocm_smi,
    parse_rocm_version_file,
)
from fleetctl.agent.probes.system import FileUnreadable
from fleetctl.fleet.facts import RocmFacts, ToolkitFacts, parse_node
from fleetctl.fleet.jetson import jetpack_for_l4t
from tests.unit.agent.conftest import ScriptedRunner, fixture_text, ok

# `amd-smi static --json` on a Radeon RX 7800 XT, as posted (SyntaxWarnings first, cut after the fields shown) in
# https://github.com/nathaninline/ajean/issues/39
AMD_SMI_STATIC_RX7800XT = """/usr/lib/python3.14/site-packages/amdsmi/amdsmi_interface.py:3569: SyntaxWarning: 'return' in a 'finally' block
  return return_dictionary
{
    "gpu_data": [
        {
            "gpu": 0,
            "asic": {
                "market_name": "AMD Radeon RX 7800 XT",
                "vendor_id": "0x1002",
                "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
                "subvendor_id": "0x1eae",
                "device_id": "0x747e",
                "subsystem_id": "0x7801",
                "rev_id": "0xc8",
                "asic_serial": "0x4162405E51BB99B0",
                "oam_id": "N/A",
                "num_compute_units": 60,
                "target_graphics_version": "gfx1101"
            },
            "bus": {
                "bdf": "0000:03:00.0"
            }
        }
    ]
}"""  # noqa: E501

# `rocm-smi --showproductname --showuse --showmeminfo vram --json` on a Radeon RX 7900 XT, from
# https://github.com/marimo-team/marimo/issues/9237
ROCM_SMI_RX7900XT = """{
  "card0": {
    "GPU use (%)": "0",
    "VRAM Total Memory (B)": "21458059264",
    "VRAM Total Used Memory (B)": "27856896",
    "Card Series": "Radeon RX 7900 XT",
    "Card Model": "0x744c",
    "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]",
    "Card SKU": "D70401XT",
    "Subsystem ID": "0x471e",
    "Device Rev": "0xcc",
    "Node ID": "1",
    "GUID": "26967",
    "GFX Version": "gfx1100"
  }
}"""

# `rocm-smi --showproductname --json` on an MI250X (GFX Version printed digit by digit: 9.0.10 → "gfx9010"), from
# https://github.com/ROCm/rocm_smi_lib/issues/159
ROCM_SMI_MI250X = """{
  "card0": {
    "Card Series": "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2",
    "Card Model": "0x7408",
    "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]",
    "Card SKU": "D65201",
    "Subsystem ID": "0x0b0c",
    "Device Rev": "0x00",
    "Node ID": "7",
    "GUID": "58294",
    "GFX Version": "gfx9010"
  }
}"""

# `cat /etc/nv_tegra_release` on a Jetson Orin Nano Super (nvcc 12.6), as pasted in an nsys troubleshooting note of a
# public NVDA-jetson-demo checkout (the search corpus gave the text, not its repository URL)
NV_TEGRA_R36_4_7 = ("# R36 (release), REVISION: 4.7, GCID: 42132812, BOARD: generic, EABI: aarch64, "
                    "DATE: Thu Sep 18 22:54:44 UTC 2025\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")

# `vswhere.exe -products * -format json` on a machine with Build Tools 2022, from
# https://github.com/conan-io/conan/issues/18202 (cut after the fields shown there)
VSWHERE_BUILD_TOOLS_2022 = r"""[
  {
    "instanceId": "2c33f8c6",
    "installDate": "2025-04-10T22:18:32Z",
    "installationName": "VisualStudio/17.13.6+35931.197",
    "installationPath": "C:\\Program Files (x86)\\Microsoft Visual Studio\\2022\\BuildTools",
    "installationVersion": "17.13.35931.197",
    "productId": "Microsoft.VisualStudio.Product.BuildTools",
    "displayName": "Visual Studio Build Tools 2022",
    "channelId": "VisualStudio.17.Release"
  }
]"""


# ---------------------------------------------------------------- AMD

def test_amd_smi_static_json_gives_the_gfx_target_and_skips_warnings_before_it() -> None:
    [gpu] = parse_amd_smi_static(AMD_SMI_STATIC_RX7800XT)
    assert (gpu.index, gpu.name, gpu.vendor, gpu.arch, gpu.compute_capability) == (
        0, "AMD Radeon RX 7800 XT", "amd", "gfx1101", "11.0")
    assert gpu.uuid == "0x4162405E51BB99B0" and gpu.memory_mib == 0  # static --json without --vram: size unknown


def test_rocm_smi_json_gives_name_arch_and_vram() -> None:
    [gpu] = parse_rocm_smi(ROCM_SMI_RX7900XT)
    assert (gpu.name, gpu.arch, gpu.compute_capability, gpu.memory_mib) == (
        "Radeon RX 7900 XT", "gfx1100", "11.0", 21458059264 // (1024 * 1024))
    assert gpu.uuid == "amd-guid-26967" and gpu.vendor == "amd"


def test_rocm_smi_digit_by_digit_gfx_version_is_the_llvm_target() -> None:
    [gpu] = parse_rocm_smi(ROCM_SMI_MI250X)
    assert (gpu.arch, gpu.compute_capability) == ("gfx90a", "9.0")


@pytest.mark.parametrize(("printed", "target"), [
    ("gfx942", "gfx942"), ("gfx90a", "gfx90a"), ("gfx9010", "gfx90a"), ("gfx1100", "gfx1100"),
    ("gfx1030", "gfx1030"), ("gfx950", "gfx950"), ("N/A", None), ("gfxzz", None),
])
def test_gfx_target(printed: str, target: str | None) -> None:
    assert gfx_target(printed) == target


def test_rocm_version_file() -> None:
    assert parse_rocm_version_file("6.2.0-66\n") == "6.2.0"
    assert parse_rocm_version_file("7.2.4\n") == "7.2.4"
    assert parse_rocm_version_file("garbage") is None


def _rocm_probe(tools: dict[str, str], files: dict[str, str]) -> RocmProbe:
    answers: dict[tuple[str, ...], Any] = {}
    if "amd-smi" in tools:
        answers[("/opt/rocm/bin/amd-smi", "static", "--json")] = ok([], tools["amd-smi"])
    if "rocm-smi" in tools:
        answers[("/opt/rocm/bin/rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json")] = ok(
            [], tools["rocm-smi"])

    def read(path: str) -> str:
        if path not in files:
            raise FileUnreadable(f"{path}: No such file or directory")
        return files[path]
    return RocmProbe(ScriptedRunner(answers), read,
                     which=lambda name: f"/opt/rocm/bin/{name}" if name in tools else None)


def test_rocm_probe_prefers_amd_smi_and_reads_the_rocm_release() -> None:
    result = _rocm_probe({"amd-smi": AMD_SMI_STATIC_RX7800XT, "rocm-smi": ROCM_SMI_RX7900XT},
                         {ROCM_VERSION_FILE: "6.3.1-48\n"}).probe()
    assert result.rocm == RocmFacts(version="6.3.1", smi="amd-smi") and result.gpus[0].arch == "gfx1101"


def test_rocm_probe_falls_back_to_rocm_smi_and_runs_nothing_on_other_nodes() -> None:
    result = _rocm_probe({"rocm-smi": ROCM_SMI_MI250X}, {ROCM_VERSION_FILE: "5.7.1\n"}).probe()
    assert result.rocm == RocmFacts(version="5.7.1", smi="rocm-smi") and result.gpus[0].arch == "gfx90a"
    nothing = _rocm_probe({}, {}).probe()
    assert (nothing.rocm, nothing.gpus, nothing.errors) == (None, (), ())


def test_rocm_probe_unreadable_output_is_a_fact() -> None:
    result = _rocm_probe({"amd-smi": "not json"}, {}).probe()
    assert result.gpus == () and "cannot read" in result.errors[0]


# ---------------------------------------------------------------- Jetson

def test_nv_tegra_release_to_l4t_and_jetpack() -> None:
    assert parse_nv_tegra_release(NV_TEGRA_R36_4_7) == "36.4.7"
    assert parse_nv_tegra_release("# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64") == "36.4.0"
    assert parse_nv_tegra_release("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref") == "32.7.1"
    assert parse_nv_tegra_release("not a tegra file") is None


@pytest.mark.parametrize(("l4t", "jetpack"), [
    ("36.4.0", ("6.1", "12.6")), ("36.4.3", ("6.2", "12.6")), ("36.3.0", ("6.0", "12.2")),
    ("35.4.1", ("5.1.2", "11.4")), ("35.2.1", ("5.1", "11.4")), ("32.7.1", ("4.6.1", "10.2")), ("30.1", None),
])
def test_jetpack_table(l4t: str, jetpack: tuple[str, str] | None) -> None:
    assert jetpack_for_l4t(l4t) == jetpack


def _os_probe(files: dict[str, str], *, system: str = "Linux", runner: ScriptedRunner | None = None) -> OsProbe:
    def read(path: str) -> str:
        if path not in files:
            raise FileUnreadable(f"{path}: No such file or directory")
        return files[path]
    return OsProbe(runner or ScriptedRunner({}), read, machine=lambda: "aarch64", kernel=lambda: "5.15.148-tegra",
                   confstr_glibc=lambda: "glibc 2.35", cpu_cores=lambda: 6, system=lambda: system,
                   exists=lambda path: path in files)


def test_os_probe_on_a_jetson_reports_l4t_and_jetpack() -> None:
    result = _os_probe({"/etc/os-release": "ID=ubuntu\nVERSION_ID=\"22.04\"\n", "/proc/meminfo": "MemTotal: 7802880 kB",
                        NV_TEGRA_RELEASE: "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic\n"}).probe()
    assert (result.os.l4t, result.os.jetpack, result.os.family) == ("36.4.0", "6.1", None)
    assert result.errors == ()


# ---------------------------------------------------------------- Windows

def test_vswhere_json_and_the_toolset_version() -> None:
    assert parse_vswhere(VSWHERE_BUILD_TOOLS_2022) == r"C:\Program Files (x86)\Microsoft Visual Studio\2022\BuildTools"
    assert parse_vswhere("[]") is None
    assert parse_vc_tools_version("14.40.33807\n") == "14.40"
    assert parse_vc_tools_version("") is None


def test_os_probe_on_windows_reports_the_family_and_msvc() -> None:
    install = r"C:\Program Files (x86)\Microsoft Visual Studio\2022\BuildTools"
    import os
    tools_file = os.path.join(install, "VC", "Auxiliary", "Build", "Microsoft.VCToolsVersion.default.txt")
    runner = ScriptedRunner({(VSWHERE, *VSWHERE_ARGS): ok([], VSWHERE_BUILD_TOOLS_2022)})
    result = _os_probe({VSWHERE: "", tools_file: "14.42.34433\n"}, system="Windows", runner=runner).probe()
    assert (result.os.family, result.os.id, result.os.msvc, result.os.glibc) == ("windows", "windows", "14.42", None)
    without = _os_probe({}, system="Windows").probe()
    assert without.os.msvc is None and "Build Tools not installed" in without.errors[0]


def _nvcc_exe(toolkit: Path, fixture: str) -> Path:
    """A stand-in ``bin/nvcc.exe`` under ``toolkit`` that answers ``-V`` with a real nvcc's output."""
    exe = toolkit / "bin" / "nvcc.exe"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{fixture_text(fixture)}EOF\n")
    exe.chmod(0o755)
    return exe


def test_windows_nvcc_from_cuda_path_and_the_installers_folders(tmp_path: Path) -> None:
    """A Windows node's toolkits as the CUDA installer lays them out (a tree of real files, the real probe with its
    real which/glob/runner): %CUDA_PATH%\\bin\\nvcc.exe is the active one, every vX.Y folder and CUDA_PATH_VX_Y
    is listed once, and nvcc.exe on PATH beats them all."""
    program_files = tmp_path / "Program Files"
    cuda = program_files / "NVIDIA GPU Computing Toolkit" / "CUDA"
    v124, v118 = _nvcc_exe(cuda / "v12.4", "nvcc_12.4.txt"), _nvcc_exe(cuda / "v11.8", "nvcc_11.8.txt")
    env = {"Path": str(tmp_path / "empty"), "ProgramFiles": str(program_files), "CUDA_PATH": str(cuda / "v11.8"),
           "CUDA_PATH_V11_8": str(cuda / "v11.8"), "CUDA_PATH_V12_4": str(cuda / "v12.4")}
    result = NvccProbe(env=env, windows=True).probe()
    assert result.active == ToolkitFacts(nvcc="11.8", path=str(v118)) and result.errors == ()
    assert sorted((t.nvcc, t.path, t.active) for t in result.toolkits) == [("11.8", str(v118), True),
                                                                          ("12.4", str(v124), False)]

    on_path = _nvcc_exe(tmp_path / "conda" / "Library", "nvcc_13.0.txt")
    result = NvccProbe(env={**env, "Path": str(on_path.parent)}, windows=True).probe()
    assert result.active == ToolkitFacts(nvcc="13.0", path=str(on_path)) and len(result.toolkits) == 3

    without_cuda_path = NvccProbe(env={k: v for k, v in env.items() if k != "CUDA_PATH"}, windows=True).probe()
    assert without_cuda_path.active == ToolkitFacts(nvcc="12.4", path=str(v124))  # the newest installed

    none = NvccProbe(env={"Path": str(tmp_path / "empty"), "ProgramFiles": str(tmp_path / "nothing")},
                     windows=True).probe()
    assert none.active is None and none.errors == (
        r"nvcc: no CUDA toolkit found (PATH, %CUDA_PATH%, %CUDA_PATH_V*%, %ProgramFiles%\NVIDIA GPU Computing "
        r"Toolkit\CUDA)",)
    # the Linux probe does not take a Windows tree's nvcc.exe for a toolkit
    linux = NvccProbe(env={"PATH": str(tmp_path / "empty"), "CUDA_PATH": str(cuda / "v12.4")}, windows=False,
                      glob_paths=lambda pattern: []).candidates()
    assert str(v124) not in linux


def test_collect_facts_with_an_amd_probe_gives_facts_the_contract_accepts() -> None:
    probes = Probes(rocm=_rocm_probe({"rocm-smi": ROCM_SMI_MI250X}, {ROCM_VERSION_FILE: "6.2.0-66\n"}))
    facts = collect_facts(hostname="amd-node", probes=probes)
    assert facts.rocm == RocmFacts(version="6.2.0", smi="rocm-smi")
    assert any(g.arch == "gfx90a" for g in facts.gpus)
    assert parse_node(json.loads(json.dumps(facts.to_json()))) == facts
