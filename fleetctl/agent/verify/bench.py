#!/usr/bin/env python3
"""fleetctl verification benchmark: FlashAttention on this node's GPU.

STANDALONE: run by the node's *target* Python (the one that has torch and,
hopefully, flash_attn).  It imports only the standard library at module level;
torch, flash_attn and transformers are imported lazily inside the worker.  It
must never import fleet/agent/controller code (the target environment does not
have them).  The agent imports this module only for its constants (shape grid,
thresholds, FLOP formula) so the simulated model follows the same grid.

    python bench.py --mode quick|full --out result.json [--model PATH]
                    [--timeout-per-shape S] [--timeout S] [--device cuda:0]
                    [--expect flash_attn|fa3|fa4|sdpa]

Two processes:

* the *supervisor* (this script as started) needs only the stdlib.  It starts
  a *worker* (this script with ``--worker``), reads its progress events (JSON
  lines), enforces a per-task watchdog and an overall deadline, and writes the
  one JSON result.  A task that hangs gets its worker SIGKILLed (which frees
  the GPU context), is recorded as ``timeout`` and the worker is restarted
  after that task; a worker that crashes (segfault in an extension, CUDA
  error) is recorded the same way.  The worker shares the supervisor's process
  group so an outside ``killpg`` (the agent's runner) reaches both, and it asks
  the kernel to kill it if the supervisor dies (PR_SET_PDEATHSIG).
* the *worker* does the measurements: import check, correctness against a
  float32 reference (forward and backward), a speed grid (forward, and forward
  + backward) through every FlashAttention implementation present (FA2/FA1
  ``flash_attn``, FA3 ``flash_attn_interface``, FA4 ``flash_attn.cute``) and
  each torch SDPA backend, and an end-to-end generation check.

Which FlashAttention is *verified* (its failures fail the run) follows
``--expect``: ``fa3``/``fa4`` name one; ``flash_attn`` means FA2 (or FA1) when
it is installed, else the FA3 or FA4 that is; ``sdpa`` verifies none.  The
others present are measured alongside, their failures are warnings.

Result schema: docs/verification.md; parsed strictly by fleet/verification.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------
# Grid, thresholds and formula (imported by agent/verify/simulated.py too).
# ---------------------------------------------------------------------------

TOTAL_TOKENS = 16384  # batch = TOTAL_TOKENS // seqlen (flash-attention's benchmark setting)
HEADS = 16  # DESIGN §4: 16 heads (hidden 2048 at head dim 128)
DTYPES = ("bfloat16", "float16")
HEADDIMS = (64, 128)
SEQLENS = (512, 1024, 2048, 4096, 8192)
CAUSALS = (False, True)

FLASH_IMPL = "flash_attn"  # FA2, or FA1 through its unpadded API: the name results have always used
FA3_IMPL = "fa3"  # flash_attn_interface (the flash_attn_3 distribution, built from hopper/)
FA4_IMPL = "fa4"  # flash_attn.cute (the flash-attn-4 distribution, CuTe DSL kernels compiled at first call)
FLASH_IMPLS = (FLASH_IMPL, FA3_IMPL, FA4_IMPL)
SDPA_IMPLS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")
SPEED_IMPLS = (*FLASH_IMPLS, *SDPA_IMPLS)
# forward+backward is measured for everything but the math backend (its backward at 16k tokens is minutes of
# O(seqlen²) memory traffic and says nothing about a FlashAttention install)
FWD_BWD_IMPLS = (*FLASH_IMPLS, "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
# flash-attention's benchmarks count the backward pass as 2.5 forwards (5 matmuls of the forward's 2 in size)
FWD_BWD_FLOPS_FACTOR = 3.5
EXPECT_FLASH = "flash_attn"  # FA2/FA1 when installed, else the FlashAttention that is (FA3, then FA4)
EXPECTS = (EXPECT_FLASH, FA3_IMPL, FA4_IMPL, "sdpa")
# Extra seconds a FA4 task may take: its kernels are compiled (CuTe DSL JIT) at the first call of each
# (dtype, head dim, causal, direction), tens of seconds where the SDPA backends need milliseconds.
JIT_ALLOWANCE_S = {FA4_IMPL: 120.0}
SDPA_BACKEND_NAMES = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}
CORRECTNESS_IMPLS = (FLASH_IMPL, "flash_attn_varlen", FA3_IMPL, FA4_IMPL, "sdpa_flash", "sdpa_efficient",
                     "sdpa_cudnn")

# The math backend materialises the (batch, heads, seqlen, seqlen) score matrix:
# at seqlen 8192 it needs ~19 GB and ~50 ms a call on an H100 (DESIGN §4).  In full
# mode it is measured up to this seqlen, plus the single DESIGN §4 comparison shape.
MATH_MAX_SEQLEN = 2048
MATH_EXTRA_SHAPES = (("bfloat16", 128, 8192, False),)

QUICK_SHAPES = (  # (dtype, headdim, seqlen, causal)
    ("bfloat16", 128, 1024, False),
    ("bfloat16", 128, 1024, True),
    ("bfloat16", 128, 4096, False),
    ("bfloat16", 128, 4096, True),
)
QUICK_MATH_SHAPES = (("bfloat16", 128, 1024, False),)

# Relative error ||out - ref|| / ||ref|| (Frobenius) against a float32 reference.
# Rounding a float32 result to the storage type alone costs ~u/sqrt(3) in this norm
# (u = 2^-8 for bf16, 2^-11 for fp16); FlashAttention also rounds P before P@V and
# the backward pass accumulates more (dS = P * (dP - rowsum(dO*O))).  DESIGN §4
# measured 2.2e-3 for bf16 forward on an H100.  Thresholds are ~5-10x the expected
# error, so a pass is robust and a real fault (wrong kernel, garbage, wrong mask) —
# which gives errors of order 1e-1..1 — still fails.
THRESHOLDS = {
    "bfloat16": {"fwd": 2e-2, "bwd": 5e-2},
    "float16": {"fwd": 5e-3, "bwd": 1e-2},
}

CORRECTNESS_BATCH = 2
CORRECTNESS_SEQLEN = 333  # odd on purpose: exercises partial tiles and the causal edge
CORRECTNESS_HEADS = 4
VARLEN_SEQLENS = (100, 333, 57)

DEFAULT_TIMEOUT_PER_SHAPE = 30.0
# full: the kernel grid (~2 min with FA4's compiles), GQA/decode rows (~1-2 min), e2e (~30 s per implementation)
DEFAULT_TIMEOUT = {"quick": 90.0, "full": 900.0}
MAX_RESTARTS = 3

# GQA/MQA (issue 16): what LLM attention runs today, 32 query heads against 8 KV heads (Llama-3-8B's ratio) or
# one (MQA), bf16, head dim 128, causal, at a prefill length; batch = TOTAL_TOKENS // GQA_SEQLEN.  The math
# backend is left out (it is the reference; at 32 heads × 4k it is seconds of O(seqlen²) work a shape).
GQA_DTYPE = "bfloat16"
GQA_HEADDIM = 128
GQA_HEADS = 32
GQA_KV_HEADS = (8, 1)
GQA_SEQLEN = 4096
GQA_IMPLS = (*FLASH_IMPLS, "sdpa_flash", "sdpa_efficient", "sdpa_cudnn")
# Decode: one new query token per sequence against a KV cache (batch 8, GQA 32/8, bf16, head dim 128), dense
# and paged (DECODE_PAGE_SIZE tokens a page: FA2's paged KV needs a multiple of 256).  It is memory-bound, so
# rows report latency and the bandwidth of the KV read, not TFLOP/s.
DECODE_BATCH = 8
DECODE_HEADS = 32
DECODE_KV_HEADS = 8
DECODE_CACHE_LENS = (4096, 16384)
DECODE_PAGE_SIZE = 256
# (impl, paged): FA2/FA3 through flash_attn_with_kvcache (block_table / page_table), FA4 through its dense
# flash_attn_func with seqlen_q = 1 and its varlen func with a page_table; SDPA backends take a dense cache only
DECODE_IMPLS = ((FLASH_IMPL, False), (FLASH_IMPL, True), (FA3_IMPL, False), (FA3_IMPL, True), (FA4_IMPL, False),
                (FA4_IMPL, True), *((i, False) for i in SDPA_IMPLS))

# End to end (full mode): agent/verify/e2e_gen.py's measurement per attn_implementation, on a
# Qwen2-1.5B-dimensioned model with random weights (or --model PATH).  flash_attention_N needs its
# FlashAttention importable here and the name registered in transformers' AttentionInterface.
E2E_IMPLS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
E2E_NEEDS = {"flash_attention_2": FLASH_IMPL, "flash_attention_3": FA3_IMPL, "flash_attention_4": FA4_IMPL}
E2E_CONFIG = "qwen2-1.5b"  # e2e_gen.CONFIGS
E2E_BATCH = 8
E2E_PROMPT = 4096  # where attention is a large share of the work (issue 16)
E2E_NEW_TOKENS = 32
E2E_TIMEOUT_S = 240.0  # per implementation: model build, prefill ×2, generate(1) ×2, generate(1+N) ×2

STATUS_PASS = "pass"
STATUS_FAIL = "fail"
STATUS_NO_GPU = "no-gpu"
STATUS_NO_TORCH = "no-torch"
STATUS_TIMEOUT = "timeout"
STATUS_ERROR = "error"


def attention_flops(batch: int, seqlen: int, heads: int, headdim: int, causal: bool) -> float:
    """Forward FLOPs, flash-attention's benchmarks/benchmark_flash_attention.py formula."""
    return 4.0 * batch * seqlen * seqlen * heads * headdim / (2 if causal else 1)


def speed_shapes(mode: str, seqlens: tuple[int, ...] = SEQLENS, bf16: bool = True) -> list[tuple[str, int, int, bool]]:
    """(dtype, headdim, seqlen, causal).  Quick mode measures bf16, or fp16 on GPUs without
    bf16 (compute capability < 8.0), so it always has something comparable to measure."""
    if mode == "quick":
        shapes = [s for s in QUICK_SHAPES if s[2] in seqlens] or [(QUICK_SHAPES[0][0], QUICK_SHAPES[0][1],
                                                                   seqlens[0], False)]
        return shapes if bf16 else [("float16", h, s, c) for _, h, s, c in shapes]
    return [(d, h, s, c) for d in DTYPES for h in HEADDIMS for s in seqlens for c in CAUSALS]


