"""The attention recommendation: the fastest *correct* attention implementation for a node and a workload.

One owner for the rules (CLI, API, dashboard and the resolver's ``--prefer fastest`` only consume what this
module returns).  Pure: typed evidence in, a typed ``Recommendation`` out; loading the evidence (the store,
the built-in prior file) is done by the thin functions at the bottom, never inside ``recommend``.

Evidence, per implementation, in this order (docs/verification.md, "The attention recommendation"):

1. the node's own latest verification, when it ran on the node's *current* torch and driver (a torch or
   driver change makes a kernel's speed a different question, so older numbers are reported as stale and
   not used);
2. the fleet's latest verifications of other nodes with the same GPU model, torch and driver (median per
   shape over the nodes);
3. the built-in prior (``controller/data/attention_prior.json``), real measurements from this project's lent
   H100/H200 runs, each with its file, machine and date: used for the same GPU model only, with a caveat
   when its torch/driver differ from the node's.

The source is chosen per implementation because a node can only measure what is installed: a node with no
FlashAttention measured SDPA itself, and FA4's figure for it can only come from the fleet or the prior.

An implementation is a candidate only if its correctness checks in the same evidence passed for the
profile's dtype (a single failed check excludes it; SDPA's math backend is the reference, never checked).
Candidates are compared on the profile's shapes measured by all of them (median TFLOP/s); a margin under
``TIE_MARGIN`` is a tie, broken by the cheaper install (nothing < installed < wheel < source build).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.catalog import Catalog
from fleetctl.controller.registry import record_of
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.resolver.model import WORKLOADS, MeasuredImpl, Measurements
from fleetctl.controller.store.models import Node
from fleetctl.controller.verify_store import store as verification_store
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.facts import NodeFacts
from fleetctl.fleet.verification import (
    DecodeEntry,
    GqaEntry,
    VerificationResult,
    correctness_problems,
    row_label,
    row_problems,
)

PRIOR_PATH = Path(__file__).parent / "data" / "attention_prior.json"
# Two runs of one shape on the lent H200 differed by ~1 % (docs/gpu-e2e.md); 3 % keeps noise from picking a
# winner that costs a 20-minute build over one that needs nothing.
TIE_MARGIN = 0.03
# measured through the real path on the H200: the install-wheel job (14 wheels fetched from the controller's store,
# installed, pip check) took 42.7 s and 40.9 s (tests/fixtures/h200_fa4_e2e, h200_attention_e2e); a bare
# `pip install` of the same wheelhouse took 12.0 s (tests/fixtures/h200_fa4)
WHEEL_INSTALL_S = 42.0

FLASH = ("fa2", "fa1", "fa3", "fa4")
SDPA = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
IMPLS = (*FLASH, *SDPA)
E2E_SETTINGS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "sdpa", "eager")
SOURCES = ("node", "fleet", "prior")
INSTALL_ORDER = {"none": 0, "installed": 1, "wheel": 2, "source-build": 3, "unknown": 4, "unavailable": 5}


# ---------------------------------------------------------------------------
# Profiles and settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A workload: which measurements stand for it."""

    name: str  # training | prefill | decode
    direction: str  # fwd | fwd_bwd | decode (e2e decode tokens/s)
    dtype: str = "bfloat16"
    headdim: int = 128
    min_seqlen: int = 1
    causal: bool = True
    unit: str = "TFLOP/s"

    def describe(self) -> str:
        if self.direction == "decode":
            return "decode (end-to-end decode tokens/s by attn_implementation)"
        if self.direction == "decode_kernel":
            return (f"{self.name}: one decode step (seqlen_q 1) against a dense KV cache ≥ {self.min_seqlen} tokens, "
                    f"{self.dtype}, head dim {self.headdim}, GQA 32/8: KV bandwidth")
        what = "forward+backward" if self.direction == "fwd_bwd" else "forward"
        return (f"{self.name}: {what}, {self.dtype}, head dim {self.headdim}, "
                f"{'causal' if self.causal else 'non-causal'}, seqlen ≥ {self.min_seqlen}")


PROFILES: Mapping[str, Profile] = {
    "training": Profile("training", "fwd_bwd", min_seqlen=1024),
    "prefill": Profile("prefill", "fwd", min_seqlen=4096),
    "decode": Profile("decode", "decode", unit="new tokens/s"),
    # the attention kernel alone in decode (bench.py's decode rows): what a serving engine calling the kernel
    # sees; not folded into "decode", whose end-to-end figure includes the model around attention
    "decode-kernel": Profile("decode-kernel", "decode_kernel", min_seqlen=4096, unit="GB/s KV read"),
}


