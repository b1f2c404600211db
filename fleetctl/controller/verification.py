"""Pure verification logic of the controller: pass/fail and regression against the fleet.

``evaluate`` (from ``fleet.verification``) judges one result on its own.  This module
adds the fleet view: ``compute_baselines`` takes the latest results of the fleet and
gives, per GPU model (and real vs simulated — never mixed), the median TFLOP/s of every
shape; ``check_regression`` compares one node with its model's baseline and
``judge`` combines both: a node whose speed is below the median by more than the
policy's threshold (default 15 %) gets status ``regression``, not ``pass``.

How a node's speed is compared: for every shape of the policy's implementations
(the implementation the result verified — ``flash_attn``, ``fa3`` or ``fa4`` — by
default; ``sdpa_flash``/``sdpa_efficient`` for nodes that expect SDPA), forward only,
that both the node and a baseline with at least ``min_samples`` nodes have,
ratio = node TFLOP/s / fleet median; the node's score is the geometric mean of these
ratios (one slow shape among forty is noise, a consistently slower node is not), and
it regresses when score < 1 − threshold.  No storage, no I/O: table-tested.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.verification import (
    Verdict,
    VerificationResult,
    evaluate,
)
from fleetctl.fleet.verification import judge as fleet_judge

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_THRESHOLD",
    "FleetBaselines",
    "RegressionCheck",
    "RegressionPolicy",
    "ShapeBaseline",
    "ShapeComparison",
    "check_regression",
    "compute_baselines",
    "evaluate",
    "gpu_model_key",
    "judge",
]

DEFAULT_THRESHOLD = 0.15
ShapeKey = tuple[str, str, int, int, bool]  # (impl, dtype, headdim, seqlen, causal)
ModelKey = tuple[str, bool]  # (normalised GPU name, simulated)


def gpu_model_key(result: VerificationResult) -> ModelKey:
    """Which baseline a result belongs to: its GPU model, and whether it was simulated."""
    name = result.device.name or "unknown"
    name = re.sub(r"\s*\(simulated\)\s*$", "", name)
    return (re.sub(r"\s+", " ", name).strip().lower(), result.simulated)


@dataclass(frozen=True)
class ShapeBaseline:
    median_tflops: float
    samples: int  # how many nodes


@dataclass(frozen=True)
class FleetBaselines:
    by_model: Mapping[ModelKey, Mapping[ShapeKey, ShapeBaseline]]

    def for_result(self, result: VerificationResult) -> Mapping[ShapeKey, ShapeBaseline]:
        return self.by_model.get(gpu_model_key(result), {})


def compute_baselines(results: Iterable[VerificationResult], *, exclude_host: str | None = None,
                      only_passing: bool = True) -> FleetBaselines:
    """Median TFLOP/s per shape per GPU model over the given results (one per node: the
    caller passes each node's latest).  Failing results are left out by default so a
    broken node does not drag its model's baseline down."""
    samples: dict[ModelKey, dict[ShapeKey, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[ModelKey, str | None]] = set()
    for result in results:
        if exclude_host is not None and result.hostname == exclude_host:
            continue
        if only_passing and not evaluate(result).passed:
            continue
        key = gpu_model_key(result)
        if result.hostname is not None:
            if (key, result.hostname) in seen:
                raise UsageError(f"two results for node {result.hostname} given to compute_baselines",
                                 hint="pass only each node's latest result")
            seen.add((key, result.hostname))
        for entry in result.ok_speed():
            if entry.direction != "fwd":  # forward+backward is reported, not part of the fleet comparison
                continue
            if entry.tflops is not None and math.isfinite(entry.tflops) and entry.tflops > 0:
                samples[key][entry.shape_key].append(entry.tflops)
    return FleetBaselines({model: {shape: ShapeBaseline(statistics.median(vals), len(vals))
                                   for shape, vals in shapes.items()}
                           for model, shapes in samples.items()})


@dataclass(frozen=True)
class RegressionPolicy:
    threshold: float = DEFAULT_THRESHOLD  # fraction below the fleet median that counts as a regression
    min_samples: int = 3  # nodes of the same model needed before a shape's median means anything
    min_shapes: int = 1  # comparable shapes needed to judge at all
    impls: tuple[str, ...] | None = None  # None: the verified FlashAttention, or SDPA's for nodes expecting SDPA

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"regression threshold must be between 0 and 1, got {self.threshold}",
                             hint="e.g. 0.15 for 15 % below the fleet median")
        if self.min_samples < 1 or self.min_shapes < 1:
            raise UsageError("min_samples and min_shapes must be at least 1")

    def impls_for(self, result: VerificationResult) -> tuple[str, ...]:
        if self.impls is not None:
            return self.impls
        verified = result.verified_impl
        return (verified,) if verified is not None else ("sdpa_flash", "sdpa_efficient")


DEFAULT_POLICY = RegressionPolicy()  # what ControllerSettings.regression is unless flags or environment say otherwise


@dataclass(frozen=True)
class ShapeComparison:
    shape: ShapeKey
    tflops: float
    median_tflops: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.tflops / self.median_tflops

    def describe(self) -> str:
        impl, dtype, hd, seqlen, causal = self.shape
        return (f"{impl} {dtype} hd{hd} s{seqlen} {'causal' if causal else 'non-causal'}: {self.tflops:.1f} vs "
                f"median {self.median_tflops:.1f} TFLOP/s ({(self.ratio - 1) * 100:+.1f} %, n={self.samples})")


@dataclass(frozen=True)
class RegressionCheck:
    regressed: bool
    judged: bool  # False: not enough fleet data to compare
    score: float | None  # geometric mean of node/median over the compared shapes
    threshold: float
    compared: tuple[ShapeComparison, ...]
    reason: str

    @property
    def worst(self) -> tuple[ShapeComparison, ...]:
        return tuple(sorted(self.compared, key=lambda c: c.ratio)[:3])


def check_regression(result: VerificationResult, baselines: FleetBaselines,
                     policy: RegressionPolicy | None = None) -> RegressionCheck:
    policy = policy or RegressionPolicy()
    impls = policy.impls_for(result)
    base = baselines.for_result(result)
    compared = []
    for entry in result.ok_speed():
        if entry.impl not in impls or entry.direction != "fwd" or entry.tflops is None \
                or not math.isfinite(entry.tflops):
            continue
        b = base.get(entry.shape_key)
        if b is None or b.samples < policy.min_samples or b.median_tflops <= 0:
            continue
        compared.append(ShapeComparison(entry.shape_key, entry.tflops, b.median_tflops, b.samples))
    model = gpu_model_key(result)
    label = f"{model[0]}{' (simulated)' if model[1] else ''}"
    if len(compared) < policy.min_shapes:
        return RegressionCheck(False, False, None, policy.threshold, tuple(compared),
                               f"not compared: fewer than {policy.min_samples} other {label} nodes with "
                               f"{'/'.join(impls)} measurements")
    score = math.exp(sum(math.log(max(c.ratio, 1e-9)) for c in compared) / len(compared))
    regressed = score < 1.0 - policy.threshold
    worst = sorted(compared, key=lambda c: c.ratio)[:3]
    if regressed:
        reason = (f"regression: {'/'.join(impls)} speed is {(1 - score) * 100:.1f} % below the {label} fleet median "
                  f"over {len(compared)} shapes (threshold {policy.threshold * 100:g} %); worst: "
                  + "; ".join(c.describe() for c in worst))
    else:
        reason = (f"speed at {score * 100:.1f} % of the {label} fleet median over {len(compared)} shapes "
                  f"(threshold {policy.threshold * 100:g} % below)")
    return RegressionCheck(regressed, True, score, policy.threshold, tuple(compared), reason)


def judge(result: VerificationResult, baselines: FleetBaselines | None = None,
          policy: RegressionPolicy | None = None) -> Verdict:
    """The verdict the controller stores: ``fleet.verification.judge`` given this fleet comparison (a passing
    node slower than its model's baseline is ``regression``). The comparison runs only for a result that
    passes on its own."""
    if baselines is None or not evaluate(result).passed:
        return fleet_judge(result)
    check = check_regression(result, baselines, policy)
    return fleet_judge(result, fleet_regression=check.reason if check.regressed else None)
