"""Replay the committed real-H100 runs (tests/fixtures/h100) through the schema parser, evaluate(),
the store and the resolver."""

from __future__ import annotations

import json

import pytest

from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import Policy, resolve
from fleetctl.controller.store import Store
from fleetctl.controller.verify_store import store as vs
from fleetctl.fleet.facts import parse_node
from fleetctl.fleet.verification import VerificationResult, evaluate, parse_result
from tests.unit.verify_store.conftest import FIXTURES, add_node, h100_facts


def load(name: str) -> VerificationResult:
    return parse_result(json.loads((FIXTURES / name).read_text()))


def test_full_fa2_run_passes() -> None:
    r = load("verify_full_fa2.json")
    assert not r.simulated and r.mode == "full" and r.device.name == "NVIDIA H100 80GB HBM3"
    assert r.flash_attn.import_ok and r.flash_attn.version == "2.8.3.post1"
    assert evaluate(r).status == "pass"
    assert r.duration_s < 60  # the budget for a full run on an H100
    assert len(r.correctness) == 36 and all(c.status == "ok" for c in r.correctness)
    fa = {(e.seqlen, e.causal): e.tflops for e in r.ok_speed("flash_attn") if e.dtype == "bfloat16"
          and e.headdim == 128}
    assert fa and all(t is not None and 150 < t < 450 for t in fa.values())
    e2e = {e.impl: e.tokens_per_s for e in r.e2e}
    assert e2e == {"flash_attention_2": pytest.approx(461.5, abs=0.1), "sdpa": pytest.approx(126.9, abs=0.1),
                   "eager": pytest.approx(717.7, abs=0.1)}


def test_no_flash_attn_run_fails_on_import() -> None:
    v = evaluate(load("verify_full_no_fa.json"))
    assert v.status == "fail" and "No module named 'flash_attn'" in v.reasons[0]


def test_fault_run_records_hang_nan_and_oom() -> None:
    r = load("verify_faults.json")
    v = evaluate(r)
    assert v.status == "fail"
    statuses = {e.status for e in r.speed}
    assert {"oom", "timeout"} <= statuses  # an OOM per shape is recorded, not fatal; the hang timed out
    nan = [c for c in r.correctness if c.nonfinite]
    assert nan and all(c.status == "fail" for c in nan)
    assert r.restarts >= 1  # the hung worker was killed and a fresh one continued


def test_fixtures_go_through_the_store(store: Store) -> None:
    add_node(store, "vm", h100_facts("vm"))
    with store.session() as s:
        ok = vs.record(s, "vm", load("verify_full_fa2.json"), job_id="full")
        assert ok.status == "pass" and not ok.simulated and ok.mode == "full"
        assert ok.tflops and ok.sdpa_tflops and ok.tflops > 300
        assert ok.fa_version is None or ok.fa_version == "2.8.3.post1"
        bad = vs.record(s, "vm", load("verify_full_no_fa.json"), job_id="nofa")
        change, state = vs.apply_health(s, bad)
        assert change == "degraded"
        assert state.replan and state.replan["variant"] == "fa2-source"
        faults = vs.record(s, "vm", load("verify_faults.json"), job_id="faults")
        assert faults.status == "fail" and faults.result and faults.result["status"] == "fail"
    with store.session() as s:
        listed = vs.list_results(s, hostname="vm")
        assert sorted(v["job_id"] for v in listed) == ["faults", "full", "nofa"]  # newest run first
        assert vs.get_result(s, "full")["result"]["device"]["driver"] == "580.159.04"


def test_h100_facts_plan_a_source_build_for_sm90() -> None:
    d = resolve(parse_node(h100_facts()), builtin_catalog(), Policy())
    assert d.variant == "fa2-source" and d.flash_attn_version == "2.8.3.post1"
    build = d.to_json()["build"]
    assert build["env"]["FLASH_ATTN_CUDA_ARCHS"] == "90" and build["env"]["MAX_JOBS"] == "16"
    assert build["cuda_archs"] == ["90"] and build["max_jobs"] == 16