def profile(name: str, headdim: int | None = None, dtype: str | None = None) -> Profile:
    base = PROFILES.get(name)
    if base is None:
        raise InputError(f"unknown workload {name!r}", hint=f"use one of {', '.join(WORKLOADS)}")
    return Profile(base.name, base.direction, dtype or base.dtype, headdim or base.headdim, base.min_seqlen,
                   base.causal, base.unit)


@dataclass(frozen=True)
class Setting:
    """How a user selects the implementation in their code."""

    transformers: str | None  # the attn_implementation value; None: no transformers integration
    code: str  # the exact call or context manager
    hf_kernels: str | None = None  # a Hugging Face `kernels` repo (needs the Hub or a local mirror)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"transformers": self.transformers, "code": self.code, "hf_kernels": self.hf_kernels,
                "note": self.note}

    def describe(self) -> str:
        head = f'attn_implementation="{self.transformers}"' if self.transformers else "no transformers setting"
        return f"{head}; {self.code}" + (f" (HF kernels: {self.hf_kernels})" if self.hf_kernels else "") + (
            f"; {self.note}" if self.note else "")


_CUDNN = ("from torch.nn.attention import sdpa_kernel, SDPBackend; "
          "with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, "
          "SDPBackend.MATH], set_priority=True): ...")

SETTINGS: Mapping[str, Setting] = {
    "fa2": Setting("flash_attention_2", "from flash_attn import flash_attn_func",
                   "kernels-community/flash-attn2"),
    "fa1": Setting(None, "from flash_attn.flash_attn_interface import flash_attn_unpadded_func",
                   note="transformers' flash_attention_2 needs FA2; with FA1 use attn_implementation=\"sdpa\""),
    "fa3": Setting("flash_attention_3", "from flash_attn_interface import flash_attn_func",
                   "kernels-community/flash-attn3"),
    # transformers 5.17 registers "flash_attention_4" (its AttentionInterface listed it on the H200,
    # tests/fixtures/h200_attention/e2e_h200.json); not yet run end to end by this project (FA4 not carried)
    "fa4": Setting("flash_attention_4", "from flash_attn.cute import flash_attn_func",
                   note="attn_implementation=\"flash_attention_4\" needs transformers ≥ 5.x that registers it "
                        "(5.17 does); older ones: call flash_attn.cute directly"),
    # torch's default SDPA order tries the flash backend first; cuDNN must be asked for (set_priority keeps the
    # others as fallbacks for shapes cuDNN refuses)
    "sdpa_cudnn": Setting("sdpa", _CUDNN),
    "sdpa_flash": Setting("sdpa", "torch's default SDPA order (flash backend first): nothing to set"),
    "sdpa_efficient": Setting("sdpa", "with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION): ..."),
    "sdpa_math": Setting("eager", "attn_implementation=\"eager\" (or sdpa_kernel(SDPBackend.MATH))"),
    "flash_attention_2": Setting("flash_attention_2",
                                 "from_pretrained(..., attn_implementation=\"flash_attention_2\")"),
    "flash_attention_3": Setting("flash_attention_3",
                                 "from_pretrained(..., attn_implementation=\"flash_attention_3\")"),
    "flash_attention_4": Setting("flash_attention_4",
                                 "from_pretrained(..., attn_implementation=\"flash_attention_4\")"),
    # measured on the H200 (tests/fixtures/h200_attention): the mask costs decode 12 %, and the first SDPA call at
    # a new prompt length 3-5 s (what made the earlier e2e check report sdpa 4-8x slower than eager)
    "sdpa": Setting("sdpa", "from_pretrained(..., attn_implementation=\"sdpa\")",
                    note="decode: pass no attention_mask when the batch has no padding (276 → 315 tokens/s on the "
                         "H200) and warm up at the serving prompt length (first call at a new length: 3-5 s)"),
    "eager": Setting("eager", "from_pretrained(..., attn_implementation=\"eager\")"),
}


# ---------------------------------------------------------------------------
# Typed evidence
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str  # node | fleet | prior
    origin: str  # hostname(s), or the prior's fixture file
    measured_at: str | None
    gpu_model: str
    torch: str | None
    driver: str | None
    machine: str | None = None

    def describe(self) -> str:
        when = f", {self.measured_at[:10]}" if self.measured_at else ""
        what = {"node": "this node", "fleet": f"fleet ({self.origin})", "prior": f"prior {self.origin}"}[self.kind]
        return f"{what}{when}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "origin": self.origin, "measured_at": self.measured_at,
                "gpu_model": self.gpu_model, "torch": self.torch, "driver": self.driver, "machine": self.machine}