def math_measured(mode: str, dtype: str, headdim: int, seqlen: int, causal: bool) -> bool:
    if mode == "quick":
        smallest = min(s[2] for s in QUICK_SHAPES)
        return ("bfloat16", headdim, seqlen, causal) in QUICK_MATH_SHAPES or seqlen <= smallest // 2
    return seqlen <= MATH_MAX_SEQLEN or (dtype, headdim, seqlen, causal) in MATH_EXTRA_SHAPES


def flash_family(impl: str) -> str | None:
    """The FlashAttention implementation an entry's impl belongs to (``flash_attn_varlen`` → ``flash_attn``)."""
    for name in FLASH_IMPLS:
        if impl == name or impl.startswith(name + "_"):
            return name
    return None


def correctness_cases(mode: str, flash: tuple[str, ...] = (FLASH_IMPL,)) -> list[tuple[str, str, int, bool]]:
    """(impl, dtype, headdim, causal) for the FlashAttention implementations in ``flash`` and the SDPA
    backends.  FA3/FA4 have no varlen case here: their dense API is what the speed grid measures."""
    impls = (FLASH_IMPL, "flash_attn_varlen", FA3_IMPL, FA4_IMPL, "sdpa_flash") if mode == "quick" \
        else CORRECTNESS_IMPLS
    headdims = (128,) if mode == "quick" else HEADDIMS
    out = []
    for impl in impls:
        family = flash_family(impl)
        if family is not None and family not in flash:
            continue
        for dtype in DTYPES:
            for hd in headdims if impl != "flash_attn_varlen" else (128,):
                for causal in CAUSALS:
                    out.append((impl, dtype, hd, causal))
    return out


def gqa_cases(mode: str) -> list[tuple[str, int, str]]:
    """(impl, kv heads, direction) of the GQA/MQA rows.  Quick: GQA 32/8 forward only."""
    if mode == "quick":
        return [(impl, GQA_KV_HEADS[0], "fwd") for impl in GQA_IMPLS]
    return [(impl, hk, direction) for hk in GQA_KV_HEADS for direction in ("fwd", "fwd_bwd") for impl in GQA_IMPLS]


def decode_cases(mode: str) -> list[tuple[str, int, bool]]:
    """(impl, KV-cache length, paged) of the decode rows.  Quick: the 4k cache only."""
    lens = DECODE_CACHE_LENS[:1] if mode == "quick" else DECODE_CACHE_LENS
    return [(impl, n, paged) for n in lens for impl, paged in DECODE_IMPLS]


def decode_kv_bytes(batch: int, cache_len: int, heads_k: int, headdim: int, itemsize: int = 2) -> int:
    """Bytes of K and V one decode step must read: what bounds its speed."""
    return 2 * batch * cache_len * heads_k * headdim * itemsize


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Worker: the measurements (needs torch).
# ---------------------------------------------------------------------------


@dataclass
class Task:
    id: str
    kind: str  # correctness | speed | e2e
    timeout: float
    base: dict[str, Any]
    run: Callable[[], list[dict[str, Any]]]


@dataclass
class FlashLoaded:
    """One FlashAttention implementation as this worker found it: the import info that goes into the
    result, and its entry points behind one calling convention (``dense(q, k, v, causal) -> out``)."""

    info: dict[str, Any]
    dense: Callable[..., Any] | None = None
    varlen: Callable[..., Any] | None = None
    kvcache: Callable[..., Any] | None = None  # FA2/FA3 flash_attn_with_kvcache (the decode rows)

    @property
    def ok(self) -> bool:
        return bool(self.info.get("import_ok"))

    @property
    def present(self) -> bool:
        return bool(self.info.get("present"))


@dataclass
class WorkerCtx:
    args: argparse.Namespace
    torch: Any
    device: Any
    is_cuda: bool
    fa: dict[str, Any] = field(default_factory=dict)  # import info of the verified implementation
    fa_func: Any = None  # FA2/FA1 entry points (the flash_attn and flash_attn_varlen rows)
    fa_varlen: Any = None
    deadline: float = math.inf
    inject_nan: bool = False
    flash: dict[str, FlashLoaded] = field(default_factory=dict)  # impl name → what was found
    reported: tuple[str, ...] = (FLASH_IMPL,)  # FlashAttention impls that get rows in the result


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean_exc(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__


# Where each implementation comes from: (module imported, distributions that install it).
FLASH_SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    FLASH_IMPL: ("flash_attn", ("flash-attn",)),
    FA3_IMPL: ("flash_attn_interface", ("flash-attn-3", "flash_attn_3")),
    FA4_IMPL: ("flash_attn.cute", ("flash-attn-4",)),
}


