"""A model of each GPU, for the verification results of simulated nodes.

Simulated nodes have no GPU, so their "benchmark" is computed: the same shape grid,
entries and verdict as ``bench.py`` on a real node, with numbers derived from

* the figures measured on the project's H100 (DESIGN §4: bf16, head dim 128,
  16k tokens, 16 heads): flash_attn 373–396 TFLOP/s non-causal and 302–344
  causal; SDPA flash 346–362 / 277–318; cuDNN 663–688 non-causal; math 19–23 at
  18.9 GB (seqlen 8192) against 65 MB for flash; relative error 2.2e-3 (bf16 fwd);
* scaled to other GPUs by published relative throughput (vendor peak dense
  FP16/BF16 tensor TFLOPS with FP32 accumulate and memory bandwidth, and the
  A100/H100 ratio of the FlashAttention-2 README charts), see ``GPUS``.

Everything here is flagged ``simulated: true`` (the result and every entry), and
noise is small and deterministic (seeded by node, time and shape), so tests are
repeatable and fleet medians are meaningful.  ``SimFaults`` injects the failures the
controller's drift/regression logic must handle: an import failure (undefined
symbol after a torch upgrade), a slowdown, NaN outputs, a hang, OOM, no GPU.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetctl.agent.verify import bench
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.facts import NodeFacts
from fleetctl.fleet.verification import (
    IMPLEMENTATIONS,
    SCHEMA_VERSION,
    STATUS_NO_GPU,
    STATUS_NO_TORCH,
    STATUS_TIMEOUT,
    CorrectnessEntry,
    DeviceInfo,
    E2EEntry,
    FlashAttnStatus,
    SpeedEntry,
    VerificationResult,
    expect_for_variant,
    failure_result,
    judge,
    verified_among,
)

FAULTS_ENV = "FLEET_SIM_VERIFY_FAULTS"

# H100 SXM, bf16, head dim 128, 16k tokens, 16 heads: (low, high) TFLOP/s over seqlen 512 → 8192.
# "measured": DESIGN §4.  "estimated": not measured on the project's H100; see docs/verification.md.
H100_RANGES: Mapping[tuple[str, bool], tuple[float, float]] = {
    ("flash_attn", False): (373.0, 396.0),  # measured
    ("flash_attn", True): (302.0, 344.0),  # measured
    ("sdpa_flash", False): (346.0, 362.0),  # measured
    ("sdpa_flash", True): (277.0, 318.0),  # measured
    ("sdpa_cudnn", False): (663.0, 688.0),  # measured
    ("sdpa_cudnn", True): (470.0, 640.0),  # estimated: causal/non-causal ratio of the FA3 paper's H100 chart
    ("sdpa_efficient", False): (180.0, 205.0),  # estimated: ~half of flash (no Hopper-specific path)
    ("sdpa_efficient", True): (125.0, 170.0),  # estimated
    ("sdpa_math", False): (19.0, 23.0),  # measured
    ("sdpa_math", True): (9.5, 11.5),  # estimated: same work, half the counted FLOPs
    # FA4 4.0.0b36: measured on the project's H200 (tests/fixtures/h200_fa4, 2026-12-02), divided by the
    # H200's flash_scale; causal at seqlen 512 is launch-bound (162 TFLOP/s on the H200)
    ("fa4", False): (457.0, 663.0),
    ("fa4", True): (157.0, 650.0),
    # FA3: estimated, the FA3 paper's H100 bf16 hd128 forward chart (not measured by this project)
    ("fa3", False): (497.0, 648.0),
    ("fa3", True): (330.0, 616.0),
}
MEASURED = frozenset({("flash_attn", False), ("flash_attn", True), ("sdpa_flash", False), ("sdpa_flash", True),
                      ("sdpa_cudnn", False), ("sdpa_math", False)})
# Position of each seqlen between the low and high end (short sequences are slower: the
# FlashAttention-2 README's H100 curve, normalised).
SEQLEN_CURVE = {512: 0.0, 1024: 0.45, 2048: 0.75, 4096: 0.9, 8192: 1.0}
HEADDIM64_FACTOR = 0.87  # FA2 README, H100: hd64 / hd128 at the same seqlen (296/338, 215/248)
MATH_HEADDIM64_FACTOR = 0.6  # estimated: smaller matmul K, same softmax traffic
MATH_BYTES_PER_SCORE = 8.8  # DESIGN §4: 18.9 GB at batch 2 × 16 heads × 8192² scores
MEMORY_USABLE = 0.92


@dataclass(frozen=True)
class GpuModel:
    key: str
    name: str  # as torch reports it
    match: tuple[str, ...]  # lowercase substrings that identify it in a GPU name
    compute_capability: str
    memory_mib: int
    flash_scale: float  # FA2-style kernels (flash_attn, SDPA flash), relative to H100 SXM
    cudnn_scale: float | None  # cuDNN attention relative to H100; None: unsupported
    efficient_scale: float  # SDPA mem-efficient relative to H100's (estimated) figures
    math_scale: float  # math backend (bandwidth-bound) relative to H100
    flash_attn: str | None  # "fa2" | "fa1" | None: what FlashAttention can run at all
    source: str

    @property
    def bf16(self) -> bool:
        return float(self.compute_capability) >= 8.0

    @property
    def sdpa_flash(self) -> bool:
        return float(self.compute_capability) >= 8.0


# Peak dense tensor TFLOPS (FP16/BF16 in, FP32 accumulate) and bandwidth from vendor
# datasheets: H100 SXM 989 / 3.35 TB/s; H200 989 / 4.8; GH200 989 / 4.0; B200 2250 / 8;
# A100 312 / 2.0; L40S 362 / 0.86; L4 121 / 0.3; A10 125 / 0.6; RTX 3090 71 / 0.94;
# RTX 4090 165 / 1.0; RTX 5090 210 / 1.8; T4 65 (FP16) / 0.32; V100 125 (FP16) / 0.9.
# FA2 reaches ~39 % of peak on H100 (DESIGN §4) and ~60 % on A100 (README: 201 vs 335
# TFLOP/s at hd128, 8k) — Ampere/Ada are scaled with ~0.6 of peak, Blackwell runs FA2's
# Ampere-style MMA path (estimated 1.2x H100), Turing FA1 ~0.4 of peak.
GPUS: tuple[GpuModel, ...] = (
    GpuModel("h100", "NVIDIA H100 80GB HBM3", ("h100",), "9.0", 81559, 1.0, 1.0, 1.0, 1.0, "fa2",
             "measured (DESIGN §4)"),
    GpuModel("h200", "NVIDIA H200", ("h200",), "9.0", 143771, 1.03, 1.03, 1.03, 1.3, "fa2",
             "H100 compute, 1.43x bandwidth"),
    GpuModel("gh200", "NVIDIA GH200 480GB", ("gh200",), "9.0", 97871, 1.03, 1.03, 1.03, 1.15, "fa2",
             "H100 compute, 1.2x bandwidth"),
    GpuModel("b200", "NVIDIA B200", ("b200",), "10.0", 183359, 1.2, 1.8, 1.5, 1.9, "fa2",
             "2.27x H100 peak; FA2 Ampere-style MMA (estimated 1.2x); cuDNN from FA4 paper ratio"),
    GpuModel("a100", "NVIDIA A100-SXM4-80GB", ("a100",), "8.0", 81920, 0.59, 0.30, 0.75, 0.55, "fa2",
             "FA2 README: A100/H100 ≈ 0.59"),
    GpuModel("l40s", "NVIDIA L40S", ("l40s",), "8.9", 46068, 0.52, 0.30, 0.7, 0.26, "fa2",
             "362 TFLOPS peak at ~0.55 efficiency"),
    GpuModel("l4", "NVIDIA L4", ("l4",), "8.9", 23034, 0.17, 0.10, 0.24, 0.09, "fa2",
             "121 TFLOPS peak at ~0.55 efficiency"),
    GpuModel("a10", "NVIDIA A10", ("a10",), "8.6", 23028, 0.19, 0.11, 0.27, 0.18, "fa2",
             "125 TFLOPS peak at ~0.6 efficiency"),
    GpuModel("rtx3090", "NVIDIA GeForce RTX 3090", ("3090",), "8.6", 24576, 0.11, 0.065, 0.16, 0.28, "fa2",
             "71 TFLOPS (FP32 accumulate) at ~0.6 efficiency"),
    GpuModel("rtx4090", "NVIDIA GeForce RTX 4090", ("4090",), "8.9", 24564, 0.24, 0.14, 0.33, 0.3, "fa2",
             "165 TFLOPS (FP32 accumulate) at ~0.55 efficiency"),
    GpuModel("rtx5090", "NVIDIA GeForce RTX 5090", ("5090",), "12.0", 32607, 0.30, 0.18, 0.42, 0.5, "fa2",
             "210 TFLOPS (FP32 accumulate) at ~0.55 efficiency"),
    GpuModel("t4", "Tesla T4", ("t4",), "7.5", 15360, 0.068, None, 0.09, 0.09, "fa1",
             "65 TFLOPS FP16; FlashAttention 1.x only (FP16), no SDPA flash/cuDNN"),
    GpuModel("v100", "Tesla V100-SXM2-32GB", ("v100",), "7.0", 32768, 0.0, None, 0.17, 0.27, None,
             "125 TFLOPS FP16; no FlashAttention: SDPA efficient/math only"),
    GpuModel("mi300x", "AMD Instinct MI300X", ("mi300x",), "9.4", 196592, 0.8, None, 0.6, 1.6, "fa2",
             "estimate: 1307 TFLOPS bf16 peak, FA2's Composable Kernel backend at ~0.8x H100; no cuDNN on ROCm; "
             "5.3 TB/s"),
    GpuModel("orin", "Orin (nvgpu)", ("orin",), "8.7", 62841, 0.045, 0.025, 0.06, 0.06, "fa2",
             "estimate: Jetson AGX Orin, ~42 TFLOPS fp16 dense at ~0.35 efficiency; 205 GB/s"),
)


def gpu_model_for(name: str) -> GpuModel:
    """The model of a GPU by (part of) its name: "NVIDIA H100 80GB HBM3", "h100", "RTX 4090"..."""
    low = name.lower().replace("-", " ")
    # longest match first so "gh200" wins over "h200" and "l40s" over "l4"
    for gpu in sorted(GPUS, key=lambda g: -max(len(m) for m in g.match)):
        if any(m in low.replace(" ", "") or m in low for m in gpu.match):
            return gpu
    raise InputError(f"no performance model for GPU {name!r}",
                     hint="known: " + ", ".join(g.key for g in GPUS) + " (agent/verify/simulated.py)")


# ---------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------

UNDEFINED_SYMBOL = ("ImportError: /opt/venv/lib/python3.11/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu"
                    ".so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
# what ``import_error: true`` fails with, by the implementation it hits (FA4 is pure Python: a missing dependency)
IMPORT_ERRORS: Mapping[str, str] = {
    bench.FLASH_IMPL: UNDEFINED_SYMBOL,
    bench.FA3_IMPL: ("ImportError: /opt/venv/lib/python3.11/site-packages/flash_attn_3/_C.abi3.so: undefined symbol: "
                     "_ZN3c104cuda9SetDeviceEi"),
    bench.FA4_IMPL: "ModuleNotFoundError: No module named 'cutlass'",
}


@dataclass(frozen=True)
class SimFaults:
    """Knobs for simulated failures.  From a profile's ``verify_faults`` object or
    ``$FLEET_SIM_VERIFY_FAULTS`` ("nan,slowdown=0.3,import_error,hang,oom_above=4096,no_gpu";
    "import_error,import_error_of=fa4": only FA4's import fails)."""

    import_error: str | None = None  # the FlashAttention import fails with this text
    import_error_of: str | None = None  # the one whose import fails (flash_attn | fa3 | fa4); None: every one
    slowdown: float = 0.0  # 0.3: flash_attn (and SDPA flash) 30 % slower → a regression vs the fleet
    nan: bool = False  # flash_attn outputs NaN → correctness failure
    hang: bool = False  # the benchmark hangs → timeout result
    oom_above_seqlen: int | None = None  # every shape above this seqlen runs out of memory
    no_gpu: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def any(self) -> bool:
        return bool(self.import_error or self.slowdown or self.nan or self.hang or self.oom_above_seqlen
                    or self.no_gpu)

    @classmethod
    def from_mapping(cls, obj: Mapping[str, Any]) -> SimFaults:
        known = {"import_error", "import_error_of", "slowdown", "nan", "hang", "oom_above_seqlen", "oom_above",
                 "no_gpu"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise InputError(f"unknown simulated verification fault(s): {', '.join(unknown)}",
                             hint="known: " + ", ".join(sorted(known)))
        raw = obj.get("import_error")
        if raw is not None and not isinstance(raw, str | bool):
            raise InputError("verify_faults.import_error must be true or an error text")
        of = obj.get("import_error_of")
        if of is not None and of not in bench.FLASH_IMPLS:
            raise InputError(f"verify_faults.import_error_of must be one of {', '.join(bench.FLASH_IMPLS)}, "
                             f"got {of!r}")
        imp: str | None = IMPORT_ERRORS[of or bench.FLASH_IMPL] if raw is True else (raw or None)
        slowdown = float(obj.get("slowdown", 0.0) or 0.0)
        if not 0.0 <= slowdown < 1.0:
            raise InputError(f"verify_faults.slowdown must be in [0, 1), got {slowdown}")
        oom = obj.get("oom_above_seqlen", obj.get("oom_above"))
        return cls(import_error=imp, import_error_of=of, slowdown=slowdown, nan=bool(obj.get("nan", False)),
                   hang=bool(obj.get("hang", False)), oom_above_seqlen=int(oom) if oom is not None else None,
                   no_gpu=bool(obj.get("no_gpu", False)))

    @classmethod
    def parse(cls, text: str) -> SimFaults:
        obj: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            obj[key.strip()] = value.strip() if sep else True
        if isinstance(obj.get("slowdown"), str):
            obj["slowdown"] = float(obj["slowdown"])
        return cls.from_mapping(obj)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SimFaults:
        text = (os.environ if env is None else env).get(FAULTS_ENV, "")
        return cls.parse(text) if text.strip() else cls()


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _curve(seqlen: int) -> float:
    if seqlen in SEQLEN_CURVE:
        return SEQLEN_CURVE[seqlen]
    x = math.log2(max(seqlen, 1) / 512) / 4
    return max(0.0, min(1.0, x))


def model_tflops(gpu: GpuModel, impl: str, dtype: str, headdim: int, seqlen: int, causal: bool,
                 rng: random.Random | None = None) -> float | None:
    """Modelled forward TFLOP/s, None where the implementation cannot run this shape."""
    lo, hi = H100_RANGES[(impl, causal)]
    pos = _curve(seqlen)
    if rng is not None:
        pos = max(0.0, min(1.0, pos + rng.uniform(-0.08, 0.08)))
    value = lo + (hi - lo) * pos
    if impl in ("flash_attn", "sdpa_flash", "fa3", "fa4"):
        scale = gpu.flash_scale
    elif impl == "sdpa_cudnn":
        if gpu.cudnn_scale is None:
            return None
        scale = gpu.cudnn_scale
    elif impl == "sdpa_efficient":
        scale = gpu.efficient_scale
    else:
        scale = gpu.math_scale
    if scale <= 0:
        return None
    if headdim == 64:
        value *= MATH_HEADDIM64_FACTOR if impl == "sdpa_math" else HEADDIM64_FACTOR
    if dtype == "float16" and impl != "sdpa_math":
        value *= 1.01
    return value * scale


def model_peak_mib(impl: str, batch: int, seqlen: int, heads: int, headdim: int) -> float:
    tokens = batch * seqlen
    out = tokens * heads * headdim * 2
    if impl == "sdpa_math":
        return (out + MATH_BYTES_PER_SCORE * batch * heads * seqlen * seqlen) / 2**20
    return (out + tokens * heads * 4) / 2**20  # output + log-sum-exp


def _unsupported(gpu: GpuModel, impl: str, dtype: str) -> str | None:
    if dtype == "bfloat16" and not gpu.bf16 and impl != "sdpa_math":
        return f"bf16 needs compute capability ≥ 8.0 ({gpu.name} is {gpu.compute_capability})"
    if impl == "sdpa_flash" and not gpu.sdpa_flash:
        return "Flash attention only supports gpu architectures in the range [sm80, sm121]"
    if impl == "sdpa_cudnn" and gpu.cudnn_scale is None:
        return f"cuDNN attention needs sm80 or newer ({gpu.name} is sm{gpu.compute_capability.replace('.', '')})"
    return None


def simulate_verification(gpu_name: str, *, node: str, mode: str = "quick", at: datetime | None = None,
                          flash_attn_version: str | None = "2.8.3", torch_version: str = "2.8.0+cu128",
                          cuda: str = "12.8", driver: str = "570.86.15", python: str = "3.11.7",
                          expect: str | None = None, faults: SimFaults | None = None,
                          model_path: str | None = None, implementation: str | None = None,
                          beside: Mapping[str, str] | None = None) -> VerificationResult:
    """A verification result computed from the GPU model (no GPU involved).  ``implementation`` is the
    installed FlashAttention's variant (fa1 | fa2 | fa3 | fa4; default: from the version, FA2/FA1);
    ``beside``: the others installed in the same environment, impl name → version ({"fa4": "4.0.0b36"} beside
    FA2).  As bench.py does, the run verifies what ``expect`` names (default: the installed one) and measures
    every other one present beside it, whose failures are warnings."""
    gpu = gpu_model_for(gpu_name)
    faults = faults or SimFaults()
    started = (at or datetime.now(UTC)).astimezone(UTC)
    fa_impl = implementation if implementation in (bench.FA3_IMPL, bench.FA4_IMPL) else bench.FLASH_IMPL
    if expect is None:
        expect = fa_impl if fa_impl != bench.FLASH_IMPL else ("flash_attn" if gpu.flash_attn else "sdpa")
    versions = {**(beside or {}), fa_impl: flash_attn_version}
    present = [impl for impl in bench.FLASH_IMPLS if versions.get(impl) is not None]
    verified = verified_among(expect, present)
    # the rows bench.py reports: the verified implementation's and those of every other one present
    reported = bench.reported_impls(verified, {impl: bench.FlashLoaded({"present": True}) for impl in present})
    statuses = {impl: _flash_status(impl, versions.get(impl), faults) for impl in (*reported, bench.FLASH_IMPL)}
    seed = f"{node}|{started.isoformat()}"
    if faults.no_gpu:
        return failure_result(STATUS_NO_GPU, "torch.cuda.is_available() is False (simulated: no GPU visible)",
                              mode=mode, started_at=started, finished_at=started + timedelta(seconds=3),
                              simulated=True, expect=expect, hostname=node)
    if faults.hang:
        timeout = bench.DEFAULT_TIMEOUT[mode]
        return failure_result(STATUS_TIMEOUT, f"verification did not finish within {timeout:g} s (simulated hang); "
                              "its process group was killed", mode=mode, started_at=started,
                              finished_at=started + timedelta(seconds=timeout), simulated=True, expect=expect,
                              hostname=node)

    def runs(impl: str) -> bool:
        if impl != bench.FLASH_IMPL:  # FA3/FA4: bf16/fp16 kernels modelled on Hopper and newer only
            return statuses[impl].import_ok and gpu.flash_attn is not None and gpu.bf16 \
                and float(gpu.compute_capability) >= 9.0
        return statuses[impl].import_ok and gpu.flash_attn is not None

    correctness = []
    for impl, dtype, hd, causal in bench.correctness_cases(mode, reported):
        family = bench.flash_family(impl)
        is_fa = family is not None
        if family is not None and not statuses[family].import_ok:
            continue
        batch, seqlen = (1, sum(bench.VARLEN_SEQLENS)) if impl == "flash_attn_varlen" else (
            bench.CORRECTNESS_BATCH, bench.CORRECTNESS_SEQLEN)
        common: dict[str, Any] = {"impl": impl, "dtype": dtype, "headdim": hd, "causal": causal, "batch": batch,
                                  "seqlen": seqlen, "heads": bench.CORRECTNESS_HEADS, "simulated": True,
                                  "threshold_fwd": bench.THRESHOLDS[dtype]["fwd"],
                                  "threshold_bwd": bench.THRESHOLDS[dtype]["bwd"]}
        if family is not None and not runs(family):
            correctness.append(CorrectnessEntry(status="error", reason=f"{family} does not run on compute "
                                                f"capability {gpu.compute_capability}", **common))
            continue
        why = _unsupported(gpu, impl if not is_fa else "flash_attn", dtype)
        if why:
            correctness.append(CorrectnessEntry(status="unsupported", reason=why, **common))
            continue
        r = _rng(seed, "c", impl, dtype, hd, causal)
        # fwd: DESIGN §4 (bf16, 2.2e-3); fp16 ≈ bf16 / 8; backward ratios as measured by bench.py (CPU run)
        unit = 2.2e-3 if dtype == "bfloat16" else 2.8e-4
        if is_fa and faults.nan:
            correctness.append(CorrectnessEntry(status="fail", reason="NaN/Inf in fwd, dq, dk, dv (simulated)",
                                                nonfinite=("fwd", "dq", "dk", "dv"), **common))
            continue
        correctness.append(CorrectnessEntry(
            status="ok", fwd_rel_err=round(unit * r.uniform(0.85, 1.1), 7),
            dq_rel_err=round(unit * 1.1 * r.uniform(0.9, 1.1), 7),
            dk_rel_err=round(unit * 1.7 * r.uniform(0.9, 1.1), 7),
            dv_rel_err=round(unit * 1.7 * r.uniform(0.9, 1.1), 7), lowp_fwd_rel_err=round(unit * 0.75, 7), **common))
    correctness.extend(CorrectnessEntry(impl=impl, status="skipped", simulated=True,
                                        reason=bench._not_importable(impl))
                       for impl in reported if not statuses[impl].import_ok)

    speed = []
    for dtype, hd, seqlen, causal in bench.speed_shapes(mode, bench.SEQLENS, gpu.bf16):
        batch = bench.TOTAL_TOKENS // seqlen
        for impl in (*reported, *bench.SDPA_IMPLS):
            shape: dict[str, Any] = {"impl": impl, "dtype": dtype, "headdim": hd, "seqlen": seqlen, "batch": batch,
                                     "heads": bench.HEADS, "causal": causal, "simulated": True}
            is_fa = impl in reported
            if is_fa and not statuses[impl].import_ok:
                speed.append(SpeedEntry(status="skipped", reason=bench._not_importable(impl), **shape))
                continue
            if impl == "sdpa_math" and not bench.math_measured(mode, dtype, hd, seqlen, causal):
                speed.append(SpeedEntry(status="skipped", reason=f"math backend measured only up to seqlen "
                                        f"{bench.MATH_MAX_SEQLEN} (plus the DESIGN §4 shape)", **shape))
                continue
            why = _unsupported(gpu, impl, dtype)
            if is_fa and not runs(impl):
                why = why or f"{impl} does not run on compute capability {gpu.compute_capability}"
                speed.append(SpeedEntry(status="error", reason=why, **shape))
                continue
            if impl == "flash_attn" and gpu.flash_attn == "fa1" and dtype == "bfloat16":
                why = "FlashAttention 1.x on Turing supports fp16 only"
            tflops = None if why else model_tflops(gpu, impl, dtype, hd, seqlen, causal,
                                                   _rng(seed, "s", impl, dtype, hd, seqlen, causal))
            if tflops is None:
                speed.append(SpeedEntry(status="unsupported", reason=why or "not supported on this GPU", **shape))
                continue
            peak = model_peak_mib(impl, batch, seqlen, bench.HEADS, hd)
            inputs = 3 * batch * seqlen * bench.HEADS * hd * 2 / 2**20
            if (faults.oom_above_seqlen is not None and seqlen > faults.oom_above_seqlen) or \
                    peak + inputs > gpu.memory_mib * MEMORY_USABLE:
                speed.append(SpeedEntry(status="oom", reason=f"CUDA out of memory (simulated: needs "
                                        f"{peak + inputs:.0f} MiB of {gpu.memory_mib} MiB)", **shape))
                continue
            if faults.slowdown and (is_fa or impl == "sdpa_flash"):
                tflops *= 1.0 - faults.slowdown
            if faults.nan and is_fa:
                speed.append(SpeedEntry(status="error", reason="NaN/Inf in output (simulated)", **shape))
                continue
            flops = bench.attention_flops(batch, seqlen, bench.HEADS, hd, causal)
            speed.append(SpeedEntry(status="ok", ms=round(flops / (tflops * 1e12) * 1e3, 4),
                                    tflops=round(tflops, 2), peak_mem_mib=round(peak, 2), repeats=10, **shape))

    e2e = []
    desc = model_path or f"{bench.E2E_CONFIG} dimensions (random weights)"
    # estimated (not measured): decode of the small Qwen2 is launch-bound, so it scales weakly with the GPU
    base_tps = 420.0 * max(gpu.flash_scale, gpu.efficient_scale) ** 0.3
    for impl in bench.E2E_IMPLS:
        common2: dict[str, Any] = {"impl": impl, "model": desc, "random_weights": model_path is None,
                                   "batch": bench.E2E_BATCH, "prompt_len": bench.E2E_PROMPT,
                                   "new_tokens": bench.E2E_NEW_TOKENS, "simulated": True}
        if mode == "quick":
            e2e.append(E2EEntry(status="skipped", reason="quick mode skips the end-to-end check", **common2))
            continue
        if impl in ("flash_attention_3", "flash_attention_4"):  # the model covers FA2 and SDPA end to end
            e2e.append(E2EEntry(status="unsupported", reason=f"{impl}: not modelled on simulated nodes", **common2))
            continue
        if impl == "flash_attention_2" and not (bench.FLASH_IMPL in reported and runs(bench.FLASH_IMPL)):
            e2e.append(E2EEntry(status="unsupported", reason="FlashAttention2 cannot be used: flash_attn is not "
                                "importable or does not run on this GPU", **common2))
            continue
        factor = {"flash_attention_2": 1.0, "sdpa": 0.97, "eager": 0.8}[impl]
        if impl == "flash_attention_2" and faults.slowdown:
            factor *= 1.0 - faults.slowdown
        tps = base_tps * factor * _rng(seed, "e", impl).uniform(0.98, 1.02)
        produced = bench.E2E_BATCH * bench.E2E_NEW_TOKENS
        kv = 8 * 2 * bench.E2E_BATCH * (bench.E2E_PROMPT + bench.E2E_NEW_TOKENS) * 4 * 64 * 2 / 2**20
        scores = 0.0 if impl != "eager" else bench.E2E_BATCH * 16 * bench.E2E_PROMPT ** 2 * 2 * 2 / 2**20
        e2e.append(E2EEntry(status="ok", dtype="bfloat16" if gpu.bf16 else "float16",
                            tokens_per_s=round(tps, 2), seconds=round(produced / tps, 4), generated_tokens=produced,
                            peak_mem_mib=round(kv + 250.0 + scores, 1), weights_mib=round(222.0, 1), **common2))

    duration = (4.0 if mode == "quick" else 45.0) * _rng(seed, "d").uniform(0.9, 1.1)
    result = VerificationResult(
        schema_version=SCHEMA_VERSION, simulated=True, mode=mode, expect=expect, status="fail", passed=False,
        hostname=node, started_at=started, finished_at=started + timedelta(seconds=duration),
        duration_s=round(duration, 3),
        device=DeviceInfo(name=gpu.name + " (simulated)", compute_capability=gpu.compute_capability,
                          memory_mib=gpu.memory_mib, index=0, driver=driver, torch=torch_version, cuda=cuda,
                          python=python),
        flash_attn=statuses[verified or bench.FLASH_IMPL],
        flash_attn_implementations=tuple(statuses[impl] for impl in reported),
        correctness=tuple(correctness), speed=tuple(speed), e2e=tuple(e2e),
        config={"tokens": bench.TOTAL_TOKENS, "heads": bench.HEADS, "seqlens": list(bench.SEQLENS),
                "simulated_model": gpu.key, "model_source": gpu.source,
                "faults": {k: v for k, v in vars(faults).items() if v and k != "extra"}},
        notes=("simulated: numbers come from agent/verify/simulated.py's model of this GPU, not a measurement",),
    )
    # the verdict is the one every result gets (fleet.verification.judge), not a simulated rule of its own
    return result.with_verdict(judge(result))


FLASH_MODULES = {bench.FLASH_IMPL: ("flash_attn", "flash-attn"),  # impl → (module, distribution)
                 bench.FA3_IMPL: ("flash_attn_interface", "flash_attn_3"),
                 bench.FA4_IMPL: ("flash_attn.cute", "flash-attn-4")}


def _flash_status(fa_impl: str, version: str | None, faults: SimFaults) -> FlashAttnStatus:
    """What bench.py's import check reports for an implementation: installed (``version``) or absent."""
    module, dist = FLASH_MODULES[fa_impl]
    if version is None:
        return FlashAttnStatus(import_ok=False, error=f"ModuleNotFoundError: No module named '{module}'",
                               error_type="ModuleNotFoundError", impl=fa_impl, module=module, present=False)
    if faults.import_error and faults.import_error_of in (None, fa_impl):
        return FlashAttnStatus(import_ok=False, version=version, error=faults.import_error, error_type="ImportError",
                               impl=fa_impl, module=module, dist=dist, present=True)
    if fa_impl == bench.FLASH_IMPL:
        api = "fa1-unpadded" if version.startswith("1.") else "fa2"
        return FlashAttnStatus(import_ok=True, version=version, api=api, impl=fa_impl,
                               implementation="fa1" if api == "fa1-unpadded" else "fa2", module=module, dist=dist,
                               present=True)
    return FlashAttnStatus(import_ok=True, version=version, api=fa_impl, impl=fa_impl, implementation=fa_impl,
                           module=module, dist=dist, present=True)


def simulate_for_facts(facts: NodeFacts, *, mode: str = "quick", at: datetime | None = None,
                       faults: SimFaults | None = None, expect: str | None = None,
                       model_path: str | None = None) -> VerificationResult:
    """The simulated result for a node described by its facts (DESIGN §3.1)."""
    if faults is None:
        prof = facts.extra.get("verify_faults") if isinstance(facts.extra, Mapping) else None
        faults = SimFaults.from_mapping(prof) if isinstance(prof, Mapping) else SimFaults.from_env()
    if facts.torch is None:
        now = (at or datetime.now(UTC)).astimezone(UTC)
        return failure_result(STATUS_NO_TORCH, f"torch is not importable in {facts.python.executable} (simulated)",
                              mode=mode, started_at=now, finished_at=now + timedelta(seconds=1), simulated=True,
                              expect=expect or "flash_attn", hostname=facts.hostname)
    why_no_gpu = None
    # torch sees a GPU without an NVIDIA driver entry on ROCm (torch.cuda is HIP there) and on Jetson (the
    # driver is part of L4T; JetPack's CUDA is what the resolver plans against)
    rocm = facts.torch.hip is not None and any(g.is_amd for g in facts.gpus)
    jetson = facts.os.l4t is not None and facts.torch.cuda is not None
    if not facts.gpus or (facts.driver is None and not rocm and not jetson):
        why_no_gpu = "no NVIDIA driver or GPU"
    elif facts.torch.cuda is None and not rocm:
        why_no_gpu = f"torch {facts.torch.version} is a CPU-only build"
    elif facts.driver is not None and facts.torch.cuda is not None \
            and int(facts.torch.cuda.split(".")[0]) > int(facts.driver.cuda_max.split(".")[0]):
        why_no_gpu = (f"torch built for CUDA {facts.torch.cuda} but the driver supports CUDA "
                      f"{facts.driver.cuda_max} at most (CUDA driver version is insufficient)")
    if why_no_gpu is not None:
        now = (at or datetime.now(UTC)).astimezone(UTC)
        return failure_result(STATUS_NO_GPU, f"torch.cuda.is_available() is False ({why_no_gpu}; simulated)",
                              mode=mode, started_at=now, finished_at=now + timedelta(seconds=2), simulated=True,
                              expect=expect or "flash_attn", hostname=facts.hostname)
    gpu_name = facts.gpus[0].name
    fa = facts.flash_attn
    # FA4 (or FA3) installed beside FA2: both are there to import, the job's ``expect`` says which is verified
    beside = {expect_for_variant(b.variant): b.version for b in fa.beside if b.variant in IMPLEMENTATIONS} \
        if fa is not None else {}
    return simulate_verification(
        gpu_name, node=facts.hostname, mode=mode, at=at, flash_attn_version=fa.version if fa else None,
        torch_version=facts.torch.version, cuda=facts.torch.cuda or "",
        driver=facts.driver.version if facts.driver else "", python=facts.python.version, expect=expect,
        faults=faults, model_path=model_path, implementation=fa.variant if fa else None, beside=beside)
