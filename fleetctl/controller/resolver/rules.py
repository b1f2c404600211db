"""Upstream facts per FlashAttention release, as pure functions of the version.

Every threshold here comes from shared/reference/flash_attn_facts.md (read from
Dao-AILab/flash-attention at each tag); docs/resolver.md cites the section for each.
Functions take versions as strings and are cached: a fleet plan asks the same few
questions thousands of times.
"""

from __future__ import annotations

import re
from functools import lru_cache

from packaging.version import InvalidVersion, Version

FA1_VERSION = "1.0.9"  # last FA1 release; 1.x has no get_wheel_url, so it is always a source build
FA3_VERSION = "3.0.0"  # hopper/ package version at upstream HEAD; FA3 has no release wheels
FA4_VERSION = "4.0.0b36"  # newest flash-attn-4 on PyPI (2026-12-02); measured on the lent H200 (docs/gpu-e2e.md)
FA4_MIN_DRIVER = "575.51.03"  # nvidia-cutlass-dsl driver floor quoted in NVIDIA/cutlass #2356 (unverified upstream)
FA3_MIN_NVCC = (12, 3)  # hopper/setup.py: "FlashAttention-3 is only supported on CUDA 12.3 and above"
BLACKWELL_MIN_NVCC = (12, 8)  # setup.py adds compute_100/compute_120 gencodes only when nvcc >= 12.8
MIN_WHEEL_RELEASE = "2.0.6"  # first release whose setup.py guesses a prebuilt wheel URL

GLIBC_BY_RUNNER = {"ubuntu-20.04": "2.31", "ubuntu-22.04": "2.35", "ubuntu-22.04-arm": "2.35"}

# os-release ID → family. A wheel built from source links what the builder's OS ships (libstdc++, its glibc
# symbol versions), so a built wheel is only handed to nodes of the same family (and glibc ≥ the builder's).
OS_FAMILIES = {"ubuntu": "debian", "debian": "debian", "linuxmint": "debian", "pop": "debian",
               "centos": "rhel", "rhel": "rhel", "rocky": "rhel", "almalinux": "rhel", "ol": "rhel",
               "fedora": "rhel", "amzn": "rhel", "sles": "suse", "opensuse-leap": "suse",
               "opensuse-tumbleweed": "suse"}


def os_family(os_id: str) -> str:
    """The family of an os-release ``ID`` (``ubuntu`` → ``debian``, ``centos`` → ``rhel``); unknown IDs are
    their own family, so nothing unknown is ever assumed compatible."""
    key = os_id.strip().lower()
    return OS_FAMILIES.get(key, key or "unknown")
RELEASE_URL = "https://github.com/Dao-AILab/flash-attention/releases/download/v{version}/{filename}"

_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


@lru_cache(maxsize=4096)
def parse_version(text: str) -> Version | None:
    """A PEP 440 version, or None for text that is not one ("latest", "2.x")."""
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _v(text: str) -> Version:
    parsed = parse_version(text)
    if parsed is None:
        raise ValueError(f"not a version: {text!r}")
    return parsed


def _at_least(version: str, floor: str) -> bool:
    return _v(version) >= _v(floor)


@lru_cache(maxsize=1024)
def major_minor(text: str) -> tuple[int, int]:
    """'12.4.1' → (12, 4); '13' → (13, 0). Callers pass validated dotted versions."""
    parts = [int(p) for p in re.findall(r"\d+", text)[:2]]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def fmt_mm(mm: tuple[int, int]) -> str:
    return f"{mm[0]}.{mm[1]}"


# --- FA2 wheel naming (facts §1.2) -------------------------------------------------------------