def _installed_dist(dists: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(distribution, version) of the first of ``dists`` installed in this interpreter, else (None, None)."""
    from importlib import metadata

    for name in dists:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken dist-info must not stop the benchmark
            continue
    return None, None


def _import_failed(info: dict[str, Any], exc: BaseException, absent_names: tuple[str, ...]) -> None:
    """Record an import failure.  ``present`` stays False only when the module itself is missing and no
    distribution claims it: a missing implementation is not a broken one (FA4's ``flash_attn`` namespace
    has no ``flash_attn_interface``, and that says nothing about FA2)."""
    info["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    info["error_type"] = type(exc).__name__
    info["traceback"] = traceback.format_exc()[-6000:]
    missing = isinstance(exc, ModuleNotFoundError) and getattr(exc, "name", None) in absent_names
    info["present"] = bool(info.get("dist")) or not missing
    if isinstance(exc, KeyboardInterrupt):
        raise exc


def _flash_info(impl: str) -> dict[str, Any]:
    module, dists = FLASH_SOURCES[impl]
    dist, version = _installed_dist(dists)
    return {"import_ok": False, "version": version, "error": None, "error_type": None, "module_path": None,
            "api": None, "impl": impl, "implementation": None if impl == FLASH_IMPL else impl, "module": module,
            "dist": dist, "present": dist is not None}


def _first(out: Any) -> Any:
    """FA4 always returns (out, lse) and some FA3 versions do too; the bench wants ``out``."""
    return out[0] if isinstance(out, tuple | list) else out


def import_fa3() -> FlashLoaded:
    """FlashAttention 3 (Hopper): top-level ``flash_attn_interface``; never raises."""
    info = _flash_info(FA3_IMPL)
    try:
        import flash_attn_interface  # type: ignore[import-not-found]

        func = flash_attn_interface.flash_attn_func
        varlen = getattr(flash_attn_interface, "flash_attn_varlen_func", None)
        kvcache = getattr(flash_attn_interface, "flash_attn_with_kvcache", None)
    except BaseException as exc:
        _import_failed(info, exc, ("flash_attn_interface",))
        return FlashLoaded(info)
    info.update(import_ok=True, present=True, api="fa3", module_path=getattr(flash_attn_interface, "__file__", None))
    info["version"] = info["version"] or getattr(flash_attn_interface, "__version__", None)

    def dense(q: Any, k: Any, v: Any, causal: bool = False) -> Any:
        return _first(func(q, k, v, causal=causal))

    return FlashLoaded(info, dense, varlen, kvcache)


def import_fa4() -> FlashLoaded:
    """FlashAttention 4 (CuTe DSL): ``from flash_attn.cute import flash_attn_func``; never raises.  Its
    ``__version__`` reads a distribution named "fa4" (0.0.0 when absent): the version comes from the
    flash-attn-4 distribution instead."""
    info = _flash_info(FA4_IMPL)
    try:
        from flash_attn import cute  # type: ignore[import-not-found]

        func = cute.flash_attn_func
        varlen = getattr(cute, "flash_attn_varlen_func", None)
    except BaseException as exc:
        _import_failed(info, exc, ("flash_attn", "flash_attn.cute"))
        return FlashLoaded(info)
    info.update(import_ok=True, present=True, api="fa4", module_path=getattr(cute, "__file__", None))
    if not info["version"]:
        own = getattr(cute, "__version__", None)
        info["version"] = own if own not in (None, "0.0.0") else None

    def dense(q: Any, k: Any, v: Any, causal: bool = False) -> Any:
        return _first(func(q, k, v, causal=causal))

    return FlashLoaded(info, dense, varlen)


def detect_flash() -> dict[str, FlashLoaded]:
    """Every FlashAttention implementation this interpreter has (or claims to have), by impl name."""
    info, func, varlen = import_flash_attn()
    kvcache = None
    if info.get("api") == "fa2" and info.get("import_ok"):
        kvcache = getattr(sys.modules.get("flash_attn"), "flash_attn_with_kvcache", None)
    return {FLASH_IMPL: FlashLoaded(info, func, varlen, kvcache), FA3_IMPL: import_fa3(), FA4_IMPL: import_fa4()}


def choose_verified(expect: str, found: dict[str, FlashLoaded]) -> str | None:
    """The implementation the run verifies: the expected one, or for ``flash_attn`` FA2/FA1 when installed,
    else the FA3/FA4 that is (a node whose only FlashAttention is FA4 is verified on FA4), else FA2 so the
    result says why ``flash_attn`` is missing.  None for ``sdpa``."""
    if expect == "sdpa":
        return None
    if expect in (FA3_IMPL, FA4_IMPL):
        return expect
    for impl in FLASH_IMPLS:
        if impl in found and found[impl].present:
            return impl
    return FLASH_IMPL


def reported_impls(verified: str | None, found: dict[str, FlashLoaded]) -> tuple[str, ...]:
    """FlashAttention implementations that get rows: the verified one and every other one present; with
    none verified (SDPA nodes) and none present, FA2's skipped rows, as results always had."""
    present = [i for i in FLASH_IMPLS if i in found and found[i].present]
    first = verified or (FLASH_IMPL if not present else None)
    return tuple(i for i in FLASH_IMPLS if i == first or i in present)


def import_flash_attn() -> tuple[dict[str, Any], Any, Any]:
    """Import flash_attn (FA2, or FA1 through its unpadded API); never raises.  Returns (info, fa_func,
    varlen_func)."""
    info = _flash_info(FLASH_IMPL)
    try:
        import flash_attn
    except BaseException as exc:  # ImportError, OSError (undefined symbol), RuntimeError...
        _import_failed(info, exc, ("flash_attn",))
        return info, None, None
    info["version"] = getattr(flash_attn, "__version__", None) or info["version"]
    info["module_path"] = getattr(flash_attn, "__file__", None)
    fa_func = getattr(flash_attn, "flash_attn_func", None)
    varlen = getattr(flash_attn, "flash_attn_varlen_func", None)
    try:
        if fa_func is None or varlen is None:  # FlashAttention 1.x: unpadded (varlen) API only
            from flash_attn.flash_attn_interface import (  # type: ignore[import-not-found]
                flash_attn_unpadded_func,
            )

            varlen = flash_attn_unpadded_func
            fa_func = _fa1_dense(varlen)
            info.update(api="fa1-unpadded", implementation="fa1")
        else:
            info.update(api="fa2", implementation="fa2")
        # The python package imports lazily on some versions; touch the extension now.
        for ext in ("flash_attn_2_cuda", "flash_attn_cuda"):
            try:
                __import__(ext)
                info["extension"] = ext
                break
            except ImportError as exc:
                info.setdefault("extension_errors", []).append(_short(exc, 800))
        if "extension" not in info:
            raise ImportError("flash_attn imported but none of its CUDA extensions did: "
                              + "; ".join(info.get("extension_errors", [])))
    except BaseException as exc:
        # FA4 alone leaves a namespace package "flash_attn" without flash_attn_interface: FA2 is absent
        _import_failed(info, exc, ("flash_attn", "flash_attn.flash_attn_interface"))
        return info, None, None
    info.update(import_ok=True, present=True)
    return info, fa_func, varlen


def _fa1_dense(varlen: Any) -> Callable[..., Any]:
    def dense(q: Any, k: Any, v: Any, causal: bool = False) -> Any:
        import torch  # type: ignore[import-not-found]

        b, s, h, d = q.shape
        cu = torch.arange(0, (b + 1) * s, step=s, dtype=torch.int32, device=q.device)
        out = varlen(q.reshape(b * s, h, d), k.reshape(b * s, h, d), v.reshape(b * s, h, d), cu, cu, s, s, 0.0,
                     causal=causal)
        return out.reshape(b, s, h, d)

    return dense


def _dtype(torch: Any, name: str) -> Any:
    return getattr(torch, name)


def _sync(ctx: WorkerCtx) -> None:
    if ctx.is_cuda:
        ctx.torch.cuda.synchronize(ctx.device)


def _free(ctx: WorkerCtx, collect: bool = False) -> None:
    if collect:  # a full gc pass costs tens of ms with torch loaded: only after big objects
        gc.collect()
    if ctx.is_cuda:
        ctx.torch.cuda.empty_cache()


def _is_oom(ctx: WorkerCtx, exc: BaseException) -> bool:
    oom_type = getattr(ctx.torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower()


def _poison(ctx: WorkerCtx) -> None:
    """Fill the caching allocator's free blocks with NaN bit patterns (0xFF bytes are NaN
    in fp32/fp16/bf16) so an output element a kernel forgets to write reads as NaN."""
    if not ctx.is_cuda:
        return
    torch = ctx.torch
    small = [torch.full((1 << 20,), 0xFF, dtype=torch.uint8, device=ctx.device) for _ in range(16)]
    big = torch.full((64 << 20,), 0xFF, dtype=torch.uint8, device=ctx.device)
    _sync(ctx)
    del small, big


def _ref_attention(torch: Any, q: Any, k: Any, v: Any, causal: bool) -> Any:
    """Plain math attention in float32 on (batch, seqlen, heads, headdim) inputs."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        sq, sk = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(dim=-1) @ vf).transpose(1, 2)


def _rel_err(torch: Any, got: Any, ref: Any) -> float | None:
    if got is None:
        return None
    diff = got.float() - ref.float()
    den = float(torch.linalg.vector_norm(ref.float()))
    num = float(torch.linalg.vector_norm(diff))
    if not math.isfinite(num):
        return None
    return num / den if den > 0 else num


def _finite(torch: Any, t: Any) -> bool:
    return t is not None and bool(torch.isfinite(t).all())


@contextlib.contextmanager
def _sdpa_backend(ctx: WorkerCtx, impl: str) -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel  # type: ignore[import-not-found]

    backend = getattr(SDPBackend, SDPA_BACKEND_NAMES[impl])
    with sdpa_kernel([backend]):
        yield


def _sdpa_fn(ctx: WorkerCtx) -> Callable[..., Any]:
    F = ctx.torch.nn.functional

    def call(q: Any, k: Any, v: Any, causal: bool) -> Any:
        # (b, s, h, d) -> (b, h, s, d) views, as transformers passes them.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal)
        return out.transpose(1, 2)

    return call


def _unsupported_reason(exc: BaseException, caught: list[warnings.WarningMessage]) -> str:
    msgs = []
    for w in caught:
        text = str(w.message).strip()
        if text and text not in msgs:
            msgs.append(text)
    base = _clean_exc(exc)
    return (base + (" — " + " | ".join(msgs) if msgs else ""))[:1500]


def _looks_unsupported(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in ("No available kernel", "No viable backend", "not supported", "only supports",
                                   "Unsupported", "unsupported", "requires", "FlashAttention only support",
                                   "is not implemented"))


def _flash_ok(ctx: WorkerCtx, impl: str) -> bool:
    if impl == FLASH_IMPL and not ctx.flash:  # a context made without detect_flash (tests, older callers)
        return bool(ctx.fa.get("import_ok"))
    loaded = ctx.flash.get(impl)
    return loaded is not None and loaded.ok


def _flash_dense(ctx: WorkerCtx, impl: str) -> Callable[..., Any]:
    loaded = ctx.flash.get(impl)
    if loaded is None or loaded.dense is None:
        raise RuntimeError(f"{impl} is not importable in this worker")
    return loaded.dense


def _not_importable(impl: str) -> str:
    if impl == FLASH_IMPL:
        return "flash_attn not importable (see flash_attn.error)"
    return f"{impl} ({FLASH_SOURCES[impl][0]}) not importable (see flash_attn_implementations)"


def _may_be_unsupported(impl: str, exc: BaseException) -> bool:
    """An exception that means "this implementation does not do this shape", not "it is broken".  FA2's
    errors always count (its shapes here are all ones it supports); FA3/FA4 reject head dims and dtypes
    per architecture with an AssertionError/ValueError naming the limit ("... is not supported on SM90")."""
    if impl in (FA3_IMPL, FA4_IMPL):
        return isinstance(exc, NotImplementedError) or _looks_unsupported(exc)
    return flash_family(impl) is None and isinstance(exc, RuntimeError) and _looks_unsupported(exc)


def run_correctness(ctx: WorkerCtx, impl: str, dtype: str, headdim: int, causal: bool,
                    base: dict[str, Any]) -> list[dict[str, Any]]:
    torch = ctx.torch
    entry = dict(base)
    thr = THRESHOLDS[dtype]
    entry.update(threshold_fwd=thr["fwd"], threshold_bwd=thr["bwd"])
    family = flash_family(impl)
    if family is not None and not _flash_ok(ctx, family):
        entry.update(status="skipped", reason=_not_importable(family))
        return [entry]
    dt = _dtype(torch, dtype)
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(int(time.time_ns()) & 0x7FFFFFFF)  # fresh inputs every run
    entry["seed_source"] = "time"
    heads = CORRECTNESS_HEADS
    if impl == "flash_attn_varlen":
        lens = list(VARLEN_SEQLENS)
        shape: tuple[int, ...] = (sum(lens), heads, headdim)
    else:
        lens = []
        shape = (CORRECTNESS_BATCH, CORRECTNESS_SEQLEN, heads, headdim)
    try:
        _poison(ctx)
        q, k, v, dout = (torch.randn(shape, generator=gen, device=ctx.device, dtype=dt) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if impl == FLASH_IMPL:
                    out = ctx.fa_func(q, k, v, causal=causal)
                elif impl in (FA3_IMPL, FA4_IMPL):
                    out = _flash_dense(ctx, impl)(q, k, v, causal=causal)
                elif impl == "flash_attn_varlen":
                    cu = torch.tensor([0, *itertools_accumulate(lens)], dtype=torch.int32, device=ctx.device)
                    out = ctx.fa_varlen(q, k, v, cu, cu, max(lens), max(lens), 0.0, causal=causal)
                else:
                    with _sdpa_backend(ctx, impl):
                        out = _sdpa_fn(ctx)(q, k, v, causal)
                        out.backward(dout)
                if family is not None:
                    if ctx.inject_nan:
                        out = out * float("nan")
                    out.backward(dout)
                elif ctx.inject_nan:
                    out = out * float("nan")
                _sync(ctx)
            except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
                if _is_oom(ctx, exc):
                    raise
                if _may_be_unsupported(impl, exc):
                    entry.update(status="unsupported", reason=_unsupported_reason(exc, caught))
                    return [entry]
                raise
        # float32 reference on upcast copies of the same inputs
        leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        if impl == "flash_attn_varlen":
            refs = []
            start = 0
            for n in lens:
                sl = slice(start, start + n)
                qs, ks, vs = (t[sl].unsqueeze(0) for t in leaves)
                refs.append(_ref_attention(torch, qs, ks, vs, causal).squeeze(0))
                start += n
            ref = torch.cat(refs)
        else:
            ref = _ref_attention(torch, leaves[0], leaves[1], leaves[2], causal)
        ref.backward(dout.float())
        got = {"fwd": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
        want = {"fwd": ref, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
        nonfinite = [name for name, t in got.items() if not _finite(torch, t)]
        errs = {name: _rel_err(torch, got[name], want[name]) for name in got}
        # context: the same math in the low-precision dtype (how far plain rounding goes)
        with torch.no_grad():
            lowp = _ref_attention(torch, q.detach(), k.detach(), v.detach(), causal) if impl != "flash_attn_varlen" \
                else None
            if lowp is not None:
                lowp = lowp.to(dt)
        entry.update(
            fwd_rel_err=errs["fwd"], dq_rel_err=errs["dq"], dk_rel_err=errs["dk"], dv_rel_err=errs["dv"],
            lowp_fwd_rel_err=_rel_err(torch, lowp, ref) if lowp is not None else None,
            nonfinite=nonfinite,
        )
        reasons = []
        if nonfinite:
            reasons.append("NaN/Inf in " + ", ".join(nonfinite))
        for name in ("fwd", "dq", "dk", "dv"):
            limit = thr["fwd"] if name == "fwd" else thr["bwd"]
            e = errs[name]
            if e is not None and e > limit:
                reasons.append(f"{name} relative error {e:.3g} > {limit:g}")
        entry["status"] = "fail" if reasons else "ok"
        if reasons:
            entry["reason"] = "; ".join(reasons)
        return [entry]
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
        if _is_oom(ctx, exc):
            entry.update(status="oom", reason=_clean_exc(exc))
        else:
            entry.update(status="error", reason=_short(exc))
        return [entry]
    finally:
        _free(ctx)


def itertools_accumulate(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _time_calls(ctx: WorkerCtx, fn: Callable[[], Any], target_s: float, min_reps: int, max_reps: int) -> tuple[
        float, int]:
    """Median milliseconds per call (CUDA events on a GPU, perf_counter on CPU), after a warm-up of about
    half the target time: without it the first shape of the H100 run of 2026-11-25 measured 169 TFLOP/s where
    the same shape gave 256 in another run and its float16 twin 255 in the same one (docs/gpu-e2e.md)."""
    torch = ctx.torch
    t0 = time.perf_counter()
    fn()
    _sync(ctx)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(min_reps, min(max_reps, target_s / one)))
    for _ in range(max(2, min(max_reps, int(target_s / 2 / one)))):
        fn()
    _sync(ctx)
    times: list[float] = []
    if ctx.is_cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        _sync(ctx)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times), reps


def _speed_fn(ctx: WorkerCtx, impl: str, qkv: list[Any], causal: bool,
              backward: bool) -> tuple[Callable[[], Any], contextlib.AbstractContextManager[Any]]:
    """The call to time and the context it runs in.  Forward+backward uses autograd.grad against a fixed
    dout, so nothing accumulates into .grad between timed calls."""
    torch = ctx.torch
    if impl == FLASH_IMPL:
        def attn() -> Any:
            return ctx.fa_func(*qkv, causal=causal)
        cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    elif impl in (FA3_IMPL, FA4_IMPL):
        dense = _flash_dense(ctx, impl)

        def attn() -> Any:
            return dense(*qkv, causal=causal)
        cm = contextlib.nullcontext()
    else:
        sdpa = _sdpa_fn(ctx)

        def attn() -> Any:
            return sdpa(*qkv, causal)
        cm = _sdpa_backend(ctx, impl)
    if not backward:
        return attn, _stacked(torch.no_grad(), cm)
    dout = torch.randn_like(qkv[0])

    def fwd_bwd() -> Any:
        out = attn()
        torch.autograd.grad(out, qkv, dout)
        return out.detach()
    return fwd_bwd, cm


@contextlib.contextmanager
def _stacked(*cms: contextlib.AbstractContextManager[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for cm in cms:
            stack.enter_context(cm)
        yield


def run_speed(ctx: WorkerCtx, impl: str, dtype: str, headdim: int, seqlen: int, causal: bool,
              base: dict[str, Any]) -> list[dict[str, Any]]:
    torch = ctx.torch
    entry = dict(base)
    backward = base.get("direction") == "fwd_bwd"
    family = flash_family(impl)
    if family is not None and not _flash_ok(ctx, family):
        entry.update(status="skipped", reason=_not_importable(family))
        return [entry]
    if impl == "sdpa_math" and not math_measured(ctx.args.mode, dtype, headdim, seqlen, causal):
        entry.update(status="skipped", reason=f"math backend measured only up to seqlen {MATH_MAX_SEQLEN} "
                     "(plus the DESIGN §4 shape): too slow and O(seqlen²) memory beyond")
        return [entry]
    if time.time() > ctx.deadline - 2.0:
        entry.update(status="skipped", reason="overall time budget exhausted")
        return [entry]
    batch = base["batch"]
    dt = _dtype(torch, dtype)
    qkv: list[Any] = []
    try:
        qkv.extend(torch.randn(batch, seqlen, HEADS, headdim, device=ctx.device, dtype=dt,
                               requires_grad=backward) for _ in range(3))
        fn, cm = _speed_fn(ctx, impl, qkv, causal, backward)
        with cm:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    _sync(ctx)
                    if ctx.is_cuda:
                        torch.cuda.reset_peak_memory_stats(ctx.device)
                        before = torch.cuda.memory_allocated(ctx.device)
                    out = fn()
                    if ctx.inject_nan:
                        out = out * float("nan")
                    _sync(ctx)
                    if ctx.is_cuda:
                        peak = torch.cuda.max_memory_allocated(ctx.device) - before
                        entry["peak_mem_mib"] = round(peak / 2**20, 2)
                    finite = _finite(torch, out)
                    del out
                except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
                    if _is_oom(ctx, exc):
                        raise
                    if _may_be_unsupported(impl, exc):
                        entry.update(status="unsupported", reason=_unsupported_reason(exc, caught))
                        return [entry]
                    raise
            if not finite:
                entry.update(status="error", reason="NaN/Inf in output")
                return [entry]
            target = 0.03 if impl != "sdpa_math" else 0.06
            ms, reps = _time_calls(ctx, fn, target_s=target, min_reps=3 if impl == "sdpa_math" else 5, max_reps=50)
        flops = attention_flops(batch, seqlen, HEADS, headdim, causal) * (FWD_BWD_FLOPS_FACTOR if backward else 1)
        entry.update(status="ok", ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 3), repeats=reps)
        return [entry]
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
        if _is_oom(ctx, exc):
            entry.update(status="oom", reason=_clean_exc(exc))
        else:
            entry.update(status="error", reason=_short(exc))
        return [entry]
    finally:
        qkv.clear()
        _free(ctx, collect=entry.get("status") != "ok")


class _Unsupported(Exception):
    """This implementation (or this torch) cannot run the shape at all: recorded as ``unsupported``."""


def _error_problems(errs: dict[str, float | None], nonfinite: list[str], dtype: str) -> list[str]:
    """Why a checked output fails the thresholds (empty: it passes)."""
    thr = THRESHOLDS[dtype]
    out = ["NaN/Inf in " + ", ".join(nonfinite)] if nonfinite else []
    for name, e in errs.items():
        limit = thr["fwd"] if name == "fwd" else thr["bwd"]
        if e is not None and e > limit:
            out.append(f"{name} relative error {e:.3g} > {limit:g}")
    return out


def _judge_row(entry: dict[str, Any], problems: list[str]) -> None:
    """A checked GQA/decode row's status: ``fail`` with the problems as its reason, else ``ok``."""
    entry["status"] = "fail" if problems else "ok"
    if problems:
        entry["reason"] = "; ".join(problems)


def _row_failed(ctx: WorkerCtx, entry: dict[str, Any], exc: BaseException) -> None:
    """A GQA/decode row whose call raised: ``oom`` (with the cleaned message) or ``error``."""
    oom = _is_oom(ctx, exc)
    entry.update(status="oom" if oom else "error", reason=_clean_exc(exc) if oom else _short(exc))


def _gqa_call(ctx: WorkerCtx, impl: str) -> Callable[[Any, Any, Any, bool], Any]:
    """attention(q (b, s, h, d), k/v (b, s, hk, d), causal) → (b, s, h, d) with hk dividing h."""
    if impl == FLASH_IMPL:
        if ctx.flash[FLASH_IMPL].info.get("api") == "fa1-unpadded":
            raise _Unsupported("FlashAttention 1.x has no GQA/MQA (its k/v need as many heads as q)")
        fa = ctx.fa_func
        return lambda q, k, v, causal: fa(q, k, v, causal=causal)
    if impl in (FA3_IMPL, FA4_IMPL):
        return _flash_dense(ctx, impl)
    torch = ctx.torch
    F = torch.nn.functional

    def call(q: Any, k: Any, v: Any, causal: bool) -> Any:
        try:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=causal, enable_gqa=True)
        except TypeError as exc:  # enable_gqa arrived in torch 2.5
            raise _Unsupported(f"torch {torch.__version__} has no enable_gqa (needs torch >= 2.5): "
                               f"{_clean_exc(exc)}") from exc
        return out.transpose(1, 2)

    return call


def _gqa_check(ctx: WorkerCtx, call: Callable[..., Any], heads_k: int,
               backward: bool) -> tuple[dict[str, float | None], list[str]]:
    """Relative errors (fwd, and dq/dk/dv with ``backward``) at the correctness shape (batch 2 × 333 tokens) with
    the row's head ratio, against float32 math on K/V repeated per query-head group."""
    torch = ctx.torch
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(int(time.time_ns()) & 0x7FFFFFFF)
    dt = _dtype(torch, GQA_DTYPE)
    b, s, h, d = CORRECTNESS_BATCH, CORRECTNESS_SEQLEN, GQA_HEADS, GQA_HEADDIM
    _poison(ctx)
    q = torch.randn((b, s, h, d), generator=gen, device=ctx.device, dtype=dt)
    k, v = (torch.randn((b, s, heads_k, d), generator=gen, device=ctx.device, dtype=dt) for _ in range(2))
    dout = torch.randn((b, s, h, d), generator=gen, device=ctx.device, dtype=dt)
    for t in (q, k, v):
        t.requires_grad_(backward)
    out = call(q, k, v, True)
    if ctx.inject_nan:
        out = out * float("nan")
    got = {"fwd": out}
    if backward:
        got.update(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), strict=True))
    _sync(ctx)
    leaves = [t.detach().float().requires_grad_(backward) for t in (q, k, v)]
    groups = h // heads_k
    ref = _ref_attention(torch, leaves[0], leaves[1].repeat_interleave(groups, dim=2),
                         leaves[2].repeat_interleave(groups, dim=2), True)
    want = {"fwd": ref}
    if backward:
        want.update(zip(("dq", "dk", "dv"), torch.autograd.grad(ref, leaves, dout.float()), strict=True))
    nonfinite = [name for name, t in got.items() if not _finite(torch, t)]
    return {name: _rel_err(torch, got[name], want[name]) for name in got}, nonfinite


