"""Issue 19: every node of a mixed fleet gets a right plan — ROCm, Windows, Jetson, free-threaded Python, old torch.

Rows read the simulated fleet's profiles (agent/profiles) and change one fact at a time; each asserts the variant,
the release, what is built or run, and the reason a person reads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.catalog import builtin_catalog, parse_catalog_text
from fleetctl.controller.resolver import Decision, Policy, resolve
from fleetctl.fleet.errors import FactsError
from fleetctl.fleet.facts import parse_node

PROFILES = Path(__file__).resolve().parents[3] / "fleetctl" / "agent" / "profiles"
NEWEST = "2.8.3.post1"


def profile(name: str, **changes: Any) -> dict[str, Any]:
    """A profile's facts with ``section__key=value`` (or ``key=value``) changes."""
    data: dict[str, Any] = copy.deepcopy(json.loads((PROFILES / f"{name}.json").read_text()))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return data


def plan(data: dict[str, Any], policy: Policy | None = None, catalog_text: str | None = None) -> Decision:
    catalog = builtin_catalog() if catalog_text is None else parse_catalog_text(catalog_text, "user", "test").merged(
        builtin_catalog())
    return resolve(parse_node(data), catalog, policy or Policy())


def text(decision: Decision) -> str:
    return " | ".join((*decision.reasons, *(f"{r.candidate}: {r.reason}" for r in decision.rejected)))


# --- facts ----------------------------------------------------------------------------------

def test_rocm_facts_parse_gfx_archs_and_round_trip() -> None:
    data = profile("mi300x")
    facts = parse_node(data)
    assert facts.gpus[0].arch == "gfx942" and facts.gpus[0].is_amd
    assert facts.torch is not None and facts.torch.hip == "6.2.41133-dd7f95766" and "gfx90a" in facts.torch.arch_list
    assert facts.rocm is not None and facts.rocm.version == "6.2.0"
    out = facts.to_json()
    assert out["rocm"] == data["rocm"] and out["gpus"][0]["arch"] == "gfx942"


def test_old_facts_print_without_the_additions() -> None:
    data = profile("h100")
    assert parse_node(data).to_json() == {k: v for k, v in data.items() if k not in ("description", "problem")}


@pytest.mark.parametrize(("change", "message"), [
    ({"python__abi": "cp313x"}, "CPython ABI tag"),
    ({"os__family": "macos"}, "is not one of linux, windows"),
    ({"gpus": [{"index": 0, "name": "x", "compute_capability": "9.4", "memory_mib": 1, "uuid": "u",
                "vendor": "intel"}]}, "is not one of nvidia, amd"),
])
def test_bad_additions_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(FactsError, match=message):
        parse_node(profile("h100", **change))


# --- ROCm -----------------------------------------------------------------------------------

def test_mi300x_builds_with_composable_kernel_for_gfx942() -> None:
    d = plan(profile("mi300x"))
    assert (d.variant, d.flash_attn_version, d.steps) == ("fa2-source", NEWEST, ("build-from-source", "verify"))
    assert d.build is not None and d.build.env["GPU_ARCHS"] == "gfx942" and d.build.env["BUILD_TARGET"] == "rocm"
    assert "backend=rocm-ck" in d.build.build_key and "torch_hip=6.2" in d.build.build_key
    assert "Composable Kernel" in text(d) and "no ROCm wheels" in text(d)


def test_rdna3_gets_the_triton_amd_backend() -> None:
    gpus = [{"index": 0, "name": "AMD Radeon RX 7900 XTX", "compute_capability": "11.0", "memory_mib": 24560,
             "uuid": "u0", "vendor": "amd", "arch": "gfx1100"}]
    d = plan(profile("mi300x", gpus=gpus))
    assert d.variant == "fa2-source" and d.build is not None
    assert d.build.env["FLASH_ATTENTION_TRITON_AMD_ENABLE"] == "TRUE" and "GPU_ARCHS" not in d.build.env
    assert "at run time" in text(d)


def test_mi100_gets_sdpa_with_the_reason() -> None:
    gpus = [{"index": 0, "name": "AMD Instinct MI100", "compute_capability": "9.0", "memory_mib": 32752,
             "uuid": "u0", "vendor": "amd", "arch": "gfx908"}]
    d = plan(profile("mi300x", gpus=gpus))
    assert d.variant == "sdpa" and "gfx908" in text(d) and "neither a Composable Kernel build" in text(d)


@pytest.mark.parametrize(("change", "reason"), [
    ({"torch": {"version": "2.5.1+cu124", "cuda": "12.4", "cxx11abi": False, "arch_list": ["sm_90"]}},
     "is not a ROCm build"),
    ({"torch": None}, "torch is not installed"),
    ({"rocm": {"version": "5.7.1", "smi": "rocm-smi"}}, "older than 6.0"),
])
def test_rocm_blocked_says_what_to_fix(change: dict[str, Any], reason: str) -> None:
    d = plan(profile("mi300x", **change))
    assert d.variant == "blocked" and reason in text(d)


# --- Windows --------------------------------------------------------------------------------