@dataclass(frozen=True)
class Measurement:
    impl: str  # IMPLS, or an E2E_SETTINGS name for direction "decode"/"prefill_e2e"
    direction: str  # fwd | fwd_bwd | decode
    dtype: str
    headdim: int
    seqlen: int
    causal: bool
    value: float  # TFLOP/s, or tokens/s for e2e rows

    @property
    def shape(self) -> tuple[str, str, int, int, bool]:
        return (self.direction, self.dtype, self.headdim, self.seqlen, self.causal)


@dataclass(frozen=True)
class Evidence:
    """One verification result reduced to what the recommendation reads."""

    source: Source
    measurements: tuple[Measurement, ...]
    checked: Mapping[tuple[str, str], bool] = field(default_factory=dict)  # (impl, dtype) → all checks passed
    problems: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (impl, dtype) → first failure
    versions: Mapping[str, str] = field(default_factory=dict)  # impl → version ("fa4" → "4.0.0b36")

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source.to_json(),
                "measurements": [[m.impl, m.direction, m.dtype, m.headdim, m.seqlen, m.causal, m.value]
                                 for m in self.measurements],
                "checked": [[i, d, ok] for (i, d), ok in sorted(self.checked.items())],
                "problems": [[i, d, p] for (i, d), p in sorted(self.problems.items())],
                "versions": dict(self.versions)}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> Evidence:
        s = obj["source"]
        return Evidence(
            source=Source(kind=s["kind"], origin=s["origin"], measured_at=s.get("measured_at"),
                          gpu_model=s["gpu_model"], torch=s.get("torch"), driver=s.get("driver"),
                          machine=s.get("machine")),
            measurements=tuple(Measurement(m[0], m[1], m[2], int(m[3]), int(m[4]), bool(m[5]), float(m[6]))
                               for m in obj.get("measurements", [])),
            checked={(c[0], c[1]): bool(c[2]) for c in obj.get("checked", [])},
            problems={(p[0], p[1]): str(p[2]) for p in obj.get("problems", [])},
            versions=dict(obj.get("versions", {})))


def evidence_from_e2e(obj: Mapping[str, Any], kind: str, origin: str, machine: str | None = None,
                      driver: str | None = None) -> Evidence:
    """Typed evidence from an agent/verify/e2e_gen.py output: decode tokens/s by attn_implementation."""
    m = obj.get("machine") or {}
    ms = tuple(Measurement(e["impl"], "decode", obj.get("dtype") or "bfloat16", 0, int(obj.get("prompt_len") or 0),
                           True, float(e["decode_tokens_per_s"]))
               for e in obj.get("e2e", []) if e.get("status") == "ok" and e.get("decode_tokens_per_s"))
    return Evidence(Source(kind, origin, obj.get("finished_at") or obj.get("started_at"), str(m.get("gpu", "")),
                           m.get("torch"), driver, machine), ms)


def _flash_label(result: VerificationResult) -> str:
    """What the entries' ``flash_attn`` rows are: fa2, or fa1 through its unpadded API."""
    for f in result.implementations():
        if f.impl == "flash_attn":
            return "fa1" if f.label == "fa1" else "fa2"
    return "fa2"


def _impl_of(entry_impl: str, fa_label: str) -> str | None:
    if entry_impl in ("flash_attn", "flash_attn_varlen"):
        return fa_label
    return entry_impl if entry_impl in IMPLS else None


