"""Source-build parameters: parallelism sized to the node, a time estimate, and the build key.

MAX_JOBS rule (docs/resolver.md explains it): each ninja job runs one nvcc, which compiles
``min(NVCC_THREADS, archs)`` architectures at once; upstream sizes one such compile at
~5 GB (PR #2079: 5 GB × NVCC_THREADS per job; 2.5.4–2.8.3 said ~9 GB per 4-thread job for
two archs). We give the build 90 % of the node's memory and at most one compile per core.
Calibrated on the project's H100 (16 cores, 128 GB): 2.8.3.post2, FLASH_ATTN_CUDA_ARCHS=90,
MAX_JOBS=16, NVCC_THREADS=2 finished in 1333 s without running out of memory.
"""

from __future__ import annotations

import math

from fleetctl.controller.resolver import rules
from fleetctl.controller.resolver.model import BuildParams
from fleetctl.fleet.facts import NodeFacts

GIB_PER_COMPILE = 5.0
MEMORY_SHARE = 0.9
NVCC_THREADS = 2  # the measured configuration; FA3's own default; harmless with a single arch
# Core-seconds to compile one architecture: the H100 run above, 1333 s × 16 busy cores.
FA2_CORE_SECONDS_PER_ARCH = 1333 * 16
# Rough ratios, not measured here: FA1 has far fewer kernels, FA3's hopper/ templates far more.
CORE_SECONDS_FACTOR = {"fa2-source": 1.0, "fa1-source": 0.25, "fa3-source": 4.0}


def compiled_archs(variant: str, version: str, node_archs: tuple[int, ...], nvcc: tuple[int, int]) -> tuple[int, ...]:
    """What the build really compiles: narrowed where the release reads FLASH_ATTN_CUDA_ARCHS,
    otherwise every gencode its setup.py enables for this nvcc."""
    if variant == "fa3-source":
        return (90,)
    if variant == "fa1-source":
        return tuple(a for a in (75, 80, 90) if a != 90 or nvcc >= (11, 8))
    if rules.has_cuda_archs_knob(version):
        return node_archs
    return tuple(a for a in rules.source_archs(version) if a != 90 or nvcc >= (11, 8))


def _nvcc_threads(variant: str, version: str) -> int | None:
    """NVCC_THREADS is read by FA3 and by FA2 from 2.5.7; FA1 and older FA2 run nvcc single-threaded."""
    if variant == "fa3-source" or (variant == "fa2-source" and rules._at_least(version, "2.5.7")):
        return NVCC_THREADS
    return None