def test_windows_source_build_with_msvc_and_the_seed_commands_never_a_linux_wheel() -> None:
    d = plan(profile("windows-rtx4090"))
    assert (d.variant, d.flash_attn_version, d.steps) == ("fa2-source", NEWEST, ())
    assert d.execution is not None and "not executed by the agent" in d.execution
    assert "set MAX_JOBS=4" in d.commands and "set DISTUTILS_USE_SDK=1" in d.commands
    assert any("--no-build-isolation" in c for c in d.commands)
    assert "linux_" not in (d.artifact or "") and "linux_* wheel never installs on Windows" in text(d)
    assert d.to_json()["execution"] == d.execution and d.to_json()["commands"] == list(d.commands)


def test_windows_takes_a_community_wheel_the_operator_added() -> None:
    name = f"flash_attn-{NEWEST}+cu12torch2.5cxx11abiFALSE-cp311-cp311-win_amd64.whl"
    d = plan(profile("windows-rtx4090"), catalog_text=name + "\n")
    assert (d.variant, d.artifact, d.steps) == ("fa2-wheel", name, ())
    assert any(name in c for c in d.commands)


@pytest.mark.parametrize(("change", "reason"), [
    ({"os__msvc": None}, "no MSVC found"),
    ({"toolkit": {"nvcc": "12.1", "path": "C:/cuda/nvcc.exe"}}, "unsupported Microsoft Visual Studio version"),
    ({"toolkit": None}, "no nvcc on the node"),
])
def test_windows_without_a_working_toolchain_gets_sdpa_and_what_to_install(change: dict[str, Any],
                                                                          reason: str) -> None:
    d = plan(profile("windows-rtx4090", **change))
    assert d.variant == "sdpa" and reason in text(d) and not d.commands


def test_windows_turing_is_not_planned_fa1() -> None:
    gpus = [{"index": 0, "name": "NVIDIA GeForce RTX 2080", "compute_capability": "7.5", "memory_mib": 8192,
             "uuid": "u0", "vendor": "nvidia"}]
    assert plan(profile("windows-rtx4090", gpus=gpus)).variant == "sdpa"


# --- Jetson ---------------------------------------------------------------------------------

def test_jetson_orin_builds_sm80_code_with_the_jetpack_toolkit() -> None:
    d = plan(profile("jetson-orin"))
    assert (d.variant, d.steps) == ("fa2-source", ("build-from-source", "verify"))
    assert d.build is not None and d.build.env["FLASH_ATTN_CUDA_ARCHS"] == "80"
    assert "platform=linux_aarch64" in d.build.build_key
    assert "JetPack 6.1 with CUDA 12.6" in text(d) and "nvidia-jetpack" in text(d)


def test_jetson_torch_newer_than_jetpack_cuda_is_blocked() -> None:
    d = plan(profile("jetson-orin", os__l4t="35.4.1"))  # JetPack 5.1.2 ships CUDA 11.4; torch is cu126
    assert d.variant == "blocked" and "supports at most CUDA 11.4" in text(d)


def test_jetson_xavier_gets_sdpa() -> None:
    gpus = [{"index": 0, "name": "Xavier", "compute_capability": "7.2", "memory_mib": 31000, "uuid": "u0"}]
    torch = {"version": "2.1.0a0+41361538.nv23.06", "cuda": "11.4", "cxx11abi": True, "arch_list": ["sm_72", "sm_87"]}
    d = plan(profile("jetson-orin", gpus=gpus, os__l4t="35.4.1", torch=torch))
    assert d.variant == "sdpa" and "7.2 < 7.5" in text(d)


# --- free-threaded Python -------------------------------------------------------------------

def test_free_threaded_python_gets_no_gil_wheel() -> None:
    h100 = profile("h100", python={"version": "3.13.1", "executable": "/opt/ft/bin/python3.13t", "abi": "cp313t"},
                   torch={"version": "2.7.1+cu128", "cuda": "12.8", "cxx11abi": True, "arch_list": ["sm_90"]})
    gil_wheel = f"flash_attn-{NEWEST}+cu12torch2.7cxx11abiTRUE-cp313-cp313-linux_x86_64.whl"
    d = plan(h100, catalog_text=gil_wheel + "\n")
    assert d.variant == "fa2-source" and d.artifact is None
    assert d.build is not None and "python=cp313t" in d.build.build_key
    assert "free-threaded Python (cp313t)" in text(d) and "cp313t" in text(d)
    assert plan({**h100, "python": {**h100["python"], "abi": "cp313"}},
                catalog_text=gil_wheel + "\n").variant == "fa2-wheel"


# --- torch below a release's floor ----------------------------------------------------------

TORCH_113 = {"version": "1.13.1+cu117", "cuda": "11.7", "cxx11abi": False, "arch_list": ["sm_70", "sm_80", "sm_86"]}


def test_torch_1_13_gets_the_newest_release_that_supports_it_and_says_so() -> None:
    d = plan(profile("a100", torch=TORCH_113, toolkit={"nvcc": "11.7", "path": "/usr/local/cuda/bin/nvcc"}))
    assert d.flash_attn_version == "2.6.3" and d.variant in ("fa2-wheel", "fa2-source")
    assert f"flash-attn {NEWEST} needs torch ≥ 2.2" in text(d) and "upgrade torch to ≥ 2.2" in text(d)


def test_torch_1_13_with_a_pinned_version_is_blocked_with_the_way_out() -> None:
    d = plan(profile("a100", torch=TORCH_113), Policy(version=NEWEST))
    assert d.variant == "blocked" and "or pass --version 2.6.3" in text(d)