@lru_cache(maxsize=4096)
def wheel_cuda_tag(release: str, torch_cuda: str, torch_mm: str) -> str:
    """The ``cu`` tag FA2 ``release``'s setup.py asks for, given torch's CUDA and torch major.minor.

    Mirrors get_wheel_url() at each tag: no remap ≤2.2.3.post1; torch 2.1 + CUDA 12 → 12.2
    until 2.3.5; 11.x → 11.8 else 12.2 (2.3.6–2.6.0.post1) or 12.3 (2.6.1–2.6.3), major+minor;
    major only from 2.7.0, where every CUDA ≥ 12 bins to 12 until 2.8.3.post1 adds 13.
    """
    major, minor = major_minor(torch_cuda)
    if not _at_least(release, "2.2.3.post2"):
        return f"cu{major}{minor}"
    if not _at_least(release, "2.3.6"):
        if torch_mm == "2.1" and major == 12:
            return "cu122"
        return f"cu{major}{minor}"
    if not _at_least(release, "2.7.0"):
        if major == 11:
            return "cu118"
        return "cu123" if _at_least(release, "2.6.1") else "cu122"
    if major == 11:
        return "cu11"
    if major == 12 or not _at_least(release, "2.8.3.post1"):
        return "cu12"
    return "cu13"


def cuda_tag_major(tag: str) -> int:
    """'cu12' → 12, 'cu118' → 11, 'cu123' → 12."""
    digits = tag[2:]
    return int(digits if len(digits) <= 2 else digits[:-1])


# --- installability and toolchain floors (facts §1.5) ------------------------------------------

@lru_cache(maxsize=512)
def python_floor(release: str) -> tuple[int, int]:
    """``python_requires`` of an FA2 release: ≥3.7 until 2.5.9.post1, ≥3.8 until 2.7.1.post1, then ≥3.9."""
    if _at_least(release, "2.7.1.post2"):
        return (3, 9)
    if _at_least(release, "2.6.0"):
        return (3, 8)
    return (3, 7)


FA1_PYTHON_FLOOR = (3, 7)
FA3_PYTHON_FLOOR = (3, 10)
FA4_PYTHON_FLOOR = (3, 10)


@lru_cache(maxsize=512)
def min_nvcc(release: str) -> tuple[int, int]:
    """The nvcc floor setup.py enforces ("FlashAttention is only supported on CUDA X and above")."""
    if _at_least(release, "2.7.0"):
        return (11, 7)
    if _at_least(release, "2.1.2"):
        return (11, 6)
    if _at_least(release, "2.0.6"):
        return (11, 4)
    return (11, 0)


FA1_MIN_NVCC = (11, 4)  # FA1 README: "CUDA 11.4 and above" (setup.py itself checks 11.0)


# --- architectures (facts §1.4, §3) ------------------------------------------------------------

@lru_cache(maxsize=512)
def source_archs(release: str) -> tuple[int, ...]:
    """SASS targets a source build of an FA2 release can emit (nvcc permitting), as cc×10 numbers."""
    if release == "2.2.4":
        return (80,)  # v2.2.4 shipped with its sm_90 gencode commented out
    if _at_least(release, "2.7.3"):
        return (80, 90, 100, 120)
    return (80, 90)


@lru_cache(maxsize=512)
def wheel_archs(release: str) -> tuple[int, ...]:
    """SASS the release's upstream wheels carry: Blackwell only in wheels built with nvcc 12.9 (≥2.8.0)."""
    if _at_least(release, "2.8.0"):
        return (80, 90, 100, 120)
    return tuple(a for a in source_archs(release) if a < 100)


def runtime_supports_blackwell(release: str) -> bool:
    """≤2.7.2 checks ``is_sm90 || is_sm8x`` at runtime; 2.7.3 generalised it to ``cc_major >= 8``."""
    return _at_least(release, "2.7.3")


def has_cuda_archs_knob(release: str) -> bool:
    """``FLASH_ATTN_CUDA_ARCHS`` is read from 2.7.3 on; earlier builds always compile every arch."""
    return _at_least(release, "2.7.3")


@lru_cache(maxsize=256)
def parse_cc(text: str) -> tuple[int, int]:
    """Compute capability '8.6' → (8, 6)."""
    return major_minor(text)