def evidence_from_result(result: VerificationResult, kind: str, origin: str | None = None,
                         machine: str | None = None) -> Evidence:
    """Typed evidence from one stored verification result (fleet.verification)."""
    label = _flash_label(result)
    ms: list[Measurement] = []
    for e in result.ok_speed():
        impl = _impl_of(e.impl, label)
        if impl is not None and e.tflops is not None and e.tflops > 0:
            ms.append(Measurement(impl, e.direction, e.dtype, e.headdim, e.seqlen, e.causal, float(e.tflops)))
    for x in result.e2e:
        decode = x.decode_tokens_per_s
        if x.status == "ok" and decode:
            ms.append(Measurement(x.impl, "decode", x.dtype or "bfloat16", 0, x.prompt_len or 0, True, float(decode)))
    for step in result.decode:  # dense caches only: SDPA has no paged rows to compare with
        impl = _impl_of(step.impl, label)
        if impl is not None and step.status == "ok" and not step.paged and step.kv_gb_per_s and not row_problems(step):
            ms.append(Measurement(impl, "decode_kernel", step.dtype, step.headdim, step.cache_len, True,
                                  float(step.kv_gb_per_s)))
    checked: dict[tuple[str, str], bool] = {}
    problems: dict[tuple[str, str], str] = {}
    # a wrong GQA or decode output distrusts the implementation for its dtype, like a failed correctness case
    rows: tuple[GqaEntry | DecodeEntry, ...] = (*result.gqa, *result.decode)
    for row in rows:
        impl = _impl_of(row.impl, label)
        found_row = row_problems(row) if row.status not in ("error", "timeout", "oom") else []
        if impl is not None and found_row:
            checked[(impl, row.dtype)] = False
            problems.setdefault((impl, row.dtype), f"{row_label(row)}: {found_row[0]}")
    for c in result.correctness:
        impl = _impl_of(c.impl, label)
        if impl is None or c.dtype is None or c.status in ("skipped", "unsupported"):
            continue
        found = correctness_problems(c)
        key = (impl, c.dtype)
        if found:
            checked[key] = False
            problems.setdefault(key, f"{c.impl} hd{c.headdim} {'causal' if c.causal else 'full'}: {found[0]}")
        else:
            checked.setdefault(key, c.status == "ok")
    versions = {}
    for f in result.implementations():
        if f.import_ok and f.version:
            versions[label if f.impl == "flash_attn" else f.impl] = f.version
    d = result.device
    source = Source(kind, origin or result.hostname or "?", result.finished_at.isoformat(),
                    (d.name or "").replace(" (simulated)", ""), d.torch, d.driver, machine)
    return Evidence(source, tuple(ms), checked, problems, versions)


# ---------------------------------------------------------------------------
# Install cost (typed input; ``install_costs`` derives it from the resolver)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallCost:
    kind: str  # none | installed | wheel | source-build | unavailable | unknown
    seconds: float | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.kind == "none":
            return "nothing to install (ships with torch)"
        if self.kind == "installed":
            return f"already installed{' (' + self.detail + ')' if self.detail else ''}"
        if self.kind == "wheel":
            return f"wheels, ~{self.seconds:.0f} s" + (f" ({self.detail})" if self.detail else "")
        if self.kind == "source-build":
            return f"source build, ~{(self.seconds or 0) / 60:.0f} min" + (f" ({self.detail})" if self.detail else "")
        if self.kind == "unavailable":
            return f"cannot be installed here: {self.detail}"
        return "install cost unknown"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "seconds": self.seconds, "detail": self.detail, "text": self.describe()}


NO_INSTALL = InstallCost("none", 0.0)


def default_cost(impl: str) -> InstallCost:
    return NO_INSTALL if impl in SDPA or impl in E2E_SETTINGS else InstallCost("unknown")


# ---------------------------------------------------------------------------
# The recommendation (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeContext:
    """What the evidence must match: the node's GPU model and its current torch and driver."""

    hostname: str
    gpu_model: str
    torch: str | None
    driver: str | None
    verify_args: str = ""  # what `fleetctl verify` is given to measure it: the hostname unless set (a GPU class)

    @property
    def verify_command(self) -> str:
        """The command that measures it (``fleetctl verify`` runs the full mode unless told ``--quick``)."""
        return f"fleetctl verify {self.verify_args or self.hostname}"

    @staticmethod
    def of(facts: NodeFacts) -> NodeContext:
        return NodeContext(facts.hostname, facts.gpus[0].name if facts.gpus else "",
                           facts.torch.version if facts.torch else None,
                           facts.driver.version if facts.driver else None)


@dataclass(frozen=True)
class Candidate:
    impl: str
    value: float | None  # median over the compared shapes (profile unit); None: not measured
    shapes: int
    source: Source | None
    install: InstallCost
    setting: Setting
    version: str | None = None
    excluded: str | None = None  # why it cannot be recommended (failed correctness, cannot install, unmeasured)

    def to_json(self) -> dict[str, Any]:
        return {"impl": self.impl, "value": self.value, "shapes": self.shapes,
                "source": self.source.to_json() if self.source else None, "install": self.install.to_json(),
                "setting": self.setting.to_json(), "version": self.version, "excluded": self.excluded}


