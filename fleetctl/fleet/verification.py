"""The verification result contract: typed model, strict parser, and the pass/fail rules.

A result is what ``agent/verify/bench.py`` writes on a real node (or what
``agent.verify.simulated`` computes for a simulated one): one JSON object, schema
``SCHEMA_VERSION``.  It lives in ``fleet`` because both sides use it: the agent
(runner, simulation) builds it, the controller (storage, baselines, regression
flagging in ``controller.verification``) reads it.  ``agent.verify.model``
re-exports it under the name the agent uses.

``VerificationResult.from_json`` validates strictly and raises
``VerificationSchemaError`` naming the field (``speed[3].tflops: ...``).  Unknown
fields are ignored.  ``evaluate`` re-derives pass/fail from the entries, so a
result is judged by the same rules wherever it came from (a bench that claims
``passed`` with NaN errors in its entries still fails).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from fleetctl.fleet.errors import InputError
from fleetctl.fleet.jobs import JobStatus

SCHEMA_VERSION = 1

STATUS_PASS = "pass"
STATUS_FAIL = "fail"
STATUS_NO_GPU = "no-gpu"
STATUS_NO_TORCH = "no-torch"
STATUS_TIMEOUT = "timeout"
STATUS_ERROR = "error"
STATUS_REGRESSION = "regression"  # set by the controller against fleet baselines, never by a node
RESULT_STATUSES = frozenset({STATUS_PASS, STATUS_FAIL, STATUS_NO_GPU, STATUS_NO_TORCH, STATUS_TIMEOUT, STATUS_ERROR,
                             STATUS_REGRESSION})
# a node whose latest verification ended so is degraded (a regression is slow, not broken: it does not degrade)
DEGRADING_STATUSES = frozenset({STATUS_FAIL, STATUS_ERROR, STATUS_TIMEOUT, STATUS_NO_GPU, STATUS_NO_TORCH})
MODES = frozenset({"quick", "full"})
# flash_attn: FA2/FA1 when installed, else the FlashAttention that is (FA3, then FA4); fa3/fa4: that one
EXPECTS = frozenset({"flash_attn", "fa3", "fa4", "sdpa"})
# FlashAttention implementations, by the name their speed/correctness entries carry
FLASH_IMPLS = ("flash_attn", "fa3", "fa4")  # flash_attn = FA2 (or FA1), the name results always used
IMPLEMENTATIONS = frozenset({"fa1", "fa2", "fa3", "fa4"})


def expect_for_variant(variant: str) -> str:
    """The verification expectation for an installed or planned variant: "fa3"/"fa3-source" → fa3, "fa4" →
    fa4, "sdpa"/"blocked" → sdpa, anything else (fa2-wheel, fa2-source, fa1-source, fa2...) → flash_attn. The
    one rule for `fleetctl verify` (verify_store/service.py) and a rollout's verify step (rollout/engine.py)."""
    family = variant.split("-", 1)[0]
    if family in ("fa3", "fa4"):
        return family
    return "sdpa" if family in ("sdpa", "blocked") else "flash_attn"


def verified_among(expect: str, present: Collection[str]) -> str | None:
    """The implementation a run verifies (its entries' impl name) when ``present`` are installed, as bench.py's
    ``choose_verified`` picks it (bench.py cannot import this module; tests/unit/verify check they agree):
    ``fa3``/``fa4`` that one, installed or not; ``flash_attn`` FA2/FA1 when installed, else FA3, then FA4, else
    ``flash_attn`` (its result then says why it is missing); None for ``sdpa``."""
    if expect == "sdpa":
        return None
    if expect in FLASH_IMPLS[1:]:
        return expect
    return next((impl for impl in FLASH_IMPLS if impl in present), FLASH_IMPLS[0])


ENTRY_STATUSES = frozenset({"ok", "fail", "error", "skipped", "unsupported", "oom", "timeout"})
DTYPES = frozenset({"bfloat16", "float16"})
SPEED_IMPLS = frozenset({*FLASH_IMPLS, "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"})
CORRECTNESS_IMPLS = frozenset({*FLASH_IMPLS, "flash_attn_varlen", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                               "sdpa_math"})
E2E_IMPLS = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4", "sdpa", "eager"})

# Relative-error thresholds (same numbers as agent/verify/bench.py; docs/verification.md says why).
THRESHOLDS: Mapping[str, Mapping[str, float]] = {
    "bfloat16": {"fwd": 2e-2, "bwd": 5e-2},
    "float16": {"fwd": 5e-3, "bwd": 1e-2},
}