@lru_cache(maxsize=1024)
def arch_code_runs_on(arch: str, cc: tuple[int, int]) -> bool:
    """Whether one ``arch_list`` entry has code that runs on a GPU of compute capability ``cc``.

    ``sm_XY`` machine code runs on the same major and an equal or higher minor (sm_80 on 8.6);
    ``compute_XY`` PTX is JIT-compiled for any equal or newer GPU; the ``a`` (arch-specific)
    variants run only on exactly that capability.
    """
    match = _ARCH_RE.match(arch)
    if match is None:
        return False
    kind, digits, suffix = match.groups()
    code = (int(digits[:-1]), int(digits[-1]))
    if suffix == "a":
        return code == cc
    if kind == "compute":
        return code <= cc
    return code[0] == cc[0] and code[1] <= cc[1]


def sass_runs_on(arch: int, cc: tuple[int, int]) -> bool:
    """SASS for ``arch`` (cc×10, e.g. 86) runs on ``cc``: same major, equal or higher minor."""
    return arch // 10 == cc[0] and arch % 10 <= cc[1]


def best_sass(archs: tuple[int, ...], cc: tuple[int, int]) -> int | None:
    """The newest of ``archs`` whose SASS runs on ``cc`` (the one to build for that GPU)."""
    usable = [a for a in archs if sass_runs_on(a, cc)]
    return max(usable) if usable else None


def needs_blackwell_nvcc(archs: tuple[int, ...]) -> bool:
    return any(a >= 100 for a in archs)


# --- torch floors (facts §1.5 "Documented requirements"; wheel matrix) ------------------------

@lru_cache(maxsize=512)
def torch_floor(release: str) -> tuple[int, int]:
    """The oldest torch an FA2 release supports: the README's "PyTorch 1.12 and above" up to 2.6.3 and "PyTorch
    2.2 and above" at 2.8.3; 2.7.x's README is not in the reference, so its floor is the oldest torch its release
    CI built wheels for (2.1; 2.2 from 2.7.4.post1). setup.py itself does not check torch: a too-old torch fails
    deep in the compile or at import, which is why the resolver checks it first."""
    if _at_least(release, "2.8.0"):
        return (2, 2)
    if _at_least(release, "2.7.4.post1"):
        return (2, 2)
    if _at_least(release, "2.7.0"):
        return (2, 1)
    return (1, 12)


# --- ROCm (facts §3 "ROCm", §7 rule 7) ---------------------------------------------------------

ROCM_MIN = (6, 0)  # README: both AMD backends need "ROCm 6.0 and above"
CK_FIRST_RELEASE = "2.6.2"  # BUILD_TARGET / GPU_ARCHS appear in setup.py at 2.6.2
TRITON_AMD_FIRST_RELEASE = "2.7.1"  # FLASH_ATTENTION_TRITON_AMD_ENABLE is read from 2.7.1
# the Triton backend covers CDNA (MI200 gfx90a, MI300 gfx94x, MI350 gfx950) and RDNA 3/4 (gfx11xx, gfx12xx)
_TRITON_AMD_RE = re.compile(r"^gfx(?:90a|94[0-2]|950|11[0-5][0-9a-f]|12[0-9a-f]{2})$")


@lru_cache(maxsize=512)
def ck_archs(release: str) -> frozenset[str]:
    """``GPU_ARCHS`` values the Composable Kernel backend of ``release`` builds (README at each tag)."""
    if not _at_least(release, CK_FIRST_RELEASE):
        return frozenset()
    if _at_least(release, "2.8.3"):
        return frozenset({"gfx90a", "gfx942", "gfx950"})
    return frozenset({"gfx90a", "gfx940", "gfx941", "gfx942"})


def triton_amd_covers(release: str, gfx: str) -> bool:
    return _at_least(release, TRITON_AMD_FIRST_RELEASE) and _TRITON_AMD_RE.match(gfx) is not None


# --- Windows (seed tutorial §2.2.2; README "Might work for Windows starting v2.3.2") ------------

WINDOWS_FIRST_RELEASE = "2.3.2"
# VS 2022 17.10 ships MSVC 14.40, which nvcc before 12.4 rejects ("unsupported Microsoft Visual Studio version!");
# flash-attention #553 and Wan-Video/Wan2.1 #207 fixed it by moving to CUDA 12.4
MSVC_NEEDS_NVCC_12_4 = (14, 40)
WINDOWS_MIN_NVCC_NEW_MSVC = (12, 4)