@dataclass(frozen=True)
class Recommendation:
    hostname: str
    gpu_model: str
    profile: Profile
    choice: Candidate | None
    runner_up: Candidate | None
    margin: float | None  # choice / runner-up − 1
    candidates: tuple[Candidate, ...]  # ranked (measured, then excluded)
    notes: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        return self.profile.unit

    def ranked(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if c.excluded is None and c.value is not None)

    def to_json(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "gpu_model": self.gpu_model, "workload": self.profile.name,
                "profile": self.profile.describe(), "unit": self.unit,
                "choice": self.choice.to_json() if self.choice else None,
                "runner_up": self.runner_up.impl if self.runner_up else None,
                "margin": None if self.margin is None else round(self.margin, 4),
                "candidates": [c.to_json() for c in self.candidates], "notes": list(self.notes)}

    def summary(self) -> str:
        """One line: "fa4 670 TFLOP/s, +10 % over sdpa_cudnn (wheels, ~15 s) — from flash_attn.cute import …"."""
        c = self.choice
        if c is None:
            return f"{self.profile.name}: no recommendation ({self.notes[0] if self.notes else 'no measurements'})"
        over = ""
        if self.runner_up is not None and self.margin is not None:
            over = f", {self.margin * 100:+.0f} % over {self.runner_up.impl}"
        return (f"{self.profile.name}: {c.impl} {c.value:.0f} {self.unit}{over}; {c.install.describe()}; "
                f"{c.setting.describe()}")

    def as_measurements(self) -> Measurements:
        """The resolver's typed input for ``--prefer fastest``."""
        return Measurements(workload=self.profile.name, unit=self.unit, ranked=tuple(
            MeasuredImpl(c.impl, c.value or 0.0, c.source.describe() if c.source else "?", c.shapes,
                         c.setting.describe())
            for c in self.ranked()), notes=self.notes)


def _matches(profile: Profile, m: Measurement) -> bool:
    if profile.direction == "decode":
        return m.direction == "decode"
    return (m.direction == profile.direction and m.dtype == profile.dtype and m.headdim == profile.headdim
            and m.seqlen >= profile.min_seqlen and m.causal == profile.causal)


def _usable(ev: Evidence, ctx: NodeContext, notes: list[str]) -> bool:
    s = ev.source
    if s.kind == "prior":
        if s.gpu_model != ctx.gpu_model:
            return False
        if (s.torch, s.driver) != (ctx.torch, ctx.driver):
            notes.append(f"prior {s.origin} was measured with torch {s.torch}, driver {s.driver} (this node: torch "
                         f"{ctx.torch}, driver {ctx.driver}): re-verify the node for its own figures")
        return True
    if s.gpu_model != ctx.gpu_model:
        return False
    if (s.torch, s.driver) != (ctx.torch, ctx.driver):
        if s.kind == "node":
            notes.append(f"this node's measurements of {s.measured_at and s.measured_at[:10]} are stale (torch "
                         f"{s.torch}, driver {s.driver}; now torch {ctx.torch}, driver {ctx.driver}): not used; "
                         f"run `{ctx.verify_command}`")
        return False
    return True


@dataclass
class _Pooled:
    source: Source
    values: dict[tuple[str, str, int, int, bool], list[float]]
    version: str | None