class VerificationSchemaError(InputError):
    """A verification result does not satisfy the schema."""

    code = "bad-verification-result"

    def __init__(self, message: str, *, field: str | None = None, hint: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message,
                         hint=hint or "the result must come from agent/verify/bench.py or agent.verify.simulated "
                                      f"(schema_version {SCHEMA_VERSION}); see docs/verification.md")
        self.field = field


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    name: str | None
    compute_capability: str | None
    memory_mib: int | None = None
    index: int | None = None
    driver: str | None = None
    torch: str | None = None
    cuda: str | None = None
    cudnn: int | None = None
    python: str | None = None
    executable: str | None = None


@dataclass(frozen=True)
class FlashAttnStatus:
    """One FlashAttention implementation as the benchmark found it.  Results before FA3/FA4 support carry
    only the first six fields (always FA2/FA1): ``implementation``/``impl`` are derived for them."""

    import_ok: bool
    version: str | None = None
    error: str | None = None
    error_type: str | None = None
    module_path: str | None = None
    api: str | None = None  # "fa2" | "fa1-unpadded" | "fa3" | "fa4"
    impl: str = "flash_attn"  # the name its speed/correctness entries carry: flash_attn | fa3 | fa4
    implementation: str | None = None  # fa2 | fa1 | fa3 | fa4; None: FA2/FA1 that did not import
    module: str | None = None  # what was imported: flash_attn | flash_attn_interface | flash_attn.cute
    dist: str | None = None  # the distribution that installed it: flash-attn | flash_attn_3 | flash-attn-4
    present: bool | None = None  # installed (even if broken); None: not recorded (older results)

    @property
    def label(self) -> str:
        """"fa4" / "fa3" / "fa2" / "fa1", or "flash_attn" for an FA2/FA1 that did not import."""
        if self.implementation:
            return self.implementation
        if self.impl != "flash_attn":
            return self.impl
        if self.api == "fa1-unpadded":
            return "fa1"
        return "fa2" if self.import_ok else "flash_attn"

    def describe(self) -> str:
        """"fa4 4.0.0b36 (flash_attn.cute, dist flash-attn-4)"."""
        where = ", ".join(x for x in (self.module, f"dist {self.dist}" if self.dist else None) if x)
        return f"{self.label} {self.version or '?'}" + (f" ({where})" if where else "")


@dataclass(frozen=True)
class CorrectnessEntry:
    impl: str
    status: str
    dtype: str | None = None
    headdim: int | None = None
    causal: bool | None = None
    batch: int | None = None
    seqlen: int | None = None
    heads: int | None = None
    fwd_rel_err: float | None = None
    dq_rel_err: float | None = None
    dk_rel_err: float | None = None
    dv_rel_err: float | None = None
    lowp_fwd_rel_err: float | None = None
    threshold_fwd: float | None = None
    threshold_bwd: float | None = None
    nonfinite: tuple[str, ...] = ()
    reason: str | None = None
    simulated: bool = False

    @property
    def errors(self) -> dict[str, float | None]:
        return {"fwd": self.fwd_rel_err, "dq": self.dq_rel_err, "dk": self.dk_rel_err, "dv": self.dv_rel_err}


@dataclass(frozen=True)
class SpeedEntry:
    impl: str
    dtype: str
    headdim: int
    seqlen: int
    batch: int
    heads: int
    causal: bool
    status: str
    direction: str = "fwd"
    ms: float | None = None
    tflops: float | None = None
    peak_mem_mib: float | None = None
    repeats: int | None = None
    reason: str | None = None
    simulated: bool = False

    @property
    def shape_key(self) -> tuple[str, str, int, int, bool]:
        """What makes two measurements comparable across nodes (batch follows from seqlen)."""
        return (self.impl, self.dtype, self.headdim, self.seqlen, self.causal)


@dataclass(frozen=True)
class E2EEntry:
    impl: str
    status: str
    model: str | None = None
    random_weights: bool = False
    batch: int | None = None
    prompt_len: int | None = None
    new_tokens: int | None = None
    dtype: str | None = None
    tokens_per_s: float | None = None
    seconds: float | None = None
    generated_tokens: int | None = None
    peak_mem_mib: float | None = None
    weights_mib: float | None = None
    transformers: str | None = None
    reason: str | None = None
    simulated: bool = False
    # the phases apart (agent/verify/e2e_gen.py; absent in older results): prefill of batch × prompt tokens,
    # time to first token, decode of the new tokens with the KV cache
    prefill_tokens_per_s: float | None = None
    ttft_ms: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_peak_mem_mib: float | None = None


