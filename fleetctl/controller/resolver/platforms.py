"""Plans for nodes that are not "Linux + NVIDIA + GIL CPython": ROCm, Jetson and Windows (issue 19). Pure.

Each function takes the resolution in progress (a ``resolution.Resolution``: facts, catalog, policy, reasons,
rejections) and returns its decision; the rules and their upstream sources are in docs/resolver.md, "Other platforms".
"""

from __future__ import annotations

from dataclasses import replace

from fleetctl.controller.resolver import rules
from fleetctl.controller.resolver.build import rocm_build_params
from fleetctl.controller.resolver.model import Decision
from fleetctl.controller.resolver.resolution import Resolution, pick_wheel, wheel_query
from fleetctl.fleet.facts import DriverFacts, NodeFacts
from fleetctl.fleet.jetson import jetpack_for_l4t

SDPA_HINT = 'use PyTorch SDPA (attn_implementation="sdpa")'
WINDOWS_LABEL = "manual: not executed by the agent yet (Windows nodes get the plan and the exact commands)"
ROCM_TORCH_HINT = "install a ROCm build of torch (pip index https://download.pytorch.org/whl/rocm6.x)"


# --- ROCm ----------------------------------------------------------------------------------------

def rocm(res: Resolution) -> Decision:
    """AMD GPUs: FA2's Composable Kernel backend where the release's GPU_ARCHS cover every GPU, else its Triton
    AMD backend, else SDPA. Upstream publishes no ROCm wheels (publish.yml is CUDA-only): always a source build."""
    f = res.facts
    target = res.target or "(no target)"
    wheel, source = f"fa2-wheel {target}", f"fa2-source {target}"
    others = (f"fa1-source {rules.FA1_VERSION}", f"fa3-source {rules.FA3_VERSION}", f"fa4 {rules.FA4_VERSION}")
    for candidate in others:
        res.reject(candidate, "CUDA-only (NVIDIA GPUs)")
    problems: list[str] = []
    if any(not g.is_amd for g in f.gpus):
        problems.append("the node mixes AMD and NVIDIA GPUs: one torch build (ROCm or CUDA) cannot serve both; "
                        "give the node one vendor's GPUs")
    archs = sorted({g.arch for g in f.gpus if g.is_amd and g.arch})
    if any(g.is_amd and not g.arch for g in f.gpus):
        problems.append("the AMD GPUs' gfx targets are unknown: update the agent (amd-smi/rocm-smi probe)")
    if f.torch is None:
        problems.append(f"torch is not installed in the target Python {f.python.executable}: {ROCM_TORCH_HINT}")
    elif f.torch.hip is None:
        problems.append(f"torch {f.torch.version} is not a ROCm build (torch.version.hip is empty): "
                        f"{ROCM_TORCH_HINT}")
    rocm_version = f.rocm.version if f.rocm is not None else (f.torch.hip if f.torch and f.torch.hip else None)
    if rocm_version is not None and rules.major_minor(rocm_version) < rules.ROCM_MIN:
        problems.append(f"ROCm {rocm_version} is older than 6.0, which both AMD backends of FA2 need (README): "
                        "upgrade ROCm and torch")
    if problems or res.target is None:
        if res.target is None:
            problems.append("the catalog has no FA2 release and no --version was given: pass --version")
        res.reasons.extend(problems)
        for candidate in (wheel, source, "sdpa"):
            res.reject(candidate, "the node cannot run a ROCm torch on its GPUs (see reasons)")
        return res.finish("blocked", None, ())
    res.reject(wheel, "upstream publishes no ROCm wheels (its release workflow builds CUDA wheels only): "
                       "ROCm is always a source build")
    release = res.release_for_torch(res.target)
    if release is None:
        return res.finish("blocked", None, ())
    ck = rules.ck_archs(release)
    if archs and all(a in ck for a in archs):
        backend = "ck"
        res.reasons.append(f"AMD {', '.join(archs)}: build flash-attn {release} from source with its Composable "
                           f"Kernel backend (README: CK supports MI200/MI300, GPU_ARCHS {', '.join(sorted(ck))}); "
                           "GPU_ARCHS is set so the build does not depend on detecting the GPU")
    elif archs and all(rules.triton_amd_covers(release, a) for a in archs):
        backend = "triton"
        res.reasons.append(f"AMD {', '.join(archs)}: flash-attn {release}'s Composable Kernel backend does not "
                           f"cover it (GPU_ARCHS {', '.join(sorted(ck)) or 'none'}); install with its Triton AMD "
                           "backend: FLASH_ATTENTION_TRITON_AMD_ENABLE=TRUE at install time and at run time "
                           "(README, ROCm section)")
    else:
        ck_list = ", ".join(sorted(ck)) or "none"
        why = (f"flash-attn {release} has neither a Composable Kernel build (GPU_ARCHS {ck_list})"
               f" nor Triton AMD support (from {rules.TRITON_AMD_FIRST_RELEASE}: CDNA gfx90a/gfx94x/gfx950, RDNA 3/4) "
               f"for {', '.join(archs)}")
        res.reject(f"fa2-source {release}", why)
        res.reasons.append(f"{why}; {SDPA_HINT}, which runs on ROCm torch without installing anything")
        return res.finish("sdpa", None, ())
    if not res.policy.source_builds:
        res.reasons.append("the policy forbids source builds and there are no ROCm wheels: allow source builds, "
                           f"or {SDPA_HINT}")
        res.reject(f"fa2-source {release}", "the policy forbids source builds")
        res.reject("sdpa", "not chosen silently: the policy keeps the target release")
        return res.finish("blocked", None, ())
    res.reject("sdpa", f"flash-attn {release} can be built for this AMD GPU")
    build = rocm_build_params(f, release, tuple(archs), backend)
    res.reasons.append(f"build with {', '.join(f'{k}={v}' for k, v in build.env.items())} "
                       f"(about {build.estimated_minutes} min on {f.resources.cpu_cores} cores)")
    steps = res.apt_first(("build-from-source", "verify"))
    return res.finish("fa2-source", release, steps, build=build)


