"""Result schema: round trip, strict validation, verdict re-derivation."""

from __future__ import annotations

import copy
import json
import math
from datetime import datetime
from typing import Any

import pytest

from fleetctl.agent.verify.model import VerificationResult, VerificationSchemaError, evaluate, parse_result
from fleetctl.agent.verify.simulated import SimFaults, simulate_verification


def _doc(at: datetime, **kw: Any) -> dict[str, Any]:
    return simulate_verification("H100", node="n1", mode="quick", at=at, **kw).to_json()


def test_round_trip_through_json(at: datetime) -> None:
    for mode in ("quick", "full"):
        result = simulate_verification("A100", node="gpu-7", mode=mode, at=at)
        again = VerificationResult.from_json(json.loads(json.dumps(result.to_json(), allow_nan=False)))
        assert again == result
        assert again.to_json() == result.to_json()


def test_round_trip_failure_results(at: datetime) -> None:
    for faults in (SimFaults(no_gpu=True), SimFaults(hang=True), SimFaults(import_error="ImportError: boom")):
        result = simulate_verification("L4", node="n", at=at, faults=faults)
        assert parse_result(json.loads(json.dumps(result.to_json()))) == result


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(mode="medium"), "mode"),
        (lambda d: d.update(status="great"), "status"),
        (lambda d: d.update(passed="yes"), "passed"),
        (lambda d: d.update(started_at="yesterday"), "started_at"),
        (lambda d: d.update(started_at="2026-01-01T00:00:00"), "started_at"),
        (lambda d: d.update(finished_at="2000-01-01T00:00:00+00:00"), "finished_at"),
        (lambda d: d["speed"][1].update(tflops="fast"), "speed[1].tflops"),
        (lambda d: d["speed"][0].update(tflops=-3.0), "speed[0].tflops"),
        (lambda d: d["speed"][0].update(impl="xformers"), "speed[0].impl"),
        (lambda d: d["speed"][0].pop("seqlen"), "speed[0].seqlen"),
        (lambda d: d["speed"][0].update(headdim=True), "speed[0].headdim"),
        (lambda d: d["correctness"][0].update(status="meh"), "correctness[0].status"),
        (lambda d: d["correctness"][0].update(simulated=False), "correctness[0].simulated"),
        (lambda d: d["flash_attn"].pop("import_ok"), "flash_attn.import_ok"),
        (lambda d: d.update(device=[]), "device"),
        (lambda d: d.update(speed={}), "speed"),
        (lambda d: d.update(passed=False), "passed"),
    ],
)
def test_strict_validation_names_the_field(at: datetime, mutate: Any, field: str) -> None:
    doc = _doc(at)
    mutate(doc)
    with pytest.raises(VerificationSchemaError) as err:
        parse_result(doc)
    assert err.value.field == field
    assert str(err.value).startswith(field)
    assert err.value.hint


def test_not_an_object() -> None:
    with pytest.raises(VerificationSchemaError, match="expected an object"):
        parse_result([1, 2])


def test_unknown_fields_are_ignored(at: datetime) -> None:
    doc = _doc(at)
    doc["future_field"] = {"x": 1}
    doc["speed"][0]["future"] = 1
    assert parse_result(doc).speed[0].impl == doc["speed"][0]["impl"]


def test_verdict_is_rederived_nan_error_fails(at: datetime) -> None:
    doc = _doc(at)
    assert doc["status"] == "pass"
    fa = next(e for e in doc["correctness"] if e["impl"] == "flash_attn")
    fa["dq_rel_err"] = math.nan  # a lying bench: status ok, passed true
    verdict = evaluate(parse_result(doc))
    assert verdict.status == "fail"
    assert any("dq relative error is nan" in r for r in verdict.reasons)


def test_entry_cannot_loosen_threshold(at: datetime) -> None:
    doc = _doc(at)
    fa = next(e for e in doc["correctness"] if e["impl"] == "flash_attn" and e["dtype"] == "bfloat16")
    fa.update(fwd_rel_err=0.1, threshold_fwd=1.0)
    verdict = evaluate(parse_result(doc))
    assert verdict.status == "fail"
    assert any("fwd relative error 0.1 > 0.02" in r for r in verdict.reasons)


@pytest.mark.parametrize(
    ("edit", "status", "needle"),
    [
        (lambda d: None, "pass", None),
        (lambda d: d["flash_attn"].update(import_ok=False, error="ImportError: undefined symbol: _ZN3c10"),
         "fail", "flash_attn import failed: ImportError: undefined symbol"),
        (lambda d: [e.update(status="timeout", reason="hung") for e in d["speed"] if e["impl"] == "flash_attn"][:0],
         "fail", "timeout: hung"),
        (lambda d: [e.update(status="oom", tflops=None) for e in d["speed"] if e["seqlen"] == 4096][:0],
         "pass", None),
        (lambda d: [e.update(status="error", reason="x") for e in d["speed"] if e["impl"] == "sdpa_cudnn"][:0],
         "pass", None),  # a baseline backend failing is a warning, not a failure
        (lambda d: [e.update(status="unsupported") for e in d["speed"] if e["impl"] == "flash_attn"][:0],
         "fail", "no speed measurement"),
        (lambda d: [e.update(nonfinite=["fwd"]) for e in d["correctness"] if e["impl"] == "flash_attn"][:0],
         "fail", "NaN/Inf in fwd"),
        (lambda d: [e.update(fwd_rel_err=0.5) for e in d["correctness"] if e["impl"] == "sdpa_flash"][:0],
         "pass", None),
        (lambda d: d.update(expect="sdpa", flash_attn={"import_ok": False, "error": "No module named flash_attn"}),
         "pass", None),
        (lambda d: d.update(status="timeout", passed=False, reasons=["overall timeout (300 s) reached"]),
         "timeout", "overall timeout"),
    ],
)
def test_evaluate_table(at: datetime, edit: Any, status: str, needle: str | None) -> None:
    doc = copy.deepcopy(_doc(at))
    edit(doc)
    verdict = evaluate(parse_result(doc))
    assert verdict.status == status, verdict.reasons
    if needle:
        assert any(needle in r for r in verdict.reasons), verdict.reasons
    else:
        assert not verdict.reasons