@dataclass(frozen=True)
class GqaEntry:
    """A GQA/MQA row (issue 16): ``heads`` query heads against ``heads_k`` KV heads, timed at ``seqlen`` and
    checked against float32 math at ``check_seqlen`` tokens (``fail``: over the thresholds)."""

    impl: str
    dtype: str
    headdim: int
    seqlen: int
    batch: int
    heads: int
    heads_k: int
    causal: bool
    status: str
    direction: str = "fwd"
    ms: float | None = None
    tflops: float | None = None
    peak_mem_mib: float | None = None
    repeats: int | None = None
    fwd_rel_err: float | None = None
    dq_rel_err: float | None = None
    dk_rel_err: float | None = None
    dv_rel_err: float | None = None
    threshold_fwd: float | None = None
    threshold_bwd: float | None = None
    check_seqlen: int | None = None
    nonfinite: tuple[str, ...] = ()
    reason: str | None = None
    simulated: bool = False


@dataclass(frozen=True)
class DecodeEntry:
    """A decode row (issue 16): one query token per sequence against a ``cache_len`` KV cache (``paged``: in
    ``page_size``-token pages); latency and the bandwidth of the KV read, and the error against float32 math."""

    impl: str
    dtype: str
    headdim: int
    batch: int
    heads: int
    heads_k: int
    cache_len: int
    status: str
    paged: bool = False
    page_size: int | None = None
    seqlen_q: int = 1
    api: str | None = None
    kv_mib: float | None = None
    latency_us: float | None = None
    kv_gb_per_s: float | None = None
    repeats: int | None = None
    fwd_rel_err: float | None = None
    threshold_fwd: float | None = None
    nonfinite: tuple[str, ...] = ()
    reason: str | None = None
    simulated: bool = False


@dataclass(frozen=True)
class VerificationResult:
    schema_version: int
    simulated: bool
    mode: str
    status: str
    passed: bool
    started_at: datetime
    finished_at: datetime
    duration_s: float
    device: DeviceInfo
    flash_attn: FlashAttnStatus  # the verified implementation (FA2's status for nodes expecting SDPA)
    expect: str = "flash_attn"
    hostname: str | None = None
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    correctness: tuple[CorrectnessEntry, ...] = ()
    speed: tuple[SpeedEntry, ...] = ()
    e2e: tuple[E2EEntry, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    restarts: int = 0
    notes: tuple[str, ...] = ()
    log_tail: str | None = None
    flash_attn_implementations: tuple[FlashAttnStatus, ...] = ()  # every one found; () in older results
    gqa: tuple[GqaEntry, ...] = ()  # GQA/MQA rows; () in results written before issue 16's second step
    decode: tuple[DecodeEntry, ...] = ()  # decode (seqlen_q = 1) rows; likewise

    # -- JSON ---------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "simulated": self.simulated,
            "mode": self.mode,
            "expect": self.expect,
            "status": self.status,
            "passed": self.passed,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "hostname": self.hostname,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "duration_s": self.duration_s,
            "device": _plain(self.device),
            "flash_attn": _plain(self.flash_attn),
            "flash_attn_implementations": [_plain(f) for f in self.flash_attn_implementations],
            "correctness": [_plain(e) for e in self.correctness],
            "speed": [_plain(e) for e in self.speed],
            "e2e": [_plain(e) for e in self.e2e],
            "gqa": [_plain(e) for e in self.gqa],
            "decode": [_plain(e) for e in self.decode],
            "config": dict(self.config),
            "restarts": self.restarts,
            "notes": list(self.notes),
        }
        if self.log_tail is not None:
            out["worker_stderr_tail"] = self.log_tail
        return out

    @classmethod
    def from_json(cls, obj: Any) -> VerificationResult:
        return parse_result(obj)

    # -- convenience ----------------------------------------------------------

    @property
    def gpu_model(self) -> str | None:
        return self.device.name

    @property
    def verified_impl(self) -> str | None:
        """The entries' impl name of the implementation this result verifies (flash_attn | fa3 | fa4), None
        for a node that expects SDPA."""
        if self.expect == "sdpa":
            return None
        return self.expect if self.expect in FLASH_IMPLS[1:] else self.flash_attn.impl

    @property
    def verified(self) -> str:
        """What was verified, for people: "fa4 4.0.0b36 (flash_attn.cute, dist flash-attn-4)", "sdpa"."""
        if self.expect == "sdpa":
            return "sdpa"
        return self.flash_attn.describe() if self.flash_attn.import_ok else f"{self.flash_attn.label} (not importable)"

    def implementations(self) -> tuple[FlashAttnStatus, ...]:
        """Every FlashAttention implementation the run found (older results: just ``flash_attn``)."""
        return self.flash_attn_implementations or (self.flash_attn,)

    def ok_speed(self, impl: str | None = None) -> list[SpeedEntry]:
        return [e for e in self.speed if e.status == "ok" and e.tflops is not None and (impl is None or e.impl == impl)]

    def with_verdict(self, verdict: Verdict) -> VerificationResult:
        return replace(self, status=verdict.status, passed=verdict.passed, reasons=verdict.reasons,
                       warnings=verdict.warnings)


