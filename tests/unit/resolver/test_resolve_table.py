"""Table-driven resolver cases: one row per rule and per reason text (DESIGN §3.2, issue 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from fleetctl.controller.catalog import Catalog, builtin_catalog, parse_catalog_text
from fleetctl.controller.resolver import Decision, Policy, resolve
from tests.unit.resolver.nodes import node

NEWEST = "2.8.3.post1"
H100_CU130: dict[str, Any] = dict(gpu="H100", driver={"version": "580.159.04", "cuda_max": "13.0"},
                                  toolkit={"nvcc": "13.0", "path": "/usr/local/cuda/bin/nvcc"},
                                  python__version="3.12.3", resources={"cpu_cores": 16, "memory_mib": 131072},
                                  torch={"version": "2.11.0+cu130", "cuda": "13.0", "cxx11abi": True,
                                         "arch_list": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]})
BLACKWELL: dict[str, Any] = dict(driver={"version": "570.86.10", "cuda_max": "12.8"},
                                 torch={"version": "2.7.1+cu128", "cuda": "12.8", "cxx11abi": True,
                                        "arch_list": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]})
T4: dict[str, Any] = dict(gpu="T4", driver={"version": "535.183.01", "cuda_max": "12.2"},
                          toolkit={"nvcc": "11.8", "path": "/usr/local/cuda-11.8/bin/nvcc"},
                          torch={"version": "2.4.1+cu121", "cuda": "12.1", "cxx11abi": False,
                                 "arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]},
                          resources={"cpu_cores": 8, "memory_mib": 32000})
NVCC = {"path": "/usr/local/cuda/bin/nvcc"}
KEY_ERROR = "W: GPG error: https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64 InRelease: " \
            "The following signatures couldn't be verified because the public key is not available: " \
            "NO_PUBKEY A4B469963BF863CC"
LOCAL_H100 = "flash_attn-2.8.3.post1+cu13torch2.11cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"


def wheel(version: str, cu: str, torch: str, abi: bool, py: str, platform: str = "linux_x86_64") -> str:
    return f"flash_attn-{version}+{cu}torch{torch}cxx11abi{'TRUE' if abi else 'FALSE'}-{py}-{py}-{platform}.whl"


@dataclass
class Case:
    id: str
    facts: dict[str, Any]
    variant: str
    policy: Policy = field(default_factory=Policy)
    catalog: str = "builtin"  # "builtin" | "empty" | "local-h100" | "local-h100-sm80" | "text"
    version: str | None = "default"  # expected flash_attn_version ("default": the target)
    steps: tuple[str, ...] | None = None
    artifact: str | None = "any"
    toolkit: str | None = "any"
    reason: str | None = None  # substring of some reason
    rejected: str | None = None  # substring of some rejected reason
    build: dict[str, Any] | None = None  # BuildParams fields to check


def _catalog(kind: str) -> Catalog:
    if kind == "empty":
        return Catalog([])
    if kind == "local-h100":
        return builtin_catalog().with_local_wheels([{"filename": LOCAL_H100, "sha256": "a" * 64,
                                                     "cuda_archs": ["90"]}])
    if kind == "local-h100-sm80":
        return builtin_catalog().with_local_wheels([{"filename": LOCAL_H100, "sha256": "a" * 64,
                                                     "cuda_archs": ["80"]}])
    if kind == "text":
        return parse_catalog_text(wheel(NEWEST, "cu12", "2.7", True, "cp311") + "\n", "catalog-file", "test")
    return builtin_catalog()


SRC = ("build-from-source", "verify")
TK_SRC = ("cuda-toolkit", "build-from-source", "verify")
WHL = ("install-wheel", "verify")

CASES = [
    # --- rule 3: blocked ------------------------------------------------------------------------
    Case("no-driver", dict(driver=None), "blocked", version=None, steps=(), reason="no NVIDIA driver found"),
    Case("no-gpu", dict(gpus=[]), "blocked", version=None, steps=(), reason="no NVIDIA GPU reported"),
    Case("no-torch", dict(torch=None), "blocked", version=None, reason="torch is not installed in the target Python"),
    Case("cpu-torch", dict(torch={"version": "2.7.1+cpu", "cuda": None, "cxx11abi": True, "arch_list": []}),
         "blocked", version=None, reason="is a CPU-only build"),
    Case("torch-cuda-above-driver", dict(torch={"version": "2.9.0+cu130", "cuda": "13.0", "cxx11abi": True,
                                                "arch_list": ["sm_80", "sm_90"]}),
         "blocked", version=None, reason="supports at most CUDA 12.4"),
    Case("arch-missing-h100", dict(gpu="H100", torch__arch_list=["sm_80"]), "blocked", version=None,
         reason="has no code for GPU 0"),
    Case("arch-ptx-runs-newer", dict(gpu="H100", torch__arch_list=["sm_80", "compute_80"]), "fa2-wheel"),
    Case("arch-sm80-runs-on-86", dict(gpu="A10", torch__arch_list=["sm_80"]), "fa2-wheel"),
    Case("arch-sm86-not-on-80", dict(torch__arch_list=["sm_86"]), "blocked", version=None, reason="sm_8x with x ≤ 0"),
    Case("arch-sm90a-on-h100", dict(gpu="H100", torch__arch_list=["sm_90a"]), "fa2-wheel"),
    Case("arch-compute90a-not-b200", dict(gpu="B200", **{**BLACKWELL, "torch": {**BLACKWELL["torch"],
                                                                                 "arch_list": ["compute_90a"]}}),
         "blocked", version=None, reason="install a torch build that includes sm_100"),
    Case("arch-list-empty", dict(torch__arch_list=[]), "blocked", version=None, reason="(empty)"),
    Case("python-below-floor", dict(python__version="3.8.18"), "blocked", version=None,
         reason="requires Python ≥ 3.9 (python_requires)"),
    Case("blocked-rejects-all", dict(driver=None), "blocked", version=None,
         rejected="the node cannot run CUDA torch on its GPU"),
    # --- rule 2: GPU generation -----------------------------------------------------------------
    Case("v100-sdpa", dict(gpu="V100"), "sdpa", version=None, steps=(), reason="compute capability 7.0 < 7.5"),
    Case("p100-sdpa", dict(gpu="P100"), "sdpa", version=None, steps=(), rejected="FA2 needs compute capability ≥ 8.0"),
    Case("v100-rejects-fa1", dict(gpu="V100"), "sdpa", version=None,
         rejected="FA1 needs compute capability 7.5 (Turing) or newer"),
    Case("t4-fa1-toolkit", T4, "fa1-source", version="1.0.9", steps=TK_SRC, toolkit="12.1",
         reason="major differs from torch's CUDA 12.1"),
    Case("t4-fa1-nvcc-ok", {**T4, "toolkit": {"nvcc": "12.1", **NVCC}}, "fa1-source", version="1.0.9", steps=SRC,
         toolkit=None, reason="nvcc 12.1 qualifies"),
    Case("t4-fa1-build", T4, "fa1-source", version="1.0.9",
         build={"cuda_archs": ("75", "80", "90"), "max_jobs": 5, "nvcc_threads": 1}),
    Case("t4-rejects-fa2", T4, "fa1-source", version="1.0.9", rejected="Turing (7.5) needs FlashAttention 1.x"),
    Case("t4-no-source-builds", T4, "sdpa", policy=Policy(source_builds=False), version=None, steps=(),
         reason="FlashAttention 1.x has no wheels"),
    Case("t4-old-python", {**T4, "python": {"version": "3.6.15", "executable": "/usr/bin/python3"}}, "sdpa",
         version=None, reason="FlashAttention 1.x needs Python ≥ 3.7"),
    Case("t4-toolkit-impossible", {**T4, "driver": {"version": "470.1", "cuda_max": "11.4"},
                                   "torch": {**T4["torch"], "version": "2.0.1+cu118", "cuda": "11.8"},
                                   "toolkit": None}, "fa1-source", version="1.0.9", steps=TK_SRC, toolkit="11.4"),
    # --- rule 4: FA2 wheel ------------------------------------------------------------------------
    Case("a100-wheel", {}, "fa2-wheel", version=NEWEST, steps=WHL, toolkit=None,
         artifact=wheel(NEWEST, "cu12", "2.7", True, "cp311"), reason="install it by path/URL, no compiler needed"),
    Case("abi-false", dict(torch__cxx11abi=False), "fa2-wheel", artifact=wheel(NEWEST, "cu12", "2.7", False, "cp311")),
    Case("py312", dict(python__version="3.12.3"), "fa2-wheel", artifact=wheel(NEWEST, "cu12", "2.7", True, "cp312")),
    Case("py313", dict(python__version="3.13.1"), "fa2-wheel", artifact=wheel(NEWEST, "cu12", "2.7", True, "cp313")),
    Case("py39", dict(python__version="3.9.18"), "fa2-wheel", artifact=wheel(NEWEST, "cu12", "2.7", True, "cp39")),
    Case("py314-source", dict(python__version="3.14.0"), "fa2-source", steps=TK_SRC, toolkit="12.4",
         reason="no cu12 wheel for torch2.7 (CUDA 12.6) cxx11abiTRUE cp314"),
    Case("torch28", dict(torch__version="2.8.0+cu128", torch__cuda="12.8"), "fa2-wheel",
         artifact=wheel(NEWEST, "cu12", "2.8", True, "cp311")),
    Case("torch24-cu121", dict(torch__version="2.4.1+cu121", torch__cuda="12.1", torch__cxx11abi=False),
         "fa2-wheel", artifact=wheel(NEWEST, "cu12", "2.4", False, "cp311")),
    Case("torch29-source", dict(torch__version="2.9.1+cu126"), "fa2-source", reason="no cu12 wheel for torch2.9"),
    Case("glibc-231-source", dict(os__glibc="2.31"), "fa2-source", rejected="needs glibc ≥ 2.35, the node has 2.31"),
    Case("glibc-231-other-release-fits", dict(os__glibc="2.31", torch__version="2.6.0+cu124", torch__cuda="12.4"),
         "fa2-source", rejected="pass --version 2.8.0 to choose one"),
    Case("glibc-231-pinned-2.7.4.post1", dict(os__glibc="2.31", torch__version="2.6.0+cu124", torch__cuda="12.4"),
         "fa2-wheel", policy=Policy(version="2.7.4.post1"), version="2.7.4.post1",
         artifact=wheel("2.7.4.post1", "cu12", "2.6", True, "cp311")),
    Case("glibc-unknown-assume-ok", dict(os__glibc=None), "fa2-wheel"),
    Case("aarch64-source", dict(os__arch="aarch64"), "fa2-source", reason="linux_aarch64"),
    Case("a10-wheel", dict(gpu="A10"), "fa2-wheel", reason="carries sm_80, sm_90, sm_100, sm_120"),
    Case("l4-wheel", dict(gpu="L4"), "fa2-wheel"),
    Case("orin-87-wheel", dict(gpu="Orin"), "fa2-wheel"),
    Case("b200-wheel", dict(gpu="B200", **BLACKWELL), "fa2-wheel",
         artifact=wheel(NEWEST, "cu12", "2.7", True, "cp311")),
    Case("rtx5090-wheel", dict(gpu="RTX5090", **BLACKWELL), "fa2-wheel"),
    Case("gb10-121-wheel", dict(gpu="GB10", **BLACKWELL), "fa2-wheel"),
    Case("b200-old-wheel-lacks-sm100", dict(gpu="B200", **{**BLACKWELL, "torch": {**BLACKWELL["torch"],
                                            "version": "2.6.0+cu126", "cuda": "12.6"}}),
         "fa2-source", policy=Policy(version="2.7.4.post1"), version="2.7.4.post1", steps=TK_SRC, toolkit="12.8",
         rejected="carries sm_80, sm_90, no code for cc 10.0", build={"cuda_archs": ("100",)}),
    Case("b200-target-too-old", dict(gpu="B200", **BLACKWELL), "blocked", policy=Policy(version="2.7.2"),
         version=None, reason="rejects Blackwell GPUs at runtime"),
    Case("thor-no-fa2-kernels", dict(gpu="Thor", **{**BLACKWELL,
                                                    "torch": {**BLACKWELL["torch"], "arch_list": ["sm_110"]}}),
         "sdpa", version=None,
         reason="has no kernels for cc 11.0"),
    Case("cu13-torch-old-release-maps-cu12", dict(**{k: v for k, v in H100_CU130.items() if k != "torch"},
                                                  torch={**H100_CU130["torch"], "version": "2.8.0+cu130"}),
         "fa2-source", policy=Policy(version="2.8.3"), version="2.8.3", rejected="maps CUDA 13.0 to cu12"),
    Case("cu118-2.7.0", dict(torch={"version": "2.3.1+cu118", "cuda": "11.8", "cxx11abi": False,
                                    "arch_list": ["sm_80", "sm_90"]}), "fa2-wheel", policy=Policy(version="2.7.0"),
         version="2.7.0", artifact=wheel("2.7.0", "cu11", "2.3", False, "cp311")),
    Case("cu121-2.6.3-cu123", dict(torch={"version": "2.3.1+cu121", "cuda": "12.1", "cxx11abi": False,
                                          "arch_list": ["sm_80", "sm_90"]}), "fa2-wheel",
         policy=Policy(version="2.6.3"), version="2.6.3", artifact=wheel("2.6.3", "cu123", "2.3", False, "cp311")),
    Case("cu121-2.5.8-cu122", dict(python__version="3.10.12",
                                   torch={"version": "2.2.2+cu121", "cuda": "12.1", "cxx11abi": False,
                                          "arch_list": ["sm_80", "sm_90"]}), "fa2-wheel",
         policy=Policy(version="2.5.8"), version="2.5.8", artifact=wheel("2.5.8", "cu122", "2.2", False, "cp310")),
    Case("pre-2.5-no-wheels", dict(torch={"version": "2.1.2+cu121", "cuda": "12.1", "cxx11abi": False,
                                          "arch_list": ["sm_80", "sm_90"]}), "fa2-source",
         policy=Policy(version="2.3.3"), version="2.3.3", rejected="no cu122 wheel"),
    Case("version-not-in-catalog", {}, "fa2-source", policy=Policy(version="2.8.3.post2"), version="2.8.3.post2",
         rejected="no cu12 wheel for torch2.7"),
    Case("local-wheel-h100", H100_CU130, "fa2-wheel", catalog="local-h100", artifact=LOCAL_H100,
         reason="from artifact-store"),
    Case("local-wheel-wrong-arch", H100_CU130, "fa2-source", catalog="local-h100-sm80", rejected="no code for cc 9.0"),
    Case("text-catalog", dict(os__glibc="2.17"), "fa2-wheel", catalog="text", reason="glibc ≥ unknown"),
    Case("empty-catalog-no-target", {}, "blocked", catalog="empty", version=None,
         reason="the catalog has no FA2 release"),
    Case("empty-catalog-with-version", {}, "fa2-source", catalog="empty", policy=Policy(version="2.8.3"),
         version="2.8.3"),
    Case("wheel-rejects-source", {}, "fa2-wheel", rejected="a matching prebuilt wheel exists"),
    Case("wheel-rejects-fa1", {}, "fa2-wheel", rejected="FA1 is only for Turing"),
    Case("wheel-rejects-sdpa", {}, "fa2-wheel", rejected="is available for this node"),
    # --- rule 5: toolkit for source builds ---------------------------------------------------------
    Case("h100-cu130-real", H100_CU130, "fa2-source", version=NEWEST, steps=SRC, toolkit=None, artifact=None,
         reason="nvcc 13.0 qualifies",
         build={"cuda_archs": ("90",), "max_jobs": 16, "nvcc_threads": 2, "estimated_minutes": 23,
                "build_key": "variant=fa2-source;flash_attn=2.8.3.post1;torch=2.11;torch_cuda=13.0;cxx11abi=TRUE;"
                             "python=cp312;platform=linux_x86_64;os=debian;glibc=2.35;archs=90;nvcc=13.0"}),
    Case("h100-no-nvcc", {**H100_CU130, "toolkit": None}, "fa2-source", steps=TK_SRC, toolkit="13.0",
         reason="the node has no nvcc: install CUDA toolkit 13.0"),
    Case("nvcc-major-mismatch", {**H100_CU130, "toolkit": {"nvcc": "12.8", **NVCC}}, "fa2-source", toolkit="13.0",
         reason="nvcc 12.8 major differs from torch's CUDA 13.0"),
    Case("nvcc-above-driver", {**H100_CU130, "toolkit": {"nvcc": "13.1", **NVCC}}, "fa2-source", toolkit="13.0",
         reason="nvcc 13.1 is newer than the driver's maximum CUDA 13.0"),
    Case("toolkit-driver-max-lower", dict(torch__version="2.9.1+cu126", toolkit=None), "fa2-source", toolkit="12.4",
         reason="the driver's maximum, lower than torch's CUDA"),
    Case("nvcc-below-release-floor", dict(torch={"version": "2.9.0+cu118", "cuda": "11.8", "cxx11abi": True,
                                                 "arch_list": ["sm_80"]}, toolkit={"nvcc": "11.6", **NVCC}),
         "fa2-source", toolkit="11.8", reason="nvcc 11.6 is too old: flash-attn 2.8.3.post1 needs nvcc ≥ 11.7"),
    Case("blackwell-needs-12.8", dict(gpu="RTX5090", **{**BLACKWELL, "torch": {**BLACKWELL["torch"],
                                      "version": "2.9.1+cu128"}}, toolkit={"nvcc": "12.6", **NVCC}),
         "fa2-source", toolkit="12.8", reason="sm_100/sm_120 need nvcc ≥ 12.8", build={"cuda_archs": ("120",)}),
    Case("blackwell-driver-too-old", dict(gpu="RTX5090", driver={"version": "560.35.03", "cuda_max": "12.6"},
                                          torch={**BLACKWELL["torch"], "version": "2.9.1+cu126", "cuda": "12.6"}),
         "blocked", version=None, reason="no CUDA toolkit can qualify"),
    Case("no-source-builds", dict(torch__version="2.9.1+cu126"), "blocked", policy=Policy(source_builds=False),
         version=None, reason="the policy forbids source builds"),
    # --- build parameters ---------------------------------------------------------------------------
    Case("jobs-small-memory", {**H100_CU130, "resources": {"cpu_cores": 8, "memory_mib": 16384}}, "fa2-source",
         build={"max_jobs": 2}),
    Case("jobs-big-host", {**H100_CU130, "resources": {"cpu_cores": 64, "memory_mib": 524288}}, "fa2-source",
         build={"max_jobs": 64}),
    Case("jobs-floor-one", {**H100_CU130, "resources": {"cpu_cores": 2, "memory_mib": 4096}}, "fa2-source",
         build={"max_jobs": 1}),
    Case("mixed-gpus-archs", {**H100_CU130, "gpu": ["A100", "H100"]}, "fa2-source", reason="mixed GPUs",
         build={"cuda_archs": ("80", "90"), "max_jobs": 8}),
    Case("no-archs-knob-2.6.3", dict(torch={"version": "2.5.1+cu124", "cuda": "12.4", "cxx11abi": False,
                                            "arch_list": ["sm_80"]}, toolkit={"nvcc": "12.4", **NVCC}),
         "fa2-source", policy=Policy(version="2.6.3"), version="2.6.3", steps=SRC,
         build={"cuda_archs": ("80", "90"), "env": {"MAX_JOBS": "16", "NVCC_THREADS": "2",
                                                     "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}}),
    Case("no-nvcc-threads-2.5.0", dict(torch={"version": "2.5.1+cu124", "cuda": "12.4", "cxx11abi": False,
                                              "arch_list": ["sm_80"]}, toolkit={"nvcc": "12.4", **NVCC}),
         "fa2-source", policy=Policy(version="2.5.0"), version="2.5.0",
         build={"nvcc_threads": 1, "env": {"MAX_JOBS": "32", "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}}),
    # --- rule 6: apt keys ---------------------------------------------------------------------------
    Case("apt-no-pubkey", dict(apt={"errors": [KEY_ERROR]}), "fa2-wheel", steps=("apt-keyring-fix", *WHL),
         reason="NO_PUBKEY A4B469963BF863CC"),
    Case("apt-expkeysig", {**H100_CU130, "toolkit": None,
                           "apt": {"errors": ["W: GPG error: http://x InRelease: The following signatures were "
                                              "invalid: EXPKEYSIG A4B469963BF863CC cudatools"]}},
         "fa2-source", steps=("apt-keyring-fix", *TK_SRC), reason="EXPKEYSIG"),
    Case("apt-not-signed", dict(apt={"errors": ["E: The repository 'http://x InRelease' is not signed."]}),
         "fa2-wheel", steps=("apt-keyring-fix", *WHL)),
    Case("apt-other-error", {**H100_CU130, "toolkit": None,
                             "apt": {"errors": ["E: Failed to fetch http://x  404  Not Found"]}},
         "fa2-source", steps=TK_SRC, reason="errors that are not key problems"),
    Case("apt-empty-errors", dict(apt={"errors": []}), "fa2-wheel", steps=WHL),
    Case("apt-sdpa-no-steps", dict(gpu="V100", apt={"errors": [KEY_ERROR]}), "sdpa", version=None, steps=()),
    # --- rule 7: already at target ------------------------------------------------------------------
    Case("already-installed", dict(flash_attn={"version": NEWEST, "variant": "fa2-wheel"}), "fa2-wheel",
         steps=("verify",), artifact=None, reason="is already installed: only verify it"),
    Case("already-installed-apt-broken", dict(flash_attn={"version": NEWEST, "variant": "fa2-source"},
                                              apt={"errors": [KEY_ERROR]}), "fa2-wheel", steps=("verify",)),
    Case("older-installed", dict(flash_attn={"version": "2.7.4.post1", "variant": "fa2-wheel"}), "fa2-wheel",
         steps=WHL, reason="replaces the installed flash-attn 2.7.4.post1"),
    Case("installed-other-generation", dict(flash_attn={"version": NEWEST, "variant": "fa4"}), "fa2-wheel",
         steps=WHL),
    Case("fa1-already", {**T4, "flash_attn": {"version": "1.0.9", "variant": "fa1-source"}}, "fa1-source",
         version="1.0.9", steps=("verify",)),
    # --- FA3 by policy ------------------------------------------------------------------------------
    Case("fa3-h100", H100_CU130, "fa3-source", policy=Policy(fa3=True), version="3.0.0", steps=SRC,
         build={"cuda_archs": ("90a",), "env": {"MAX_JOBS": "16", "NVCC_THREADS": "2",
                                                 "FLASH_ATTENTION_DISABLE_SM80": "TRUE"}}),
    Case("fa3-off-by-default", H100_CU130, "fa2-source", rejected="FA3 is opt-in"),
    Case("fa3-not-hopper", {}, "fa2-wheel", policy=Policy(fa3=True), rejected="Hopper GPUs (cc 9.0) only"),
    Case("fa3-python-too-old", {**H100_CU130, "python": {"version": "3.9.18", "executable": "/p"}}, "fa2-source",
         policy=Policy(fa3=True), reason="FA3 was requested but cannot be used here (FA3 needs Python ≥ 3.10)"),
    Case("fa3-cuda11-torch", dict(gpu="H100", torch={"version": "2.3.1+cu118", "cuda": "11.8", "cxx11abi": False,
                                                     "arch_list": ["sm_80", "sm_90"]}), "fa2-source",
         policy=Policy(fa3=True), reason="FA3 was requested but cannot be used here"),
    Case("fa3-beats-fa4", H100_CU130, "fa3-source", policy=Policy(fa3=True, fa4=True), version="3.0.0",
         rejected="takes precedence"),
    # --- FA4 by policy ------------------------------------------------------------------------------
    Case("fa4-h100", H100_CU130, "fa4", policy=Policy(fa4=True), version="4.0.0b36", steps=WHL, artifact=None,
         toolkit=None, reason='flash-attn-4[cu13]==4.0.0b36'),
    Case("fa4-cu12", dict(gpu="B200", **{**BLACKWELL, "driver": {"version": "580.1", "cuda_max": "12.9"}}), "fa4",
         policy=Policy(fa4=True), version="4.0.0b36", reason='"flash-attn-4==4.0.0b36"'),
    Case("fa4-old-driver", dict(gpu="H100"), "fa2-wheel", policy=Policy(fa4=True),
         reason="nvidia-cutlass-dsl needs driver ≥ 575.51.03"),
    Case("fa4-ampere", dict(driver={"version": "580.1", "cuda_max": "12.9"}), "fa2-wheel", policy=Policy(fa4=True),
         reason="8.x is forward only"),
    Case("fa4-python", {**H100_CU130, "python": {"version": "3.9.18", "executable": "/p"}}, "fa2-source",
         policy=Policy(fa4=True), reason="FA4 needs Python ≥ 3.10"),
    Case("fa4-off-by-default", H100_CU130, "fa2-source", rejected="FA4 is opt-in"),
    Case("fa4-v100", dict(gpu="V100"), "sdpa", policy=Policy(fa4=True), version=None,
         rejected="FA4 needs compute capability ≥ 9.0"),
    Case("fa4-cuda11", dict(gpu="H100", driver={"version": "580.1", "cuda_max": "12.9"},
                            torch={"version": "2.3.1+cu118", "cuda": "11.8", "cxx11abi": False,
                                   "arch_list": ["sm_80", "sm_90"]}), "fa2-source", policy=Policy(fa4=True),
         reason="FA4 needs a CUDA 12 or 13 torch"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_resolve(case: Case) -> None:
    decision = resolve(node(**case.facts), _catalog(case.catalog), case.policy)
    assert decision.variant == case.variant, decision.reasons
    expected_version = (case.policy.version or NEWEST) if case.version == "default" else case.version
    assert decision.flash_attn_version == expected_version
    if case.steps is not None:
        assert decision.steps == case.steps
    if case.artifact != "any":
        assert decision.artifact == case.artifact
    if case.toolkit != "any":
        assert decision.toolkit == case.toolkit
    if case.reason is not None:
        assert any(case.reason in r for r in decision.reasons), decision.reasons
    if case.rejected is not None:
        assert any(case.rejected in r.reason or case.rejected in r.candidate for r in decision.rejected), \
            decision.rejected
    if case.build is not None:
        assert decision.build is not None
        for key, value in case.build.items():
            actual = dict(decision.build.env) if key == "env" else getattr(decision.build, key)
            assert actual == value, (key, actual)
    _invariants(decision)


def _invariants(decision: Decision) -> None:
    assert decision.reasons, "every decision explains itself"
    assert decision.rejected, "every decision lists what lost"
    assert (decision.build is not None) == (decision.variant.endswith("-source") and decision.steps != ("verify",))
    assert (decision.artifact is not None) <= (decision.variant == "fa2-wheel")
    if decision.toolkit is not None:
        assert "cuda-toolkit" in decision.steps
    if "apt-keyring-fix" in decision.steps:
        assert decision.steps[0] == "apt-keyring-fix"


def test_case_count() -> None:
    assert len(CASES) >= 80