def recommend(ctx: NodeContext, evidence: Sequence[Evidence], prof: Profile,
              costs: Mapping[str, InstallCost] | None = None) -> Recommendation:
    """The fastest correct implementation for ``prof`` on the node described by ``ctx``. Pure."""
    notes: list[str] = []
    usable = [ev for ev in evidence if _usable(ev, ctx, notes)]
    pooled: dict[str, _Pooled] = {}
    excluded: dict[str, tuple[str, Source]] = {}
    for kind in SOURCES:  # per implementation, the first tier that measured it wins
        tier = [ev for ev in usable if ev.source.kind == kind]
        found: dict[str, _Pooled] = {}
        for ev in tier:
            for m in ev.measurements:
                if m.impl in pooled or m.impl in excluded or not _matches(prof, m):
                    continue
                key = (m.impl, prof.dtype)
                if prof.direction != "decode" and m.impl != "sdpa_math" and not ev.checked.get(key, False):
                    why = ev.problems.get(key) or f"no passing correctness check for {prof.dtype}"
                    excluded[m.impl] = (f"failed correctness: {why}" if key in ev.problems else why, ev.source)
                    continue
                p = found.get(m.impl)
                if p is None:
                    src = ev.source
                    if kind == "fleet":
                        hosts = sorted({e.source.origin for e in tier})
                        src = Source("fleet", ", ".join(hosts[:3]) + (f" +{len(hosts) - 3}" if len(hosts) > 3 else ""),
                                     max(e.source.measured_at or "" for e in tier) or None, ev.source.gpu_model,
                                     ev.source.torch, ev.source.driver)
                    p = found[m.impl] = _Pooled(src, {}, ev.versions.get(m.impl))
                p.values.setdefault(m.shape, []).append(m.value)
        # a failed check anywhere in the tier excludes the implementation from that tier
        for impl in list(found):
            bad = next((ev for ev in tier if ev.checked.get((impl, prof.dtype)) is False), None)
            if bad is not None and prof.direction != "decode":
                excluded[impl] = (f"failed correctness: {bad.problems.get((impl, prof.dtype), 'see result')}",
                                  bad.source)
                del found[impl]
        pooled.update(found)
    costs = costs or {}
    measured = {impl: p for impl, p in pooled.items()}
    common: set[tuple[str, str, int, int, bool]] | None = None
    for p in measured.values():
        common = set(p.values) if common is None else common & set(p.values)
    if measured and not common:
        notes.append("the implementations were measured on different shapes: each is summarised over its own")
    cands: list[Candidate] = []
    for impl, p in measured.items():
        shapes = common if common else set(p.values)
        vals = [statistics.median(p.values[s]) for s in shapes if s in p.values]
        value = float(statistics.median(vals)) if vals else None
        cost = costs.get(impl, default_cost(impl))
        blocked = f"cannot be installed here: {cost.detail}" if cost.kind == "unavailable" else None
        cands.append(Candidate(impl, value, len(vals), p.source, cost, SETTINGS[impl], p.version, blocked))
    cands.sort(key=lambda c: (-(c.value or 0.0), INSTALL_ORDER.get(c.install.kind, 9), c.impl))
    live = [c for c in cands if c.excluded is None and c.value is not None]
    choice = live[0] if live else None
    runner = live[1] if len(live) > 1 else None
    if choice is not None and runner is not None:
        # a tie (within noise) goes to the cheaper install among the tied ones
        tied = [c for c in live if c.value is not None and choice.value is not None
                and choice.value / c.value - 1 < TIE_MARGIN]
        cheapest = min(tied, key=lambda c: (INSTALL_ORDER.get(c.install.kind, 9), -(c.value or 0.0), c.impl))
        if cheapest is not choice:
            notes.append(f"{choice.impl} and {cheapest.impl} are within {TIE_MARGIN * 100:.0f} % (measurement "
                         f"noise): {cheapest.impl} wins on install cost ({cheapest.install.describe()})")
            runner, choice = choice, cheapest
        elif len(tied) > 1:
            notes.append(f"{choice.impl} and {tied[1].impl} are within {TIE_MARGIN * 100:.0f} % (a tie)")
    margin = None
    if choice is not None and runner is not None and choice.value and runner.value:
        margin = choice.value / runner.value - 1
    for impl, (why, src) in excluded.items():
        cands.append(Candidate(impl, None, 0, src, costs.get(impl, default_cost(impl)), SETTINGS[impl],
                               None, why))
    if not measured and not excluded:
        where = "stored verifications or the built-in prior"
        notes.insert(0, f"no {prof.describe()} measurements for {ctx.gpu_model or 'this GPU'} in {where}" + (
            f": run `{ctx.verify_command}` (its end-to-end section measures decode per "
            "attn_implementation); the decode-kernel workload ranks the attention kernels alone"
            if prof.direction == "decode" else f": run `{ctx.verify_command}`"))
    elif choice is None:
        notes.insert(0, "every measured implementation is excluded (see candidates)")
    return Recommendation(ctx.hostname, ctx.gpu_model, prof, choice, runner, margin, tuple(cands), tuple(notes))


# ---------------------------------------------------------------------------
# Loading (I/O at the edge)
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def builtin_prior(path: Path = PRIOR_PATH) -> tuple[Evidence, ...]:
    """The built-in prior: real measurements from fixtures (scripts/attention_prior.py writes the file)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the attention prior {path}: {exc}",
                         hint="regenerate it: .venv/bin/python scripts/attention_prior.py") from None
    return tuple(Evidence.from_json(e) for e in obj["evidence"])


def node_evidence(s: Session, facts: NodeFacts, simulated: bool) -> list[Evidence]:
    """The node's latest stored result (kind node) and the fleet's latest per other node of its GPU model."""
    gpu = facts.gpus[0].name if facts.gpus else None
    out = []
    for r in verification_store.latest_results(s, gpu_model=gpu, simulated=simulated):
        kind = "node" if r.hostname == facts.hostname else "fleet"
        out.append(evidence_from_result(r, kind, origin=r.hostname))
    return out


def measurements_for(s: Session, facts: NodeFacts, simulated: bool, catalog: Catalog, workload: str) -> Measurements:
    """The resolver's typed input for ``--prefer fastest`` on one node (rollouts plan from it)."""
    rec = recommend(NodeContext.of(facts), (*node_evidence(s, facts, simulated), *builtin_prior()),
                    profile(workload), install_costs(facts, catalog))
    return rec.as_measurements()


def node_recommendations(s: Session, facts: NodeFacts, simulated: bool, catalog: Catalog,
                         workloads: Sequence[str] = WORKLOADS) -> list[Recommendation]:
    """A registered node's recommendation per workload: its stored evidence, the fleet's, then the prior (the
    API's node route and the dashboard's node page)."""
    return recommend_for(facts, catalog, node_evidence(s, facts, simulated), workloads)