def _plain(obj: Any) -> dict[str, Any]:
    out = {}
    for name in obj.__dataclass_fields__:
        value = getattr(obj, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


# ---------------------------------------------------------------------------
# Strict parser
# ---------------------------------------------------------------------------

_MISSING = object()


class _R:
    """Typed field reader over one JSON object; every error names the field path."""

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, Mapping):
            raise VerificationSchemaError(f"expected an object, got {type(obj).__name__}", field=path or None)
        self.obj = obj
        self.path = path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, required: bool) -> Any:
        value = self.obj.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                raise VerificationSchemaError("missing" if value is _MISSING else "must not be null",
                                              field=self.where(key))
            return None
        return value

    def text(self, key: str, required: bool = False, choices: frozenset[str] | None = None,
            limit: int = 20000) -> str | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise VerificationSchemaError(f"expected a string, got {type(v).__name__}", field=self.where(key))
        if choices is not None and v not in choices:
            raise VerificationSchemaError(f"{v!r} is not one of {sorted(choices)}", field=self.where(key))
        return v[:limit]

    def req_str(self, key: str, choices: frozenset[str] | None = None) -> str:
        v = self.text(key, True, choices)
        assert v is not None
        return v

    def flag(self, key: str, required: bool = False, default: bool | None = None) -> bool | None:
        v = self.raw(key, required)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise VerificationSchemaError(f"expected true/false, got {v!r}", field=self.where(key))
        return v

    def req_bool(self, key: str, default: bool | None = None) -> bool:
        v = self.flag(key, default is None, default)
        assert v is not None
        return v

    def integer(self, key: str, required: bool = False, minimum: int = 0) -> int | None:
        v = self.raw(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise VerificationSchemaError(f"expected an integer, got {v!r}", field=self.where(key))
        if v < minimum:
            raise VerificationSchemaError(f"must be ≥ {minimum}, got {v}", field=self.where(key))
        return v

    def req_int(self, key: str, minimum: int = 0) -> int:
        v = self.integer(key, True, minimum)
        assert v is not None
        return v

    def number(self, key: str, required: bool = False) -> float | None:
        """A number; NaN/Inf are accepted (the verdict treats them as failures), negatives are not."""
        v = self.raw(key, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise VerificationSchemaError(f"expected a number, got {v!r}", field=self.where(key))
        f = float(v)
        if f < 0:
            raise VerificationSchemaError(f"must not be negative, got {f}", field=self.where(key))
        return f

    def strs(self, key: str, limit: int = 10000) -> tuple[str, ...]:
        v = self.raw(key, False)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise VerificationSchemaError("expected a list of strings", field=self.where(key))
        if len(v) > limit:
            raise VerificationSchemaError(f"more than {limit} items", field=self.where(key))
        return tuple(v)

    def objs(self, key: str, limit: int = 5000) -> list[_R]:
        v = self.raw(key, False)
        if v is None:
            return []
        if not isinstance(v, list):
            raise VerificationSchemaError(f"expected a list, got {type(v).__name__}", field=self.where(key))
        if len(v) > limit:
            raise VerificationSchemaError(f"more than {limit} entries", field=self.where(key))
        return [_R(item, f"{self.where(key)}[{i}]") for i, item in enumerate(v)]

    def time(self, key: str) -> datetime:
        text = self.req_str(key)
        try:
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise VerificationSchemaError(f"not an ISO 8601 timestamp: {text!r}", field=self.where(key)) from exc
        if value.tzinfo is None:
            raise VerificationSchemaError(f"timestamp without a time zone: {text!r}", field=self.where(key))
        return value.astimezone(UTC)


def _device(r: _R) -> DeviceInfo:
    return DeviceInfo(name=r.text("name", limit=200), compute_capability=r.text("compute_capability", limit=16),
                      memory_mib=r.integer("memory_mib"), index=r.integer("index"), driver=r.text("driver", limit=64),
                      torch=r.text("torch", limit=64), cuda=r.text("cuda", limit=32), cudnn=r.integer("cudnn"),
                      python=r.text("python", limit=32), executable=r.text("executable", limit=4096))


def _flash(r: _R) -> FlashAttnStatus:
    return FlashAttnStatus(import_ok=r.req_bool("import_ok"), version=r.text("version", limit=64),
                           error=r.text("error"), error_type=r.text("error_type", limit=200),
                           module_path=r.text("module_path", limit=4096), api=r.text("api", limit=32),
                           impl=r.text("impl", choices=frozenset(FLASH_IMPLS)) or "flash_attn",
                           implementation=r.text("implementation", choices=IMPLEMENTATIONS),
                           module=r.text("module", limit=200), dist=r.text("dist", limit=200),
                           present=r.flag("present"))


def _correctness(r: _R) -> CorrectnessEntry:
    return CorrectnessEntry(
        impl=r.req_str("impl", CORRECTNESS_IMPLS), status=r.req_str("status", ENTRY_STATUSES),
        dtype=r.text("dtype", choices=DTYPES), headdim=r.integer("headdim", minimum=1), causal=r.flag("causal"),
        batch=r.integer("batch", minimum=1), seqlen=r.integer("seqlen", minimum=1), heads=r.integer("heads", minimum=1),
        fwd_rel_err=r.number("fwd_rel_err"), dq_rel_err=r.number("dq_rel_err"), dk_rel_err=r.number("dk_rel_err"),
        dv_rel_err=r.number("dv_rel_err"), lowp_fwd_rel_err=r.number("lowp_fwd_rel_err"),
        threshold_fwd=r.number("threshold_fwd"), threshold_bwd=r.number("threshold_bwd"),
        nonfinite=r.strs("nonfinite", 8), reason=r.text("reason"), simulated=r.req_bool("simulated", False))


def _speed(r: _R) -> SpeedEntry:
    return SpeedEntry(
        impl=r.req_str("impl", SPEED_IMPLS), dtype=r.req_str("dtype", DTYPES), headdim=r.req_int("headdim", 1),
        seqlen=r.req_int("seqlen", 1), batch=r.req_int("batch", 1), heads=r.req_int("heads", 1),
        causal=r.req_bool("causal"), status=r.req_str("status", ENTRY_STATUSES),
        direction=r.text("direction", choices=frozenset({"fwd", "bwd", "fwd_bwd"})) or "fwd",
        ms=r.number("ms"), tflops=r.number("tflops"), peak_mem_mib=r.number("peak_mem_mib"),
        repeats=r.integer("repeats"),
        reason=r.text("reason"), simulated=r.req_bool("simulated", False))


def _e2e(r: _R) -> E2EEntry:
    return E2EEntry(
        impl=r.req_str("impl", E2E_IMPLS), status=r.req_str("status", ENTRY_STATUSES),
        model=r.text("model", limit=4096),
        random_weights=r.req_bool("random_weights", False), batch=r.integer("batch", minimum=1),
        prompt_len=r.integer("prompt_len", minimum=1), new_tokens=r.integer("new_tokens", minimum=1),
        dtype=r.text("dtype", limit=32), tokens_per_s=r.number("tokens_per_s"), seconds=r.number("seconds"),
        generated_tokens=r.integer("generated_tokens"), peak_mem_mib=r.number("peak_mem_mib"),
        weights_mib=r.number("weights_mib"), transformers=r.text("transformers", limit=64), reason=r.text("reason"),
        simulated=r.req_bool("simulated", False), prefill_tokens_per_s=r.number("prefill_tokens_per_s"),
        ttft_ms=r.number("ttft_ms"), decode_tokens_per_s=r.number("decode_tokens_per_s"),
        prefill_peak_mem_mib=r.number("prefill_peak_mem_mib"))


def _gqa(r: _R) -> GqaEntry:
    return GqaEntry(
        impl=r.req_str("impl", SPEED_IMPLS), dtype=r.req_str("dtype", DTYPES), headdim=r.req_int("headdim", 1),
        seqlen=r.req_int("seqlen", 1), batch=r.req_int("batch", 1), heads=r.req_int("heads", 1),
        heads_k=r.req_int("heads_k", 1), causal=r.req_bool("causal"), status=r.req_str("status", ENTRY_STATUSES),
        direction=r.text("direction", choices=frozenset({"fwd", "fwd_bwd"})) or "fwd", ms=r.number("ms"),
        tflops=r.number("tflops"), peak_mem_mib=r.number("peak_mem_mib"), repeats=r.integer("repeats"),
        fwd_rel_err=r.number("fwd_rel_err"), dq_rel_err=r.number("dq_rel_err"), dk_rel_err=r.number("dk_rel_err"),
        dv_rel_err=r.number("dv_rel_err"), threshold_fwd=r.number("threshold_fwd"),
        threshold_bwd=r.number("threshold_bwd"), check_seqlen=r.integer("check_seqlen", minimum=1),
        nonfinite=r.strs("nonfinite", 8), reason=r.text("reason"), simulated=r.req_bool("simulated", False))


def _decode(r: _R) -> DecodeEntry:
    return DecodeEntry(
        impl=r.req_str("impl", SPEED_IMPLS), dtype=r.req_str("dtype", DTYPES), headdim=r.req_int("headdim", 1),
        batch=r.req_int("batch", 1), heads=r.req_int("heads", 1), heads_k=r.req_int("heads_k", 1),
        cache_len=r.req_int("cache_len", 1), status=r.req_str("status", ENTRY_STATUSES),
        paged=r.req_bool("paged", False), page_size=r.integer("page_size", minimum=1),
        seqlen_q=r.integer("seqlen_q", minimum=1) or 1, api=r.text("api", limit=200), kv_mib=r.number("kv_mib"),
        latency_us=r.number("latency_us"), kv_gb_per_s=r.number("kv_gb_per_s"), repeats=r.integer("repeats"),
        fwd_rel_err=r.number("fwd_rel_err"), threshold_fwd=r.number("threshold_fwd"),
        nonfinite=r.strs("nonfinite", 8), reason=r.text("reason"), simulated=r.req_bool("simulated", False))


def parse_result(obj: Any) -> VerificationResult:
    """Strictly parse one decoded JSON result; raises ``VerificationSchemaError``."""
    r = _R(obj, "")
    version = r.req_int("schema_version")
    if version != SCHEMA_VERSION:
        raise VerificationSchemaError(f"unsupported schema_version {version} (this fleetctl reads {SCHEMA_VERSION})",
                                      field="schema_version",
                                      hint="run the bench.py shipped with this fleetctl version")
    simulated = r.req_bool("simulated")
    config = r.raw("config", False)
    if config is not None and not isinstance(config, Mapping):
        raise VerificationSchemaError("expected an object", field="config")
    started, finished = r.time("started_at"), r.time("finished_at")
    if finished < started:
        raise VerificationSchemaError("finished_at is before started_at", field="finished_at")
    result = VerificationResult(
        schema_version=version, simulated=simulated, mode=r.req_str("mode", MODES),
        expect=r.text("expect", choices=EXPECTS) or "flash_attn",
        status=r.req_str("status", RESULT_STATUSES), passed=r.req_bool("passed"),
        reasons=r.strs("reasons"), warnings=r.strs("warnings"), hostname=r.text("hostname", limit=253),
        started_at=started, finished_at=finished, duration_s=r.number("duration_s", True) or 0.0,
        device=_device(_R(r.raw("device", True), "device")),
        flash_attn=_flash(_R(r.raw("flash_attn", True), "flash_attn")),
        flash_attn_implementations=tuple(_flash(x) for x in r.objs("flash_attn_implementations", 8)),
        correctness=tuple(_correctness(x) for x in r.objs("correctness")),
        speed=tuple(_speed(x) for x in r.objs("speed")),
        e2e=tuple(_e2e(x) for x in r.objs("e2e")),
        gqa=tuple(_gqa(x) for x in r.objs("gqa")), decode=tuple(_decode(x) for x in r.objs("decode")),
        config=dict(config or {}), restarts=r.integer("restarts") or 0, notes=r.strs("notes"),
        log_tail=r.text("worker_stderr_tail", limit=20000),
    )
    if result.passed != (result.status == STATUS_PASS):
        raise VerificationSchemaError(f"passed={result.passed} contradicts status {result.status!r}", field="passed")
    for name in ("correctness", "speed", "e2e", "gqa", "decode"):
        for i, entry in enumerate(getattr(result, name)):
            if entry.simulated != simulated:
                raise VerificationSchemaError(f"entry says simulated={entry.simulated} in a result with "
                                              f"simulated={simulated}", field=f"{name}[{i}].simulated")
    return result


# ---------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    status: str
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == STATUS_PASS

    @property
    def degrades_node(self) -> bool:
        """Whether this verdict marks the node degraded (controller.verify_store.store.apply_health)."""
        return self.status in DEGRADING_STATUSES


def flash_family(impl: str) -> str | None:
    """The FlashAttention implementation an entry belongs to (``flash_attn_varlen`` → ``flash_attn``)."""
    for name in FLASH_IMPLS:
        if impl == name or impl.startswith(name + "_"):
            return name
    return None


def import_label(fa: FlashAttnStatus) -> str:
    """"flash_attn" as always for FA2/FA1, "fa4 (flash_attn.cute)" for the others."""
    return fa.impl if fa.impl == "flash_attn" else f"{fa.impl} ({fa.module or fa.impl})"


def _shape(e: CorrectnessEntry | SpeedEntry) -> str:
    parts = [e.impl, e.dtype or "-", f"hd{e.headdim}" if e.headdim else ""]
    if isinstance(e, SpeedEntry):
        parts.append(f"s{e.seqlen}")
    if e.causal is not None:
        parts.append("causal" if e.causal else "non-causal")
    return " ".join(p for p in parts if p)


def correctness_problems(e: CorrectnessEntry) -> list[str]:
    """What is wrong with one correctness entry (empty: fine or not applicable)."""
    if e.status in ("skipped", "unsupported"):
        return []
    if e.status in ("error", "timeout", "oom"):
        return [f"{e.status}: {e.reason or 'no detail'}"]
    problems = []
    if e.nonfinite:
        problems.append("NaN/Inf in " + ", ".join(e.nonfinite))
    contract = THRESHOLDS.get(e.dtype or "")
    for name, err in e.errors.items():
        kind = "fwd" if name == "fwd" else "bwd"
        # the contract's threshold for the dtype; an entry cannot loosen it
        claimed = e.threshold_fwd if kind == "fwd" else e.threshold_bwd
        limit = contract[kind] if contract else claimed
        if err is None:
            if e.status == "ok" and name == "fwd":
                problems.append("no forward error recorded")
            continue
        if not math.isfinite(err):
            problems.append(f"{name} relative error is {err}")
        elif limit is not None and err > limit:
            problems.append(f"{name} relative error {err:.3g} > {limit:g}")
    if e.status == "fail" and not problems:
        problems.append(e.reason or "failed")
    return problems


def evaluate(result: VerificationResult) -> Verdict:
    """Pass/fail of one result, from its entries (bench.py's own verdict is not trusted)."""
    if result.status in (STATUS_NO_GPU, STATUS_NO_TORCH, STATUS_ERROR):
        return Verdict(result.status, result.reasons or (f"status {result.status}",), result.warnings)
    reasons: list[str] = []
    warns: list[str] = []
    target = result.verified_impl  # only its failures (or SDPA's, for nodes expecting SDPA) fail the node
    expect_fa = target is not None

    def critical_c(impl: str) -> bool:
        return flash_family(impl) == target if expect_fa else impl == "sdpa_flash"

    def critical_s(impl: str) -> bool:
        return impl == target if expect_fa else impl in ("sdpa_flash", "sdpa_efficient")

    if not result.flash_attn.import_ok:
        msg = f"{import_label(result.flash_attn)} import failed: {result.flash_attn.error or 'no detail'}"
        (reasons if expect_fa else warns).append(msg)
    for other in result.flash_attn_implementations:
        if other.impl != result.flash_attn.impl and not other.import_ok:
            warns.append(f"{import_label(other)} import failed: {other.error or 'no detail'}")
    fa_checked = 0
    for e in result.correctness:
        problems = correctness_problems(e)
        if e.status == "ok" and not problems and critical_c(e.impl):
            fa_checked += 1
        for p in problems:
            (reasons if critical_c(e.impl) else warns).append(f"correctness {_shape(e)}: {p}")
    ok_speed = 0
    for s in result.speed:
        crit = critical_s(s.impl)
        if s.status == "ok":
            if s.tflops is None or not math.isfinite(s.tflops) or s.tflops <= 0:
                (reasons if crit else warns).append(f"speed {_shape(s)}: invalid TFLOP/s {s.tflops}")
            else:
                ok_speed += crit
        elif s.status in ("error", "timeout", "fail"):
            (reasons if crit else warns).append(f"speed {_shape(s)}: {s.status}: {s.reason or 'no detail'}")
    if (result.flash_attn.import_ok or not expect_fa) and ok_speed == 0 and result.status != STATUS_TIMEOUT:
        reasons.append("no speed measurement of the expected implementation succeeded")
    if expect_fa and result.flash_attn.import_ok and fa_checked == 0:
        reasons.append(f"{import_label(result.flash_attn)} imported but no correctness check of it passed")
    for x in result.e2e:
        if x.status in ("error", "timeout", "oom"):
            warns.append(f"e2e {x.impl}: {x.status}: {x.reason or 'no detail'}")
    rows: tuple[GqaEntry | DecodeEntry, ...] = (*result.gqa, *result.decode)
    for row in rows:  # measured alongside: never fail the node (docs/verification.md)
        warns.extend(f"{row_label(row)}: {p}" for p in row_problems(row))
    if result.status == STATUS_TIMEOUT:
        extra = [r for r in result.reasons if "timeout" in r] or ["overall timeout reached"]
        return Verdict(STATUS_TIMEOUT, tuple(_dedupe([*extra, *reasons])), tuple(_dedupe(warns)))
    return Verdict(STATUS_FAIL if reasons else STATUS_PASS, tuple(_dedupe(reasons)), tuple(_dedupe(warns)))


def row_label(e: GqaEntry | DecodeEntry) -> str:
    """"gqa fa4 h32/k8 s4096 fwd_bwd", "decode flash_attn paged kv16384" (bench.py's shape_label)."""
    if isinstance(e, DecodeEntry):
        return f"decode {e.impl} {'paged' if e.paged else 'dense'} kv{e.cache_len}"
    return f"gqa {e.impl} h{e.heads}/k{e.heads_k} s{e.seqlen} {e.direction}"


def row_problems(e: GqaEntry | DecodeEntry) -> list[str]:
    """Why a GQA/decode row is not a correct measurement, re-derived like ``correctness_problems`` (a row
    claiming ``ok`` with NaN or an error over the threshold is still a problem); [] when it is fine or was
    not run (skipped/unsupported)."""
    if e.status in ("skipped", "unsupported"):
        return []
    if e.status != "ok":
        return [f"{e.status}: {e.reason or 'no detail'}"]
    limits = THRESHOLDS.get(e.dtype, {})
    errs = {"fwd": e.fwd_rel_err}
    if isinstance(e, GqaEntry) and e.direction == "fwd_bwd":
        errs.update(dq=e.dq_rel_err, dk=e.dk_rel_err, dv=e.dv_rel_err)
    out = [f"NaN/Inf in {', '.join(e.nonfinite)}"] if e.nonfinite else []
    for name, err in errs.items():
        limit = limits.get("fwd" if name == "fwd" else "bwd")
        if err is None or not math.isfinite(err):
            out.append(f"{name}: no finite relative error")
        elif limit is not None and err > limit:
            out.append(f"{name} relative error {err:.3g} > {limit:g}")
    return out


def judge(result: VerificationResult, *, fleet_regression: str | None = None) -> Verdict:
    """THE verification verdict: pass, fail (or timeout/error/no-gpu/no-torch) from the result's entries
    (``evaluate``), and ``regression`` for a passing result the fleet comparison found too slow
    (``fleet_regression``: that comparison's reason, from ``controller.verification.check_regression``).
    The agent, the controller's store, the rollout engine and the dashboard all take their verdict from here."""
    verdict = evaluate(result)
    if verdict.status == STATUS_PASS and fleet_regression:
        return Verdict(STATUS_REGRESSION, (fleet_regression,), verdict.warnings)
    return verdict


_PASSING_WORDS = frozenset({"pass", "passed", "ok"})


def judge_job(job_status: JobStatus, job_result: Any, job_error: str | None = None, *,
              fleet_regression: str | None = None) -> Verdict:
    """The verdict of a finished ``verify`` job: a job that did not succeed ends with its own state (``failed``,
    ``timeout``...); a full result (``{"verification": {...}}`` or the result itself) is ``judge``d; a
    malformed one is an ``error``. Runners without the full result (test doubles, old agents) report
    ``passed``/``ok``, a ``verdict``/``status`` word or ``import.ok``; a successful job that reports none of
    these passes: the job's success is the only evidence there is."""
    if job_status != JobStatus.SUCCESSFUL:
        return Verdict(job_status, (job_error or f"verify job {job_status}",))
    res: Mapping[str, Any] = job_result if isinstance(job_result, Mapping) else {}
    payload = res.get("verification") if isinstance(res.get("verification"), Mapping) else (
        res if "schema_version" in res else None)
    if payload is not None:
        try:
            return judge(parse_result(payload), fleet_regression=fleet_regression)
        except VerificationSchemaError as exc:
            return Verdict(STATUS_ERROR, (f"unreadable verification result: {exc.message}",))
    reason = str(res.get("reason") or res.get("reasons") or "")
    for key in ("passed", "pass", "ok"):
        if isinstance(res.get(key), bool):
            return Verdict(STATUS_PASS if res[key] else STATUS_FAIL, (reason,) if reason else ())
    word = res.get("verdict") or res.get("status")
    if isinstance(word, str):
        return Verdict(STATUS_PASS if word.lower() in _PASSING_WORDS else STATUS_FAIL, (reason,) if reason else ())
    imported = res.get("import")
    if isinstance(imported, Mapping) and isinstance(imported.get("ok"), bool):
        error = str(imported.get("error") or "")
        return Verdict(STATUS_PASS if imported["ok"] else STATUS_FAIL, (error,) if error else ())
    return Verdict(STATUS_PASS, ("verify job succeeded",))


def _dedupe(items: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def failure_result(status: str, reason: str, *, mode: str, started_at: datetime, finished_at: datetime,
                   simulated: bool = False, expect: str = "flash_attn", hostname: str | None = None,
                   log_tail: str | None = None, partial: VerificationResult | None = None) -> VerificationResult:
    """A result for a run that produced no usable output (timeout, crash, bad JSON)."""
    if partial is not None:
        return replace(partial, status=status, passed=False, reasons=(*partial.reasons, reason),
                       finished_at=finished_at, duration_s=(finished_at - started_at).total_seconds(),
                       log_tail=log_tail if log_tail is not None else partial.log_tail)
    return VerificationResult(
        schema_version=SCHEMA_VERSION, simulated=simulated, mode=mode, expect=expect, status=status, passed=False,
        reasons=(reason,), hostname=hostname, started_at=started_at, finished_at=finished_at,
        duration_s=round((finished_at - started_at).total_seconds(), 3),
        device=DeviceInfo(name=None, compute_capability=None),
        flash_attn=FlashAttnStatus(import_ok=False, error="not checked",
                                   impl=expect if expect in FLASH_IMPLS else "flash_attn"),
        log_tail=log_tail)