# --- Jetson --------------------------------------------------------------------------------------

def jetson_facts(res: Resolution) -> NodeFacts | None:
    """On a Jetson (L4T reported) without an NVML driver entry, the CUDA driver is L4T's own: stand in the CUDA
    its JetPack ships as the driver's maximum, so the ordinary rules (toolkit, archs) apply. None elsewhere."""
    f = res.facts
    if f.os.l4t is None:
        return None
    jetpack = jetpack_for_l4t(f.os.l4t)
    res.reasons.append(f"Jetson (L4T {f.os.l4t}"
                       + (f", JetPack {jetpack[0]} with CUDA {jetpack[1]})" if jetpack else ", JetPack unknown)")
                       + ": no upstream aarch64 wheels up to 2.8.3.post1, so a source build on the device (or a "
                       "community wheel such as pypi.jetson-ai-lab's, once added to the catalog); the CUDA toolkit "
                       "comes with JetPack (sudo apt install nvidia-jetpack), not from NVIDIA's desktop repository; "
                       "Orin (cc 8.7) runs FA2's sm_80 code (same major, lower minor) — upstream setup.py emits "
                       "gencodes only for 80/90/100/120, so FLASH_ATTN_CUDA_ARCHS=87 would build nothing (#1146)")
    if f.driver is not None or jetpack is None:
        return None
    return replace(f, driver=DriverFacts(version=f.os.l4t, cuda_max=jetpack[1]))


# --- Windows -------------------------------------------------------------------------------------