def install_costs(facts: NodeFacts, catalog: Catalog) -> dict[str, InstallCost]:
    """Each FlashAttention's install cost on this node, from the resolver's own plans (pure: resolve is)."""
    out: dict[str, InstallCost] = {}
    installed = facts.flash_attn
    for impl, policy, variants in (("fa2", Policy(), ("fa2-wheel", "fa2-source")),
                                   ("fa4", Policy(fa4=True), ("fa4",)),
                                   ("fa3", Policy(fa3=True), ("fa3-source",))):
        if installed is not None and installed.variant.split("-", 1)[0] == impl:
            out[impl] = InstallCost("installed", 0.0, f"{installed.version} {installed.variant}")
            continue
        d = resolve(facts, catalog, policy)
        if d.variant not in variants:
            why = next((r.reason for r in d.rejected if r.candidate.startswith(variants[0].split("-")[0])),
                       d.reasons[-1] if d.reasons else d.variant)
            out[impl] = InstallCost("unavailable", None, why or d.variant)
        elif d.build is not None:
            out[impl] = InstallCost("source-build", d.build.estimated_minutes * 60.0,
                                    f"{d.variant} {d.flash_attn_version}")
        elif d.steps == ("verify",):
            out[impl] = InstallCost("installed", 0.0, f"{d.flash_attn_version}")
        else:
            out[impl] = InstallCost("wheel", WHEEL_INSTALL_S, f"{d.variant} {d.flash_attn_version}")
    return out


def recommend_for(facts: NodeFacts, catalog: Catalog, evidence: Iterable[Evidence],
                  workloads: Sequence[str] = WORKLOADS) -> list[Recommendation]:
    """Every workload's recommendation for one node (the prior appended to the given evidence)."""
    ctx = NodeContext.of(facts)
    costs = install_costs(facts, catalog)
    pool = (*evidence, *builtin_prior())
    return [recommend(ctx, pool, profile(w), costs) for w in workloads]


def render(recs: Sequence[Recommendation], indent: str = "  ") -> list[str]:
    """Lines for `fleetctl node` / `plan --explain`: the choice, the runner-up, every candidate."""
    out: list[str] = []
    for r in recs:
        out.append(f"{indent}{r.summary()}")
        for c in r.candidates:
            val = f"{c.value:7.0f}" if c.value is not None else "      -"
            src = c.source.describe() if c.source else "-"
            tail = f"  EXCLUDED: {c.excluded}" if c.excluded else f"  {c.install.describe()}"
            mark = "*" if r.choice is not None and c is r.choice else " "
            out.append(f"{indent}  {mark} {c.impl:<17}{val} {r.unit:<12} {src}{tail}")
        out.extend(f"{indent}  note: {n}" for n in r.notes[0 if r.choice is not None else 1:])
    return out


# ---------------------------------------------------------------------------
# What a node runs now, and the fleet report (pure)
# ---------------------------------------------------------------------------


def running_impl(facts: NodeFacts, workload: str) -> str:
    """The implementation a node uses today: its installed FlashAttention, else what torch's SDPA picks by
    default (the flash backend first), or ``sdpa`` for the decode workload (an attn_implementation)."""
    fa = facts.flash_attn
    family = fa.variant.split("-", 1)[0] if fa is not None else ""
    if workload == "decode":
        return "flash_attention_2" if family == "fa2" else "sdpa"
    return family if family in FLASH else "sdpa_flash"


def slower_than_best(rec: Recommendation, current: str) -> bool:
    """True when the node's current implementation measured more than ``TIE_MARGIN`` under the recommended one
    (or is not a measured correct candidate while one is)."""
    if rec.choice is None or rec.choice.value is None:
        return False
    now = next((c for c in rec.ranked() if c.impl == current), None)
    return now is None or (now.value or 0.0) < rec.choice.value * (1 - TIE_MARGIN)


@dataclass(frozen=True)
class ReportRow:
    gpu_model: str
    torch: str | None
    workload: str
    hostnames: tuple[str, ...]
    slower_hosts: tuple[str, ...]  # nodes running something slower than their own best
    recommendation: Recommendation

    @property
    def nodes(self) -> int:
        return len(self.hostnames)

    @property
    def slower(self) -> int:
        return len(self.slower_hosts)

    def to_json(self) -> dict[str, Any]:
        r = self.recommendation
        c = r.choice
        return {"gpu_model": self.gpu_model, "torch": self.torch, "workload": self.workload, "nodes": self.nodes,
                "slower_than_best": self.slower, "slower_hosts": list(self.slower_hosts),
                "recommended": c.impl if c else None, "setting": c.setting.to_json() if c else None,
                "unit": r.unit, "margin": None if r.margin is None else round(r.margin, 4),
                "runner_up": r.runner_up.impl if r.runner_up else None,
                "implementations": [{"impl": x.impl, "median": x.value, "source": x.source.describe()
                                     if x.source else None, "excluded": x.excluded, "install": x.install.to_json(),
                                     "version": x.version} for x in r.candidates],
                "notes": list(r.notes)}