def build_params(facts: NodeFacts, variant: str, version: str, node_archs: tuple[int, ...],
                 nvcc: tuple[int, int]) -> BuildParams:
    assert facts.torch is not None and facts.torch.cuda is not None
    archs = compiled_archs(variant, version, node_archs, nvcc)
    threads = _nvcc_threads(variant, version)
    per_job = min(threads or 1, len(archs))
    cores = facts.resources.cpu_cores
    memory_gib = facts.resources.memory_mib / 1024 * MEMORY_SHARE
    max_jobs = max(1, min(cores // per_job, int(memory_gib // (GIB_PER_COMPILE * per_job))))
    busy = min(max_jobs * per_job, cores)
    seconds = FA2_CORE_SECONDS_PER_ARCH * CORE_SECONDS_FACTOR[variant] * len(archs) / busy
    arch_names = tuple(("90a" if variant == "fa3-source" else str(a)) for a in archs)
    env = {"MAX_JOBS": str(max_jobs)}
    if threads is not None:
        env["NVCC_THREADS"] = str(threads)
    if variant == "fa2-source":
        env["FLASH_ATTENTION_FORCE_BUILD"] = "TRUE"  # never let setup.py guess (and fetch) a wheel URL
        if rules.has_cuda_archs_knob(version):
            env["FLASH_ATTN_CUDA_ARCHS"] = ";".join(arch_names)
    if variant == "fa3-source" and all(a == 90 for a in node_archs):
        env["FLASH_ATTENTION_DISABLE_SM80"] = "TRUE"  # Hopper-only node: skip the sm80 kernels
    torch = facts.torch
    family = rules.os_family(facts.os.id)
    key = ";".join((
        f"variant={variant}",
        f"flash_attn={version}",
        f"torch={rules.fmt_mm(rules.major_minor(torch.version))}",
        f"torch_cuda={rules.fmt_mm(rules.major_minor(torch.cuda))}",
        f"cxx11abi={'TRUE' if torch.cxx11abi else 'FALSE'}",
        # the probed ABI tag: a free-threaded cp313t build is not interchangeable with a cp313 one
        f"python={facts.python.abi or 'cp' + ''.join(map(str, rules.major_minor(facts.python.version)))}",
        f"platform=linux_{facts.os.arch}",
        # the wheel links the builder's glibc and system libraries: a wheel built on Ubuntu 20.04 (glibc 2.31)
        # must not be handed to a CentOS 7 node (glibc 2.17), so nodes share a build only with both equal
        f"os={family}",
        f"glibc={facts.os.glibc or 'unknown'}",
        f"archs={','.join(arch_names)}",
        f"nvcc={rules.fmt_mm(nvcc)}",
    ))
    return BuildParams(cuda_archs=arch_names, max_jobs=max_jobs, nvcc_threads=threads or 1,
                       estimated_minutes=math.ceil(seconds / 60), nvcc=rules.fmt_mm(nvcc), build_key=key, env=env,
                       os_family=family, glibc=facts.os.glibc)


# Compile cost of the Composable Kernel backend per gfx target, relative to one CUDA arch of FA2: a rough
# ratio (CK instantiates a similar number of kernels per arch); the Triton backend compiles nothing at install.
ROCM_CORE_SECONDS_FACTOR = {"ck": 1.0, "triton": 0.0}


def rocm_build_params(facts: NodeFacts, version: str, gfx_archs: tuple[str, ...], backend: str) -> BuildParams:
    """A ROCm source build: ``GPU_ARCHS`` narrowed to the node's gfx targets (CK), or the Triton AMD backend."""
    assert facts.torch is not None and facts.torch.hip is not None
    cores = facts.resources.cpu_cores
    memory_gib = facts.resources.memory_mib / 1024 * MEMORY_SHARE
    max_jobs = max(1, min(cores, int(memory_gib // GIB_PER_COMPILE)))
    env = {"MAX_JOBS": str(max_jobs), "FLASH_ATTENTION_FORCE_BUILD": "TRUE", "BUILD_TARGET": "rocm"}
    if backend == "ck":
        env["GPU_ARCHS"] = ";".join(gfx_archs)
    else:
        env["FLASH_ATTENTION_TRITON_AMD_ENABLE"] = "TRUE"
    seconds = FA2_CORE_SECONDS_PER_ARCH * ROCM_CORE_SECONDS_FACTOR[backend] * len(gfx_archs) / max_jobs
    hip = rules.fmt_mm(rules.major_minor(facts.torch.hip))
    family = rules.os_family(facts.os.id)
    key = ";".join((
        "variant=fa2-source", f"backend=rocm-{backend}", f"flash_attn={version}",
        f"torch={rules.fmt_mm(rules.major_minor(facts.torch.version))}", f"torch_hip={hip}",
        f"cxx11abi={'TRUE' if facts.torch.cxx11abi else 'FALSE'}",
        f"python={facts.python.abi or 'cp' + ''.join(map(str, rules.major_minor(facts.python.version)))}",
        f"platform=linux_{facts.os.arch}", f"os={family}", f"glibc={facts.os.glibc or 'unknown'}",
        f"archs={','.join(gfx_archs)}",
    ))
    return BuildParams(cuda_archs=gfx_archs, max_jobs=max_jobs, nvcc_threads=1,
                       estimated_minutes=max(1, math.ceil(seconds / 60)), nvcc=f"hip {hip}", build_key=key, env=env,
                       os_family=family, glibc=facts.os.glibc)