def windows(res: Resolution, ccs: tuple[tuple[int, int], ...]) -> Decision:
    """Windows: a win_amd64 wheel the operator added to the catalog, else a source build with MSVC (the seed's
    steps), else SDPA — never a Linux wheel. The agent does not run Windows plans yet: commands for a person."""
    f = res.facts
    assert f.torch is not None and f.torch.cuda is not None and f.driver is not None
    target = res.target
    for candidate in (f"fa1-source {rules.FA1_VERSION}", f"fa3-source {rules.FA3_VERSION}", f"fa4 {rules.FA4_VERSION}"):
        res.reject(candidate, "not planned on Windows (FA2 is the generation upstream reports working there)")
    if any(cc < (8, 0) for cc in ccs):
        why = "FA2 needs compute capability ≥ 8.0; FA1 (for Turing) is not planned on Windows"
        res.reject(f"fa2-source {target}", why)
        res.reasons.append(f"{why}: {SDPA_HINT}, nothing to install")
        return res.finish("sdpa", None, ())
    if target is None:
        res.reasons.append("the catalog has no FA2 release and no --version was given: pass --version")
        return res.finish("blocked", None, ())
    release = res.release_for_torch(target)
    if release is None:
        return res.finish("blocked", None, ())
    if rules._v(release) < rules._v(rules.WINDOWS_FIRST_RELEASE):
        why = f"flash-attn {release} predates Windows support (README: \"might work for Windows starting v2.3.2\")"
        res.reject(f"fa2-source {release}", why)
        res.reasons.append(f"{why}: pass --version 2.3.2 or newer, or {SDPA_HINT}")
        return res.finish("sdpa", None, ())
    res.reasons.append("Windows node: upstream publishes no Windows wheels and its Linux wheels cannot install here; "
                       "the agent does not run Windows plans yet, so this plan lists the commands to run by hand")
    query = wheel_query(f)
    wheel, why_no_wheel = pick_wheel(res.catalog, release, query)
    python = f.python.executable
    if wheel is not None:
        res.reasons.append(f"win_amd64 wheel {wheel.filename} from the catalog ({wheel.origin}) matches "
                           f"{query.describe()}")
        res.reject(f"fa2-source {release}", "a matching win_amd64 wheel is in the catalog")
        res.reject("sdpa", f"flash-attn {release} is available for this node")
        commands: tuple[str, ...] = (f'"{python}" -m pip install --no-deps "{wheel.url or wheel.filename}"',
                    f'"{python}" -c "import flash_attn; print(flash_attn.__version__)"')
        decision = res.finish("fa2-wheel", release, (), artifact=wheel)
        return replace(decision, commands=commands, execution=WINDOWS_LABEL)
    res.reject(f"fa2-wheel {release}", f"{why_no_wheel} (only win_amd64 wheels the operator adds to the catalog "
                                        "are considered; a linux_* wheel never installs on Windows)")
    problem = _windows_build_problem(res)
    if problem is not None:
        res.reject(f"fa2-source {release}", problem)
        res.reasons.append(f"{problem}; meanwhile {SDPA_HINT}, or add a community win_amd64 wheel to the catalog")
        return res.finish("sdpa", None, ())
    toolkit = res.toolkit(rules.min_nvcc(release), f"flash-attn {release}",
                           needs_blackwell=any(cc[0] >= 10 for cc in ccs))
    res.reasons.append(f"build flash-attn {release} from source with MSVC {f.os.msvc} and nvcc "
                       f"{f.toolkit.nvcc if f.toolkit else '?'} (the seed tutorial's Windows steps)")
    res.reject("sdpa", f"flash-attn {release} can be built on this node")
    jobs = min(4, f.resources.cpu_cores)  # the seed's MAX_JOBS=4: each MSVC+nvcc job needs several GB
    commands = (
        "nvcc -V",
        f'"{python}" -m pip install packaging',
        f'"{python}" -m pip uninstall -y ninja',
        f'"{python}" -m pip install ninja',
        f"git clone --branch v{release} --depth 1 https://github.com/Dao-AILab/flash-attention",
        "cd flash-attention",
        f"set MAX_JOBS={jobs}",
        "set DISTUTILS_USE_SDK=1",
        "set FLASH_ATTENTION_FORCE_BUILD=TRUE",
        f'"{python}" -m pip install . --no-build-isolation --no-deps',
        f'"{python}" -c "import flash_attn; print(flash_attn.__version__)"',
    )
    decision = res.finish("fa2-source", release, (), toolkit=None)
    return replace(decision, commands=(*(("rem " + toolkit.reason,) if toolkit.install else ()), *commands),
                   execution=WINDOWS_LABEL)


def _windows_build_problem(res: Resolution) -> str | None:
    f = res.facts
    assert f.torch is not None and f.torch.cuda is not None and f.driver is not None
    if not res.policy.source_builds:
        return "no win_amd64 wheel in the catalog and the policy forbids source builds"
    if f.os.msvc is None:
        return ("no MSVC found (vswhere reports no Visual Studio Build Tools with the C++ workload): install "
                "\"Microsoft C++ Build Tools\" (Desktop development with C++), then re-run the agent")
    if f.toolkit is None:
        return (f"no nvcc on the node: install the CUDA toolkit {rules.fmt_mm(rules.major_minor(f.torch.cuda))} "
                f"for Windows (not above the driver's maximum CUDA {f.driver.cuda_max}), then re-run the agent")
    nvcc = rules.major_minor(f.toolkit.nvcc)
    if rules.major_minor(f.os.msvc) >= rules.MSVC_NEEDS_NVCC_12_4 and nvcc < rules.WINDOWS_MIN_NVCC_NEW_MSVC:
        return (f"MSVC {f.os.msvc} (Visual Studio 2022 17.10 or newer) is rejected by nvcc {f.toolkit.nvcc} "
                "(\"unsupported Microsoft Visual Studio version!\"): install CUDA 12.4 or newer with a matching "
                "torch (cu124+), as flash-attention #553 and Wan-Video/Wan2.1 #207 did")
    if nvcc[0] != rules.major_minor(f.torch.cuda)[0]:
        return (f"nvcc {f.toolkit.nvcc} and torch's CUDA {f.torch.cuda} differ in major version (torch's "
                "cpp_extension refuses the build): install the matching CUDA toolkit for Windows")
    return None