def group_install_costs(per_node: Sequence[Mapping[str, InstallCost]]) -> dict[str, InstallCost]:
    """A GPU class's install cost per implementation: what it takes on its nodes that lack it — the cheapest
    of those, so one node that cannot install it does not hide that the others can — and "installed" only
    when every node has it."""
    out: dict[str, InstallCost] = {}
    for impl in sorted({i for costs in per_node for i in costs}):
        seen = [costs[impl] for costs in per_node if impl in costs]
        lacking = [c for c in seen if c.kind != "installed"]
        if not lacking:
            out[impl] = seen[0]
            continue
        cheapest = min(lacking, key=lambda c: (INSTALL_ORDER.get(c.kind, 9), c.seconds or 0.0))
        have = len(seen) - len(lacking)
        out[impl] = cheapest if not have else InstallCost(
            cheapest.kind, cheapest.seconds, "; ".join(x for x in (cheapest.detail,
                                                                  f"installed on {have} of {len(seen)} nodes") if x))
    return out


def report(nodes: Sequence[tuple[NodeFacts, Sequence[Evidence]]], workload: str,
           catalog: Catalog) -> list[ReportRow]:
    """Per GPU model × torch: the group's recommendation (each node's own evidence counts as the fleet's; install
    costs from ``group_install_costs``) and which of its nodes run something slower than their own best."""
    prof = profile(workload)
    groups: dict[tuple[str, str | None], list[tuple[NodeFacts, Sequence[Evidence]]]] = {}
    for facts, ev in nodes:
        key = (facts.gpus[0].name if facts.gpus else "", facts.torch.version if facts.torch else None)
        groups.setdefault(key, []).append((facts, ev))
    prior = builtin_prior()
    rows = []
    for (gpu, torch), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        pool = [Evidence(replace_kind(e.source, "fleet"), e.measurements, e.checked, e.problems, e.versions)
                for _, evs in members for e in evs]
        slower: list[str] = []
        per_node: list[dict[str, InstallCost]] = []
        for facts, evs in members:
            costs = install_costs(facts, catalog)
            per_node.append(costs)
            own = recommend(NodeContext.of(facts), (*evs, *pool, *prior), prof, costs)
            if slower_than_best(own, running_impl(facts, workload)):
                slower.append(facts.hostname)
        first = members[0][0]
        group = NodeContext("(group)", gpu, torch, first.driver.version if first.driver else None,
                            verify_args=f"--nodes 'gpu={gpu}'")
        group_rec = recommend(group, (*pool, *prior), prof, group_install_costs(per_node))
        rows.append(ReportRow(gpu, torch, workload, tuple(f.hostname for f, _ in members), tuple(slower),
                              group_rec))
    return rows


@dataclass(frozen=True)
class FleetReport:
    """``fleetctl attention report`` and the dashboard's attention page: one workload, every chosen node."""

    workload: str
    rows: tuple[ReportRow, ...]
    unreadable_facts: tuple[str, ...]  # nodes left out: their stored facts do not parse


def fleet_report(s: Session, catalog: Catalog, workload: str,
                 hostnames: Collection[str] | None = None) -> FleetReport:
    """The report over the registered nodes (only ``hostnames`` when given), each with its own latest stored
    verification as evidence."""
    profile(workload)  # an unknown workload is the caller's error, before any work
    members: list[tuple[NodeFacts, Sequence[Evidence]]] = []
    skipped: list[str] = []
    for row in s.scalars(select(Node).order_by(Node.hostname)):
        if hostnames is not None and row.hostname not in hostnames:
            continue
        record = record_of(row)
        if record.facts is None:
            skipped.append(row.hostname)
            continue
        own = [e for e in node_evidence(s, record.facts, record.simulated) if e.source.kind == "node"]
        members.append((record.facts, own))
    return FleetReport(workload, tuple(report(members, workload, catalog)), tuple(skipped))


def replace_kind(source: Source, kind: str) -> Source:
    return Source(kind, source.origin, source.measured_at, source.gpu_model, source.torch, source.driver,
                  source.machine)