def run_gqa(ctx: WorkerCtx, impl: str, heads_k: int, direction: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One GQA/MQA row: its correctness at the small shape, then its speed at GQA_SEQLEN."""
    torch = ctx.torch
    entry = dict(base)
    thr = THRESHOLDS[GQA_DTYPE]
    backward = direction == "fwd_bwd"
    entry.update(threshold_fwd=thr["fwd"], threshold_bwd=thr["bwd"] if backward else None,
                 check_seqlen=CORRECTNESS_SEQLEN)
    family = flash_family(impl)
    if family is not None and not _flash_ok(ctx, family):
        entry.update(status="skipped", reason=_not_importable(family))
        return [entry]
    if time.time() > ctx.deadline - 2.0:
        entry.update(status="skipped", reason="overall time budget exhausted")
        return [entry]
    batch = base["batch"]
    dt = _dtype(torch, GQA_DTYPE)
    qkv: list[Any] = []
    cm = _sdpa_backend(ctx, impl) if family is None else contextlib.nullcontext()
    try:
        with cm, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call = _gqa_call(ctx, impl)
                errs, nonfinite = _gqa_check(ctx, call, heads_k, backward)
                _free(ctx)
                qkv.append(torch.randn(batch, GQA_SEQLEN, GQA_HEADS, GQA_HEADDIM, device=ctx.device, dtype=dt,
                                       requires_grad=backward))
                qkv.extend(torch.randn(batch, GQA_SEQLEN, heads_k, GQA_HEADDIM, device=ctx.device, dtype=dt,
                                       requires_grad=backward) for _ in range(2))
                if backward:
                    dout = torch.randn_like(qkv[0])

                    def fn() -> Any:
                        out = call(qkv[0], qkv[1], qkv[2], True)
                        torch.autograd.grad(out, qkv, dout)
                        return out.detach()
                else:
                    def fn() -> Any:
                        with torch.no_grad():
                            return call(qkv[0], qkv[1], qkv[2], True)
                _sync(ctx)
                if ctx.is_cuda:
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                    before = torch.cuda.memory_allocated(ctx.device)
                fn()
                _sync(ctx)
                if ctx.is_cuda:
                    entry["peak_mem_mib"] = round((torch.cuda.max_memory_allocated(ctx.device) - before) / 2**20, 2)
            except (_Unsupported, RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
                if _is_oom(ctx, exc):
                    raise
                if isinstance(exc, _Unsupported) or _may_be_unsupported(impl, exc):
                    entry.update(status="unsupported", reason=_unsupported_reason(exc, caught))
                    return [entry]
                raise
            ms, reps = _time_calls(ctx, fn, target_s=0.03, min_reps=5, max_reps=50)
        flops = attention_flops(batch, GQA_SEQLEN, GQA_HEADS, GQA_HEADDIM, True)
        flops *= FWD_BWD_FLOPS_FACTOR if backward else 1
        entry.update(fwd_rel_err=errs.get("fwd"), dq_rel_err=errs.get("dq"), dk_rel_err=errs.get("dk"),
                     dv_rel_err=errs.get("dv"), nonfinite=nonfinite, ms=round(ms, 4),
                     tflops=round(flops / (ms * 1e-3) / 1e12, 3), repeats=reps)
        _judge_row(entry, _error_problems(errs, nonfinite, GQA_DTYPE))
        return [entry]
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
        _row_failed(ctx, entry, exc)
        return [entry]
    finally:
        qkv.clear()
        _free(ctx, collect=entry.get("status") != "ok")


def _ref_decode(torch: Any, q: Any, k: Any, v: Any) -> Any:
    """float32 attention of q (b, 1, h, d) over a whole cache k/v (b, n, hk, d), query head i reading KV head
    i // (h / hk), without materialising the repeated cache (16k tokens × 32 heads would be GBs)."""
    b, _, h, d = q.shape
    hk = k.shape[2]
    qf = q.float().reshape(b, hk, h // hk, d)
    scores = torch.einsum("bkgd,bnkd->bkgn", qf, k.float()) * (1.0 / math.sqrt(d))
    out = torch.einsum("bkgn,bnkd->bkgd", scores.softmax(dim=-1), v.float())
    return out.reshape(b, 1, h, d)


def _decode_call(ctx: WorkerCtx, impl: str, kc: Any, vc: Any, table: Any, seqlens: Any) -> tuple[str, Callable[
        [Any], Any]]:
    """(the API named in the row, one decode step q (b, 1, h, d) → out).  ``table`` is the page table of a paged
    cache (None: dense).  A single new token attends to the whole cache: causal (bottom-right aligned in
    FlashAttention) and no mask (SDPA's is_causal would align top-left and see one key) are the same thing."""
    if flash_family(impl) is not None:
        loaded = ctx.flash[impl]
        if impl in (FLASH_IMPL, FA3_IMPL):
            fn = loaded.kvcache
            if fn is None:
                raise _Unsupported(f"{import_label(loaded.info)} {loaded.info.get('version') or ''} has no "
                                   "flash_attn_with_kvcache")
            paging = {"block_table": table} if impl == FLASH_IMPL else {"page_table": table}
            return "flash_attn_with_kvcache", lambda q: _first(fn(q, kc, vc, cache_seqlens=seqlens, causal=True,
                                                                  **paging))
        if table is None:
            dense = _flash_dense(ctx, impl)
            return "flash_attn_func", lambda q: dense(q, kc, vc, causal=True)
        varlen = loaded.varlen
        if varlen is None:
            raise _Unsupported("flash_attn.cute has no flash_attn_varlen_func (its paged-KV entry point)")
        return "flash_attn_varlen_func(page_table)", lambda q: _first(varlen(q, kc, vc, page_table=table,
                                                                              seqused_k=seqlens, causal=True))
    gqa = _gqa_call(ctx, impl)

    def sdpa(q: Any) -> Any:
        return gqa(q, kc, vc, False)

    return "scaled_dot_product_attention(enable_gqa=True)", sdpa


def run_decode(ctx: WorkerCtx, impl: str, cache_len: int, paged: bool,
               base: dict[str, Any]) -> list[dict[str, Any]]:
    """One decode row: a step's latency and KV-read bandwidth, and its error against float32 math."""
    torch = ctx.torch
    entry = dict(base)
    entry["threshold_fwd"] = THRESHOLDS[GQA_DTYPE]["fwd"]
    family = flash_family(impl)
    if family is not None and not _flash_ok(ctx, family):
        entry.update(status="skipped", reason=_not_importable(family))
        return [entry]
    if time.time() > ctx.deadline - 2.0:
        entry.update(status="skipped", reason="overall time budget exhausted")
        return [entry]
    b, h, hk, d = DECODE_BATCH, DECODE_HEADS, DECODE_KV_HEADS, GQA_HEADDIM
    dt = _dtype(torch, GQA_DTYPE)
    cm = _sdpa_backend(ctx, impl) if family is None else contextlib.nullcontext()
    try:
        gen = torch.Generator(device=ctx.device)
        gen.manual_seed(int(time.time_ns()) & 0x7FFFFFFF)
        _poison(ctx)
        q = torch.randn((b, 1, h, d), generator=gen, device=ctx.device, dtype=dt)
        if paged:
            per_seq = cache_len // DECODE_PAGE_SIZE
            kc, vc = (torch.randn((b * per_seq, DECODE_PAGE_SIZE, hk, d), generator=gen, device=ctx.device,
                                  dtype=dt) for _ in range(2))
            # pages scattered as an allocator leaves them, not laid out in sequence order
            table = torch.randperm(b * per_seq, generator=gen, device=ctx.device).reshape(b, per_seq).to(torch.int32)
            k_seq, v_seq = (c[table.long()].reshape(b, cache_len, hk, d) for c in (kc, vc))
        else:
            kc, vc = (torch.randn((b, cache_len, hk, d), generator=gen, device=ctx.device, dtype=dt)
                      for _ in range(2))
            table, k_seq, v_seq = None, kc, vc
        seqlens = torch.full((b,), cache_len, dtype=torch.int32, device=ctx.device)
        ref = _ref_decode(torch, q, k_seq, v_seq)
        del k_seq, v_seq  # the gathered copy of a paged cache: as big as the cache
        with cm, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                api, step = _decode_call(ctx, impl, kc, vc, table, seqlens)
                entry["api"] = api
                out = step(q)
                if ctx.inject_nan:
                    out = out * float("nan")
                _sync(ctx)
            except (_Unsupported, RuntimeError, AssertionError, ValueError, NotImplementedError, TypeError) as exc:
                if _is_oom(ctx, exc):
                    raise
                # a paged call an FA3/FA4 version does not take (no such keyword, a page size it asserts on) is a
                # missing feature of that version, not a broken install
                feature = paged and family in (FA3_IMPL, FA4_IMPL) and isinstance(exc, TypeError | AssertionError)
                if isinstance(exc, _Unsupported) or feature or _may_be_unsupported(impl, exc):
                    entry.update(status="unsupported", reason=_unsupported_reason(exc, caught))
                    return [entry]
                if isinstance(exc, TypeError):
                    raise RuntimeError(_short(exc)) from exc
                raise
            errs = {"fwd": _rel_err(torch, out, ref)}
            nonfinite = [] if _finite(torch, out) else ["fwd"]
            del out
            ms, reps = _time_calls(ctx, lambda: step(q), target_s=0.05, min_reps=20, max_reps=400)
        kv_bytes = decode_kv_bytes(b, cache_len, hk, d, 2)
        entry.update(fwd_rel_err=errs["fwd"], nonfinite=nonfinite, latency_us=round(ms * 1000.0, 2),
                     kv_gb_per_s=round(kv_bytes / (ms * 1e-3) / 1e9, 1), repeats=reps)
        _judge_row(entry, _error_problems(errs, nonfinite, GQA_DTYPE))
        return [entry]
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
        _row_failed(ctx, entry, exc)
        return [entry]
    finally:
        _free(ctx, collect=entry.get("status") != "ok")


def _load_e2e_gen() -> Any:
    """agent/verify/e2e_gen.py, the file next to this one, loaded by path: standalone like bench.py, and the
    target Python has no fleet package to import it from."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e_gen.py")
    spec = importlib.util.spec_from_file_location("fleet_verify_e2e_gen", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the end-to-end check {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def e2e_entry(base: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """An e2e row from e2e_gen.measure's dict.  ``tokens_per_s`` (the one figure older readers show) is the
    decode rate, the phase the new tokens come from; ``seconds`` is the decode time of ``generated_tokens``."""
    entry = {**base, "status": measured.get("status", "error"), "dtype": "bfloat16"}
    for key in ("reason", "attn_implementation_used", "weights_mib", "prefill_tokens_per_s", "ttft_ms",
                "decode_tokens_per_s", "decode_ms_per_step", "prefill_peak_mem_mib"):
        if measured.get(key) is not None:
            entry[key] = measured[key]
    if measured.get("generate_peak_mem_mib") is not None:
        entry["peak_mem_mib"] = measured["generate_peak_mem_mib"]
    decode = measured.get("decode_tokens_per_s")
    if entry["status"] == "ok" and decode:
        produced = int(base["batch"]) * int(base["new_tokens"])
        entry.update(tokens_per_s=decode, generated_tokens=produced, seconds=round(produced / decode, 4))
    return entry


def run_e2e(ctx: WorkerCtx, impl: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One attn_implementation through e2e_gen.measure: prefill tokens/s, TTFT, decode tokens/s, peak memory."""
    entry = dict(base)
    if not ctx.is_cuda:
        return _fixed(base, "skipped", "the end-to-end check needs a CUDA device")
    if not _native_bf16(ctx):
        return _fixed(base, "skipped", "the end-to-end check runs bf16: this GPU has no bf16 tensor cores")
    needs = E2E_NEEDS.get(impl)
    if needs is not None and not _flash_ok(ctx, needs):
        return _fixed(base, "unsupported", f"{impl} needs {_not_importable(needs)}")
    try:
        import transformers  # type: ignore[import-not-found]
    except Exception as exc:
        return _fixed(base, "skipped", f"transformers not importable: {_clean_exc(exc)}")
    entry["transformers"] = getattr(transformers, "__version__", None)
    try:
        gen = _load_e2e_gen()
    except Exception as exc:
        entry.update(status="error", reason=f"cannot load e2e_gen.py: {_short(exc, 1000)}")
        return [entry]
    registered = gen.registered_attention(transformers)
    if impl.startswith("flash_attention") and registered is not None and impl not in registered:
        entry.update(status="unsupported", reason=f"transformers {entry['transformers']} does not register "
                     f"attn_implementation={impl!r} (it has: {', '.join(registered)})")
        return [entry]
    run = gen.Run(argparse.Namespace(model=ctx.args.model, config=E2E_CONFIG, batch=base["batch"],
                                     prompt=base["prompt_len"], new_tokens=base["new_tokens"], device=str(ctx.device),
                                     budget_s=E2E_TIMEOUT_S))
    try:
        return [e2e_entry(entry, gen.measure(run, impl))]
    finally:
        _free(ctx, collect=True)


def _native_bf16(ctx: WorkerCtx) -> bool:
    """bf16 tensor cores (compute capability ≥ 8.0); torch's is_bf16_supported() also counts emulation."""
    if not ctx.is_cuda:
        return True
    cap = _safe(lambda: ctx.torch.cuda.get_device_capability(ctx.device))
    return bool(cap and cap[0] >= 8)


def _fixed(base: dict[str, Any], status: str, reason: str) -> list[dict[str, Any]]:
    return [{**base, "status": status, "reason": reason}]


def build_tasks(ctx: WorkerCtx) -> list[Task]:
    args = ctx.args
    per = float(args.timeout_per_shape)
    tasks: list[Task] = []
    for impl, dtype, hd, causal in correctness_cases(args.mode, ctx.reported):
        family = flash_family(impl)
        if family is not None and not _flash_ok(ctx, family):
            continue  # one "skipped" summary below instead of a row per case
        batch, seqlen = (1, sum(VARLEN_SEQLENS)) if impl == "flash_attn_varlen" else (CORRECTNESS_BATCH,
                                                                                        CORRECTNESS_SEQLEN)
        base = {"impl": impl, "dtype": dtype, "headdim": hd, "causal": causal, "batch": batch, "seqlen": seqlen,
                "heads": CORRECTNESS_HEADS}
        if impl == "flash_attn_varlen":
            base["varlen_seqlens"] = list(VARLEN_SEQLENS)
        tasks.append(Task(f"correctness/{impl}/{dtype}/hd{hd}/{'causal' if causal else 'full'}", "correctness",
                          per + JIT_ALLOWANCE_S.get(family or "", 0.0), base,
                          functools.partial(run_correctness, ctx, impl, dtype, hd, causal, base)))
    for family in ctx.reported:
        if not _flash_ok(ctx, family):
            base = {"impl": family, "dtype": None, "headdim": None, "causal": None, "batch": None, "seqlen": None,
                    "heads": None}
            tasks.append(Task(f"correctness/{family}/skipped", "correctness", per, base,
                              functools.partial(_fixed, base, "skipped", _not_importable(family))))
    tokens = int(args.tokens)
    bf16 = _native_bf16(ctx)
    impls = [i for i in SPEED_IMPLS if flash_family(i) is None or i in ctx.reported]
    for dtype, hd, seqlen, causal in speed_shapes(args.mode, tuple(args.seqlens), bf16):
        batch = max(1, tokens // seqlen)
        for direction in ("fwd", "fwd_bwd"):
            for impl in impls:
                if direction == "fwd_bwd" and (impl not in FWD_BWD_IMPLS or (not _flash_ok(ctx, impl)
                                               and flash_family(impl) is not None)):
                    continue  # an FA that is not importable has its skipped rows once, under fwd
                base = {"impl": impl, "dtype": dtype, "headdim": hd, "seqlen": seqlen, "batch": batch,
                        "heads": HEADS, "causal": causal, "direction": direction}
                # forward ids stay as they were (fault-injection substrings such as speed/sdpa_flash/bfloat16 in
                # scripts and tests name the forward task alone); fwd_bwd ones put the direction before the dtype
                kind = impl if direction == "fwd" else f"{impl}/fwd_bwd"
                tasks.append(Task(f"speed/{kind}/{dtype}/hd{hd}/s{seqlen}/{'causal' if causal else 'full'}",
                                  "speed", per + JIT_ALLOWANCE_S.get(impl, 0.0), base,
                                  functools.partial(run_speed, ctx, impl, dtype, hd, seqlen, causal, base)))
    # GQA/MQA and decode rows, for the FlashAttentions that import (the skipped summary above says why the
    # others do not) and every SDPA backend; bf16 only, so GPUs without bf16 tensor cores have none
    usable = [i for i in GQA_IMPLS if flash_family(i) is None or (i in ctx.reported and _flash_ok(ctx, i))]
    for impl, hk, direction in gqa_cases(args.mode) if bf16 else []:
        if impl not in usable:
            continue
        base = {"impl": impl, "dtype": GQA_DTYPE, "headdim": GQA_HEADDIM, "seqlen": GQA_SEQLEN,
                "batch": max(1, tokens // GQA_SEQLEN), "heads": GQA_HEADS, "heads_k": hk, "causal": True,
                "direction": direction}
        tasks.append(Task(f"gqa/{impl}/{direction}/h{GQA_HEADS}k{hk}/s{GQA_SEQLEN}", "gqa",
                          per + JIT_ALLOWANCE_S.get(impl, 0.0), base,
                          functools.partial(run_gqa, ctx, impl, hk, direction, base)))
    for impl, cache_len, paged in decode_cases(args.mode) if bf16 else []:
        if impl not in (*usable, "sdpa_math"):
            continue
        base = {"impl": impl, "dtype": GQA_DTYPE, "headdim": GQA_HEADDIM, "batch": DECODE_BATCH,
                "heads": DECODE_HEADS, "heads_k": DECODE_KV_HEADS, "seqlen_q": 1, "cache_len": cache_len,
                "paged": paged, "page_size": DECODE_PAGE_SIZE if paged else None,
                "kv_mib": round(decode_kv_bytes(DECODE_BATCH, cache_len, DECODE_KV_HEADS, GQA_HEADDIM) / 2**20, 1)}
        tasks.append(Task(f"decode/{impl}/{'paged' if paged else 'dense'}/kv{cache_len}", "decode",
                          per + JIT_ALLOWANCE_S.get(impl, 0.0), base,
                          functools.partial(run_decode, ctx, impl, cache_len, paged, base)))
    model_desc = args.model or f"{E2E_CONFIG} dimensions (random weights)"
    for impl in E2E_IMPLS:
        base = {"impl": impl, "model": model_desc, "random_weights": not args.model, "batch": args.e2e_batch,
                "prompt_len": args.e2e_prompt, "new_tokens": args.e2e_new_tokens}
        if args.mode == "quick" or args.skip_e2e:
            why = "quick mode skips the end-to-end check" if args.mode == "quick" else "--skip-e2e"
            tasks.append(Task(f"e2e/{impl}", "e2e", per, base, functools.partial(_fixed, base, "skipped", why)))
        else:
            tasks.append(Task(f"e2e/{impl}", "e2e", max(per, E2E_TIMEOUT_S + (60.0 if args.model else 0.0)), base,
                              functools.partial(run_e2e, ctx, impl, base)))
    return tasks


def _driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            text = fh.read()
        for tok in text.split():
            parts = tok.split(".")
            if len(parts) >= 2 and all(p.isdigit() for p in parts):
                return tok
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False)
        line = out.stdout.strip().splitlines()
        return line[0].strip() if out.returncode == 0 and line else None
    except (OSError, subprocess.SubprocessError):
        return None


def _set_pdeathsig() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def worker_main(args: argparse.Namespace) -> int:
    _set_pdeathsig()
    # The protocol owns the original stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(ev: str, **data: Any) -> None:
        proto.write(json.dumps({"ev": ev, **data}, allow_nan=True, default=str) + "\n")
        proto.flush()

    meta: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    try:
        import torch
    except BaseException as exc:
        meta.update(status=STATUS_NO_TORCH, reason=f"torch is not importable in {sys.executable}: "
                    + "".join(traceback.format_exception_only(type(exc), exc)).strip())
        emit("meta", **meta)
        emit("done")
        return 0
    dev_text = args.device
    meta["torch"] = {"version": torch.__version__, "cuda": getattr(torch.version, "cuda", None),
                     "cudnn": _safe(lambda: torch.backends.cudnn.version()),
                     "cxx11abi": _safe(lambda: bool(torch._C._GLIBCXX_USE_CXX11_ABI))}
    is_cuda = dev_text.startswith("cuda")
    if is_cuda:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = _safe(lambda: torch.cuda.device_count()) or 0
        if not torch.cuda.is_available() or count == 0:
            why = "torch.cuda.is_available() is False"
            if torch.version.cuda is None:
                why += f" (torch {torch.__version__} is a CPU-only build)"
            else:
                why += f" (torch built for CUDA {torch.version.cuda}; {count} device(s) visible"
                why += f", CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ")"
                drv = _driver_version()
                why += f"; NVIDIA driver {drv}" if drv else "; no NVIDIA driver found"
            meta.update(status=STATUS_NO_GPU, reason=why)
            emit("meta", **meta)
            emit("done")
            return 0
        index = torch.device(dev_text).index or 0
        if index >= count:
            meta.update(status=STATUS_NO_GPU, reason=f"{dev_text} requested but only {count} GPU(s) visible")
            emit("meta", **meta)
            emit("done")
            return 0
    device = torch.device(dev_text)
    if is_cuda:
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        meta["device"] = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                          "memory_mib": int(props.total_memory // 2**20), "index": device.index or 0,
                          "driver": _driver_version(), "multiprocessors": getattr(props, "multi_processor_count",
                                                                                  None)}
    else:
        meta["device"] = {"name": "cpu", "compute_capability": None, "memory_mib": None, "index": None,
                          "driver": None, "note": "CPU debug run: numbers are not meaningful"}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    found = detect_flash()
    verified = choose_verified(args.expect, found)
    reported = reported_impls(verified, found)
    fa_info = found[verified or FLASH_IMPL].info
    meta["flash_attn"] = fa_info
    meta["flash_attn_implementations"] = [found[i].info for i in reported]
    legacy = found[FLASH_IMPL]
    ctx = WorkerCtx(args=args, torch=torch, device=device, is_cuda=is_cuda, fa=fa_info, fa_func=legacy.dense,
                    fa_varlen=legacy.varlen, deadline=float(args.deadline or math.inf), flash=found,
                    reported=reported)
    tasks = build_tasks(ctx)
    meta["status"] = "running"
    emit("meta", **meta)
    emit("plan", tasks=[{"id": t.id, "kind": t.kind, "base": t.base} for t in tasks])
    injects = [tuple(spec.split(":", 1)) for spec in args.inject or [] if ":" in spec]
    for what, value in injects:
        if what == "memfrac" and is_cuda:  # makes big shapes hit a real CUDA OOM
            torch.cuda.set_per_process_memory_fraction(float(value), device)
    for index, task in enumerate(tasks):
        if index < args.skip:
            continue
        emit("begin", index=index, id=task.id, timeout=task.timeout)
        ctx.inject_nan = any(w == "nan" and v in task.id for w, v in injects)
        if any(w == "hang" and v in task.id for w, v in injects):
            time.sleep(10**6)
        if any(w == "crash" and v in task.id for w, v in injects):
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            entries = task.run()
        except Exception as exc:  # a bug in one task must not lose the others
            entries = [{**task.base, "status": "error", "reason": _short(exc)}]
        for e in entries:
            emit("entry", kind=task.kind, data=e)
        emit("end", index=index)
    emit("done")
    return 0


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


# ---------------------------------------------------------------------------
# Supervisor (stdlib only).
# ---------------------------------------------------------------------------


class Supervisor:
    def __init__(self, args: argparse.Namespace, script: str) -> None:
        self.args = args
        self.script = script
        self.started = time.time()
        self.started_iso = now_iso()
        self.deadline = self.started + float(args.timeout)
        self.meta: dict[str, Any] = {}
        self.plan: list[dict[str, Any]] = []
        self.results: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        self.notes: list[str] = []
        self.restarts = 0
        self.overall_timeout = False
        self.stderr_tail = ""
        self.proc: subprocess.Popen[str] | None = None

    def worker_cmd(self, skip: int) -> list[str]:
        a = self.args
        cmd = [sys.executable, self.script, "--worker", "--mode", a.mode, "--device", a.device, "--expect", a.expect,
               "--timeout-per-shape", str(a.timeout_per_shape), "--skip", str(skip), "--deadline",
               str(self.deadline), "--tokens", str(a.tokens), "--seqlens", *map(str, a.seqlens),
               "--e2e-batch", str(a.e2e_batch), "--e2e-prompt", str(a.e2e_prompt), "--e2e-new-tokens",
               str(a.e2e_new_tokens)]
        if a.model:
            cmd += ["--model", a.model]
        if a.skip_e2e:
            cmd.append("--skip-e2e")
        for spec in a.inject or []:
            cmd += ["--inject", spec]
        return cmd

    def kill_worker(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def run(self) -> dict[str, Any]:
        skip = 0
        while True:
            next_skip = self.run_worker(skip)
            if next_skip is None:
                break
            self.restarts += 1
            if self.restarts > MAX_RESTARTS:
                self.notes.append(f"gave up after {MAX_RESTARTS} worker restarts")
                break
            skip = next_skip
        return self.assemble()

    def run_worker(self, skip: int) -> int | None:
        """Run one worker from task ``skip`` on; the index to restart from, or None when finished."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        # FA4 compiles its kernels at first call; its on-disk cache lets a worker restarted after a timed-out
        # task (or the next run) reuse them instead of compiling again
        env.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
        try:
            self.proc = proc = subprocess.Popen(self.worker_cmd(skip), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True, env=env)
        except OSError as exc:
            self.notes.append(f"could not start worker: {exc}")
            return None
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        stderr_chunks: list[str] = []

        def read_out(stream: IO[str]) -> None:
            for line in stream:
                line = line.strip()
                if not line:
                    continue
                try:
                    events.put(json.loads(line))
                except json.JSONDecodeError:
                    stderr_chunks.append("[stdout] " + line + "\n")
            events.put(None)

        def read_err(stream: IO[str]) -> None:
            for line in stream:
                stderr_chunks.append(line)
                if len(stderr_chunks) > 400:
                    del stderr_chunks[:200]

        assert proc.stdout is not None and proc.stderr is not None
        threads = [threading.Thread(target=read_out, args=(proc.stdout,), daemon=True),
                   threading.Thread(target=read_err, args=(proc.stderr,), daemon=True)]
        for t in threads:
            t.start()
        current: tuple[int, float, str, float] | None = None  # (index, task deadline, id, timeout)
        done = False
        restart_at: int | None = None
        while True:
            now = time.time()
            limits = [self.deadline]
            if current is not None:
                limits.append(current[1])
            wait = max(0.05, min(limits) - now)
            try:
                ev = events.get(timeout=min(wait, 1.0))
            except queue.Empty:
                now = time.time()
                if now >= self.deadline:
                    self.kill_worker()
                    self.overall_timeout = True
                    if current is not None:
                        self.record_placeholder(current[0], "timeout", "overall timeout reached during this task")
                    break
                if current is not None and now >= current[1]:
                    self.kill_worker()
                    self.record_placeholder(current[0], "timeout",
                                            f"no result within the per-task timeout ({current[3]:g} s); "
                                            "worker killed (GPU context released) and restarted after it")
                    restart_at = current[0] + 1
                    break
                continue
            if ev is None:  # worker stdout closed: it exited
                break
            kind = ev.get("ev")
            if kind == "meta":
                ev.pop("ev")
                self.meta = ev
            elif kind == "plan":
                self.plan = list(ev.get("tasks") or [])
            elif kind == "begin":
                current = (int(ev["index"]), time.time() + float(ev["timeout"]), str(ev.get("id")),
                           float(ev["timeout"]))
            elif kind == "entry":
                idx = current[0] if current is not None else -1
                self.results.setdefault(idx, []).append((str(ev.get("kind")), dict(ev.get("data") or {})))
            elif kind == "end":
                current = None
            elif kind == "done":
                done = True
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            self.kill_worker()
        for t in threads:
            t.join(timeout=2)
        self.stderr_tail = ("".join(stderr_chunks))[-8000:]
        if self.overall_timeout or restart_at is not None:
            return restart_at if not self.overall_timeout else None
        if done:
            return None
        # The worker died without saying "done": a crash (segfault, CUDA abort, OOM killer).
        rc = proc.returncode
        how = f"signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        if current is not None:
            self.record_placeholder(current[0], "error", f"worker crashed ({how}) during this task; "
                                    f"stderr: {self.stderr_tail[-600:].strip()}")
            return current[0] + 1
        self.notes.append(f"worker exited ({how}) outside any task")
        return None

    def record_placeholder(self, index: int, status: str, reason: str) -> None:
        if 0 <= index < len(self.plan):
            task = self.plan[index]
            self.results.setdefault(index, []).append((task["kind"], {**task["base"], "status": status,
                                                                      "reason": reason}))

    def assemble(self) -> dict[str, Any]:
        finished = time.time()
        meta = self.meta
        correctness: list[dict[str, Any]] = []
        speed: list[dict[str, Any]] = []
        e2e: list[dict[str, Any]] = []
        gqa: list[dict[str, Any]] = []
        decode: list[dict[str, Any]] = []
        buckets = {"correctness": correctness, "speed": speed, "e2e": e2e, "gqa": gqa, "decode": decode}
        for index, task in enumerate(self.plan):
            entries = self.results.get(index)
            if not entries:
                why = "overall timeout reached before this task ran" if self.overall_timeout else \
                    "not run (worker stopped early)"
                entries = [(task["kind"], {**task["base"], "status": "skipped" if not self.overall_timeout else
                                           "timeout", "reason": why})]
            for kind, data in entries:
                buckets.get(kind, e2e).append(data)
        device = meta.get("device") or {}
        torch_info = meta.get("torch") or {}
        result: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "simulated": False,
            "mode": self.args.mode,
            "expect": self.args.expect,
            "hostname": socket.gethostname(),
            "started_at": self.started_iso,
            "finished_at": now_iso(),
            "duration_s": round(finished - self.started, 3),
            "device": {
                "name": device.get("name"),
                "compute_capability": device.get("compute_capability"),
                "memory_mib": device.get("memory_mib"),
                "index": device.get("index"),
                "driver": device.get("driver"),
                "torch": torch_info.get("version"),
                "cuda": torch_info.get("cuda"),
                "cudnn": torch_info.get("cudnn"),
                "python": meta.get("python") or platform.python_version(),
                "executable": meta.get("executable"),
            },
            "flash_attn": meta.get("flash_attn") or {"import_ok": False, "version": None,
                                                     "error": "not checked", "error_type": None},
            "flash_attn_implementations": meta.get("flash_attn_implementations") or [],
            "config": {"tokens": self.args.tokens, "heads": HEADS, "seqlens": list(self.args.seqlens),
                       "timeout_per_shape_s": self.args.timeout_per_shape, "timeout_s": self.args.timeout,
                       "thresholds": THRESHOLDS, "model": self.args.model,
                       "flops_formula": "4*batch*seqlen^2*heads*headdim, /2 if causal (forward); "
                                        f"x{FWD_BWD_FLOPS_FACTOR:g} for fwd_bwd (heads = query heads)",
                       "decode_bandwidth": "K and V bytes of the cache read once per step / step latency",
                       "e2e_config": None if self.args.model else E2E_CONFIG},
            "correctness": correctness,
            "speed": speed,
            "gqa": gqa,
            "decode": decode,
            "e2e": e2e,
            "restarts": self.restarts,
            "notes": self.notes,
        }
        status, reasons, warns = verdict(result, meta, self.overall_timeout)
        result.update(status=status, passed=status == STATUS_PASS, reasons=reasons, warnings=warns)
        if status in (STATUS_ERROR, STATUS_TIMEOUT) or self.restarts:
            result["worker_stderr_tail"] = self.stderr_tail
        return result


def verdict(result: dict[str, Any], meta: dict[str, Any], overall_timeout: bool) -> tuple[str, list[str], list[str]]:
    """Pass/fail of one run (fleet/verification.py re-derives the same rules when parsing)."""
    reasons: list[str] = []
    warns: list[str] = []
    pre = meta.get("status")
    if pre in (STATUS_NO_TORCH, STATUS_NO_GPU):
        return pre, [str(meta.get("reason"))], warns
    if not meta:
        return STATUS_ERROR, ["the benchmark worker produced no output; see worker_stderr_tail"], warns
    expect_fa = result["expect"] != "sdpa"
    fa = result["flash_attn"]
    target = fa.get("impl") or FLASH_IMPL
    if not fa.get("import_ok"):
        (reasons if expect_fa else warns).append(f"{import_label(fa)} import failed: {fa.get('error')}")
    for other in result.get("flash_attn_implementations") or []:
        if other.get("impl") != target and not other.get("import_ok"):
            warns.append(f"{import_label(other)} import failed: {other.get('error')}")

    def is_fa(impl: str) -> bool:
        return flash_family(impl) == target

    for e in result["correctness"]:
        crit = is_fa(e["impl"]) if expect_fa else e["impl"] == "sdpa_flash"
        if e["status"] in ("fail", "error", "timeout"):
            msg = (f"correctness {e['impl']} {e['dtype']} hd{e['headdim']} "
                   f"{'causal' if e['causal'] else 'non-causal'}: {e['status']}: {e.get('reason')}")
            (reasons if crit else warns).append(msg)
    ok_speed = 0
    for e in result["speed"]:
        crit = is_fa(e["impl"]) == expect_fa if expect_fa else e["impl"] in ("sdpa_flash", "sdpa_efficient")
        if e["status"] == "ok":
            ok_speed += crit
        elif e["status"] in ("error", "timeout"):
            msg = (f"speed {e['impl']} {e['dtype']} hd{e['headdim']} s{e['seqlen']} "
                   f"{'causal' if e['causal'] else 'non-causal'}: {e['status']}: {e.get('reason')}")
            (reasons if crit else warns).append(msg)
    if (fa.get("import_ok") or not expect_fa) and ok_speed == 0:
            reasons.append("no speed measurement of the expected implementation succeeded")
    for e in (*result.get("gqa", ()), *result.get("decode", ())):
        if e["status"] in ("fail", "error", "timeout", "oom"):
            warns.append(f"{shape_label(e)}: {e['status']}: {e.get('reason')}")
    for e in result["e2e"]:
        if e["status"] in ("error", "timeout", "oom"):
            warns.append(f"e2e {e['impl']}: {e['status']}: {e.get('reason')}")
    if overall_timeout:
        return STATUS_TIMEOUT, [*reasons, f"overall timeout ({result['config']['timeout_s']} s) reached"], warns
    return (STATUS_FAIL if reasons else STATUS_PASS), reasons, warns


def shape_label(e: dict[str, Any]) -> str:
    """"gqa fa4 h32/k8 s4096 fwd_bwd", "decode flash_attn paged kv16384": a GQA or decode row in messages."""
    if "cache_len" in e:
        return f"decode {e['impl']} {'paged' if e.get('paged') else 'dense'} kv{e['cache_len']}"
    return f"gqa {e['impl']} h{e['heads']}/k{e['heads_k']} s{e['seqlen']} {e.get('direction') or 'fwd'}"


def import_label(info: dict[str, Any]) -> str:
    """How an implementation is named in messages: "flash_attn" as always for FA2/FA1, else
    "fa4 (flash_attn.cute)"."""
    impl = info.get("impl") or FLASH_IMPL
    return impl if impl == FLASH_IMPL else f"{impl} ({info.get('module') or FLASH_SOURCES[impl][0]})"


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def describe_flash(info: dict[str, Any]) -> str:
    """"fa4 4.0.0b36 (flash_attn.cute, dist flash-attn-4)" or why it did not import."""
    name = info.get("implementation") or info.get("impl") or ("fa1" if info.get("api") == "fa1-unpadded" else "fa2")
    where = ", ".join(x for x in (info.get("module"), f"dist {info['dist']}" if info.get("dist") else None) if x)
    text = f"{name} {info.get('version') or '?'}" + (f" ({where})" if where else "")
    return text if info.get("import_ok") else f"{text}: IMPORT FAILED: {info.get('error')}"


def summarize(r: dict[str, Any]) -> str:
    """A short human table of one result."""
    dev = r.get("device") or {}
    fa = r.get("flash_attn") or {}
    lines = [
        f"status: {r.get('status')}  mode: {r.get('mode')}  duration: {r.get('duration_s')} s"
        f"  simulated: {r.get('simulated')}",
        f"device: {dev.get('name')} cc {dev.get('compute_capability')}  driver {dev.get('driver')}  "
        f"torch {dev.get('torch')} (CUDA {dev.get('cuda')})",
        f"verified: {'sdpa' if r.get('expect') == 'sdpa' else describe_flash(fa)}",
    ]
    for other in r.get("flash_attn_implementations") or []:
        if other.get("impl") != fa.get("impl"):
            lines.append(f"also measured: {describe_flash(other)}")
    lines += [f"  reason: {x}" for x in r.get("reasons") or []]
    lines += [f"  warning: {x}" for x in (r.get("warnings") or [])[:8]]
    if len(r.get("warnings") or []) > 8:
        lines.append(f"  ... {len(r['warnings']) - 8} more warnings")
    lines.append("correctness (rel. error fwd / dq / dk / dv):")
    for e in r.get("correctness") or []:
        lines.append(f"  {e['impl']:<18} {_fmt(e.get('dtype')):<9} hd{_fmt(e.get('headdim')):<4} "
                     f"{'causal' if e.get('causal') else 'full  '} {e['status']:<11} "
                     + " / ".join(_fmt(e.get(k), ".2e") for k in ("fwd_rel_err", "dq_rel_err", "dk_rel_err",
                                                                  "dv_rel_err"))
                     + (f"  {e.get('reason', '')[:90]}" if e["status"] not in ("ok",) else ""))
    impls = []
    for e in r.get("speed") or []:
        if e["impl"] not in impls:
            impls.append(e["impl"])
    lines.append("speed, TFLOP/s (peak MiB):  dtype hd seqlen causal dir | " + " | ".join(impls))
    rows: dict[tuple[Any, ...], dict[str, str]] = {}
    for e in r.get("speed") or []:
        key = (e["dtype"], e["headdim"], e["seqlen"], e["causal"], e.get("direction") or "fwd")
        cell = (f"{e['tflops']:.0f} ({_fmt(e.get('peak_mem_mib'), '.0f')})" if e["status"] == "ok" else e["status"])
        rows.setdefault(key, {})[e["impl"]] = cell
    for key, cells in sorted(rows.items(), key=lambda kv: kv[0][4] != "fwd"):
        d, h, s, c, direction = key
        lines.append(f"  {d:<9} {h:>3} {s:>5} {'C' if c else 'N'} {direction:<7} | "
                     + " | ".join(cells.get(i, "") for i in impls))
    for e in r.get("gqa") or []:
        lines.append(f"{shape_label(e):<36} {e['status']:<11} {_fmt(e.get('tflops'), '.0f'):>5} TFLOP/s  "
                     f"err {_fmt(e.get('fwd_rel_err'), '.1e')}  {(e.get('reason') or '')[:90]}")
    for e in r.get("decode") or []:
        lines.append(f"{shape_label(e):<36} {e['status']:<11} {_fmt(e.get('latency_us'), '.1f'):>7} us "
                     f"{_fmt(e.get('kv_gb_per_s'), '.0f'):>5} GB/s  err {_fmt(e.get('fwd_rel_err'), '.1e')}  "
                     f"{(e.get('reason') or '')[:90]}")
    for e in r.get("e2e") or []:
        lines.append(f"e2e {e['impl']:<18} {e['status']:<11} prefill {_fmt(e.get('prefill_tokens_per_s'))} tok/s  "
                     f"ttft {_fmt(e.get('ttft_ms'))} ms  decode {_fmt(e.get('decode_tokens_per_s'))} tok/s  "
                     f"peak {_fmt(e.get('peak_mem_mib'))} MiB  {e.get('model')}  {(e.get('reason') or '')[:100]}")
    return "\n".join(lines) + "\n"


def write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, allow_nan=False, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    return str(obj)


def _sanitize(obj: Any) -> Any:
    """Non-finite floats → None (strict JSON); the entries keep a ``nonfinite`` flag."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitize(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fleetctl FlashAttention verification benchmark")
    p.add_argument("--mode", choices=("quick", "full"), default="quick")
    p.add_argument("--out", help="where to write the JSON result (default: stdout)")
    p.add_argument("--model", help="local causal LM directory for the end-to-end check (no network is used)")
    p.add_argument("--timeout-per-shape", type=float, default=DEFAULT_TIMEOUT_PER_SHAPE)
    p.add_argument("--timeout", type=float, default=None, help="overall seconds (default: quick 90, full 300)")
    p.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a debug run of the script itself")
    p.add_argument("--expect", choices=EXPECTS, default=EXPECT_FLASH,
                   help="what the node is meant to run: flash_attn (FA2/FA1, else the FlashAttention installed), "
                        "fa3, fa4, or sdpa for nodes planned without FlashAttention")
    p.add_argument("--skip-e2e", action="store_true")
    # for tests and debugging on small machines
    p.add_argument("--tokens", type=int, default=TOTAL_TOKENS, help=argparse.SUPPRESS)
    p.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS), help=argparse.SUPPRESS)
    p.add_argument("--e2e-batch", type=int, default=E2E_BATCH, help=argparse.SUPPRESS)
    p.add_argument("--e2e-prompt", type=int, default=E2E_PROMPT, help=argparse.SUPPRESS)
    p.add_argument("--e2e-new-tokens", type=int, default=E2E_NEW_TOKENS, help=argparse.SUPPRESS)
    # fault injection for tests: hang:TASKSUBSTR, crash:TASKSUBSTR, nan:TASKSUBSTR, memfrac:FRACTION
    p.add_argument("--inject", action="append", help=argparse.SUPPRESS)
    p.add_argument("--summarize", metavar="RESULT_JSON", help="print a short table of a result file and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT[args.mode]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        with open(args.summarize, encoding="utf-8") as fh:
            sys.stdout.write(summarize(json.load(fh)))
        return 0
    if args.worker:
        return worker_main(args)
    sup = Supervisor(args, os.path.abspath(__file__))

    def on_term(signum: int, _frame: Any) -> None:
        sup.kill_worker()
        sup.overall_timeout = True
        sup.notes.append(f"terminated by signal {signum}")
        _finish(sup.assemble(), args)
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    result = sup.run()
    return _finish(result, args)


def _finish(result: dict[str, Any], args: argparse.Namespace) -> int:
    result = _sanitize(result)
    if args.out:
        write_json(args.out, result)
    else:
        sys.stdout.write(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return 0 if result["status"] in (STATUS_PASS, STATUS_NO_GPU, STATUS_NO_TORCH, STATUS_FAIL) else 3


if __name__ == "__main__":
    sys.exit(main())
