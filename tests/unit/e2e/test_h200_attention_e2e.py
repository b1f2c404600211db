"""Replays issue 16's real H200 run (tests/fixtures/h200_attention_e2e, `scripts/device/e2e_fa4.sh attention`,
docs/gpu-e2e.md): an offline controller with flash-attn-4's closure in its store, a real agent; a quick
verification of what the node had (SDPA only), `--prefer fastest` plans per workload, the rollout
`--prefer fastest --workload prefill` (FA4 wheels) with a full verification of every implementation present.

Today's recommendation and resolver, fed the stored results through their owners (the controller's own
database opened by today's store; the quick result recorded by verify_store into a fresh one), must say what the
device printed. Table cases on the real numbers (a near-tie, a failed FA4 check, a torch upgrade) follow."""

from __future__ import annotations

import copy
import datetime as dt
import gzip
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleetctl.controller.attention import (
    NodeContext,
    Recommendation,
    evidence_from_result,
    profile,
    recommend,
)
from fleetctl.controller.registry import record_of
from fleetctl.controller.store import Store, open_store
from fleetctl.controller.store.models import Node
from fleetctl.controller.verify_store import store as vs
from fleetctl.controller.verify_store.models import Verification
from fleetctl.fleet.facts import NodeFacts, parse_node
from fleetctl.fleet.verification import judge, parse_result, row_problems
from tests.unit.e2e.attention_replay import fastest_plan, recommendations

F = Path(__file__).resolve().parents[2] / "fixtures" / "h200_attention_e2e"
QUICK_JOB, INSTALL_JOB, FULL_JOB = ("376ba3e652194d0f822f4d459261c741", "a11199e37c9744088559e7bea252e949",
                                    "2e91b2a9376342659982cb7db1895139")
FA_ROWS = ("flash_attn", "fa1", "fa2", "fa3", "fa4")
WORKLOADS = ("training", "prefill", "decode", "decode-kernel")


def _load(name: str) -> Any:
    return json.loads((F / name).read_text())


def _job(job_id: str) -> dict[str, Any]:
    return _load(f"jobs/{job_id}.json")  # type: ignore[no-any-return]


def _raw(job_id: str) -> dict[str, Any]:
    return _job(job_id)["result"]["verification"]  # type: ignore[no-any-return]


def _facts_before() -> NodeFacts:
    """The facts of the first report: the end's, without flash-attn (facts history: only flash_attn changed)."""
    return replace(parse_node(_load("facts.json")), flash_attn=None)


def _printed(recs: list[Recommendation], text: str) -> None:
    """Each workload's line in `fleetctl node` ("decode    sdpa 359 new tokens/s +33 % over eager") as
    today's recommendation renders its figures."""
    for r in recs:
        assert r.choice is not None and r.choice.value is not None, r.profile.name
        figures = f"{r.profile.name} {r.choice.impl} {r.choice.value:.0f} {r.unit}"
        if r.runner_up is not None and r.margin is not None:
            figures += f" +{r.margin * 100:.0f} % over {r.runner_up.impl}"
        assert figures in " ".join(text.split()), (figures, text)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """The controller's database at the end of the run, opened (and migrated) by today's store."""
    db = tmp_path / "controller.db"
    with gzip.open(F / "controller.db.gz") as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    st = open_store(f"sqlite:///{db}")
    yield st
    st.close()


@pytest.fixture
def store_before(tmp_path: Path) -> Iterator[Store]:
    """What the controller knew after verification #1: the node without flash-attn, its quick result recorded."""
    st = open_store(f"sqlite:///{tmp_path / 'before.db'}")
    facts = _facts_before()
    now = dt.datetime.now(dt.UTC)
    with st.session() as s:
        s.add(Node(hostname="vm", status="degraded", facts=facts.to_json(), extra={}, simulated=False,
                   registered_at=now, facts_updated_at=now, last_seen=now, status_changed_at=now))
    with st.session() as s:
        vs.record(s, "vm", parse_result(_raw(QUICK_JOB)), job_id=QUICK_JOB, facts=facts, trigger="manual")
    yield st
    st.close()


# --- what ran ----------------------------------------------------------------------------------------------


def test_the_run_was_real_on_an_h200() -> None:
    meta = _load("meta.json")
    assert meta["simulated"] is False and meta["rehearsal"] is False
    facts = _load("facts.json")
    assert facts["gpus"][0]["name"] == "NVIDIA H200" and facts["torch"]["version"] == "2.11.0+cu130"
    assert facts["flash_attn"] == {"version": "4.0.0b36", "variant": "fa4"}
    assert [(_job(j)["kind"], _job(j)["status"]) for j in (QUICK_JOB, INSTALL_JOB, FULL_JOB)] == [
        ("verify", "successful"), ("install-wheel", "successful"), ("verify", "successful")]
    rerun = parse_result(_load("bench_rerun.json"))
    assert not rerun.simulated and rerun.gpu_model == "NVIDIA H200" and judge(rerun).passed
    timing = (F / "timing.txt").read_text()
    assert "rollout #1 (--prefer fastest --workload prefill): 208.0 s" in timing and "--fa4" not in timing


def test_the_quick_verification_before_install_holds_no_flashattention_rows() -> None:
    raw = _raw(QUICK_JOB)
    result = parse_result(raw)
    assert result.mode == "quick" and not result.passed and not raw["flash_attn"]["import_ok"]
    assert raw["reasons"] == ["flash_attn import failed: ModuleNotFoundError: No module named 'flash_attn'"]
    measured = [(e.impl, e.status) for rows in (result.speed, result.gqa, result.decode) for e in rows]
    assert measured and all(impl.startswith("sdpa_") for impl, status in measured if status == "ok")
    assert not [e for e in result.speed if e.impl in FA_ROWS and e.status == "ok"]
    assert {e.status for e in result.e2e} == {"skipped"}  # quick mode skips the end-to-end check
    ev = evidence_from_result(result, "node", origin="vm")
    assert {m.impl for m in ev.measurements} <= {"sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"}


def test_the_full_verification_measured_every_implementation_present_and_all_were_correct() -> None:
    raw = _raw(FULL_JOB)
    result = parse_result(raw)
    judged = judge(result)
    assert judged.passed and result.mode == "full" and not result.simulated, judged.reasons
    assert raw["flash_attn"]["implementation"] == "fa4" and raw["duration_s"] == pytest.approx(163.3, abs=0.1)
    assert {e.impl for e in result.speed} == {"fa4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math"}
    assert all(c.status == "ok" for c in result.correctness)
    # GQA 32/8 and MQA 32/1, fwd and fwd+bwd: FA4, SDPA flash and cuDNN measured and correct; mem-efficient
    # refuses unequal head counts (torch's reason kept)
    gqa = {(e.impl, e.heads_k, e.direction): e for e in result.gqa}
    assert len(gqa) == 16 and not [p for e in result.gqa for p in row_problems(e)]
    assert {k[0] for k, e in gqa.items() if e.status == "ok"} == {"fa4", "sdpa_flash", "sdpa_cudnn"}
    assert gqa[("sdpa_efficient", 8, "fwd")].status == "unsupported"
    assert gqa[("fa4", 8, "fwd")].tflops == pytest.approx(650.2, abs=0.1)
    # decode: seqlen_q 1 against 4k/16k caches; FA4 dense and paged (page_table), SDPA dense per backend
    dec = {(e.impl, e.paged, e.cache_len): e for e in result.decode}
    assert not [p for e in result.decode for p in row_problems(e)]
    assert dec[("fa4", True, 16384)].status == "ok" and dec[("fa4", True, 16384)].kv_gb_per_s == 2646.2
    assert dec[("fa4", False, 16384)].kv_gb_per_s == 3046.0 and dec[("sdpa_cudnn", False, 16384)].kv_gb_per_s == 4143.5
    assert dec[("fa4", True, 4096)].kv_gb_per_s == 575.1  # paged at 4k: under half the dense read rate
    # e2e per attn_implementation (Qwen2-1.5B dims, batch 8 × prompt 4096, 32 new tokens)
    e2e = {e.impl: e for e in result.e2e}
    assert {i: e.status for i, e in e2e.items()} == {
        "eager": "ok", "sdpa": "ok", "flash_attention_2": "unsupported", "flash_attention_3": "unsupported",
        "flash_attention_4": "ok"}
    got = {i: (e.decode_tokens_per_s, e.prefill_tokens_per_s) for i, e in e2e.items() if e.status == "ok"}
    assert got == {"eager": (209.3, 41954.7), "sdpa": (359.1, 147458.2), "flash_attention_4": (269.2, 151577.8)}


# --- the recommendation and the --prefer fastest plan, before and after ----------------------------------


def test_before_the_rollout_the_recommendation_came_from_the_prior(store_before: Store, tmp_path: Path) -> None:
    recs = recommendations(store_before, tmp_path)
    assert [r.profile.name for r in recs] == list(WORKLOADS)
    by = {r.profile.name: r for r in recs}
    for w in ("training", "prefill", "decode"):
        choice = by[w].choice
        assert choice is not None and choice.source is not None and choice.source.kind == "prior", w
    assert by["prefill"].choice is not None and by["prefill"].choice.impl == "fa4"
    assert by["decode"].choice is not None and by["decode"].choice.impl == "sdpa"
    kernel = by["decode-kernel"].choice  # the node's own SDPA decode rows, 4k only in quick mode
    assert kernel is not None and kernel.source is not None and kernel.source.kind == "node"
    _printed(recs, (F / "node-before.txt").read_text())


def test_before_the_rollout_fastest_planned_fa4_wheels_or_nothing(store_before: Store, tmp_path: Path) -> None:
    for w in ("training", "prefill"):
        variant, steps, _ = fastest_plan(store_before, tmp_path, w)
        assert (variant, steps) == ("fa4", ("install-wheel", "verify")), w
        row = (F / f"plan-fastest-{w}-before.txt").read_text().splitlines()[1].split()
        assert row[:6] == ["vm", "NVIDIA", "H200", "fa4", "4.0.0b36", "install-wheel,verify"], w
    (planned,) = _load("plan1.json")["nodes"]
    assert (planned["variant"], planned["version"], planned["steps"]) == ("fa4", "4.0.0b36",
                                                                            ["install-wheel", "verify"])
    variant, steps, reasons = fastest_plan(store_before, tmp_path, "decode")
    assert (variant, steps) == ("sdpa", ())
    assert reasons[0] in (F / "plan-fastest-decode-before.txt").read_text()


def test_after_the_rollout_the_nodes_own_measurements_decide(store: Store, tmp_path: Path) -> None:
    recs = recommendations(store, tmp_path)
    by = {r.profile.name: r for r in recs}
    expected = {  # workload: (choice, runner-up, value, margin) — what `fleetctl node vm` printed
        "training": ("fa4", "sdpa_cudnn", 544.5, 0.140),
        "prefill": ("fa4", "sdpa_cudnn", 638.8, 0.071),
        "decode": ("sdpa", "flash_attention_4", 359.1, 0.334),
        "decode-kernel": ("sdpa_cudnn", "sdpa_flash", 2990.6, 0.041),
    }
    for w, (choice, runner, value, margin) in expected.items():
        r = by[w]
        assert r.choice is not None and r.runner_up is not None and r.margin is not None, w
        assert (r.choice.impl, r.runner_up.impl) == (choice, runner), w
        assert r.choice.value == pytest.approx(value, abs=0.1) and r.margin == pytest.approx(margin, abs=0.001), w
        assert r.choice.source is not None and r.choice.source.kind == "node", w
        assert not [c for c in r.candidates if c.excluded], w
    eager = next(c for c in by["decode"].candidates if c.impl == "eager")
    assert eager.value == 209.3  # third in decode, behind FA4
    assert by["prefill"].choice is not None and by["prefill"].choice.install.kind == "installed"
    _printed(recs, (F / "node-after.txt").read_text())
    shown = {a["workload"]: a["choice"]["impl"] for a in _load("node.json")["attention"]["recommendations"]}
    assert shown == {w: e[0] for w, e in expected.items()}


def test_after_the_rollout_fastest_plans_only_verify_for_prefill_and_nothing_for_decode(
        store: Store, tmp_path: Path) -> None:
    for w in ("training", "prefill"):
        variant, steps, reasons = fastest_plan(store, tmp_path, w)
        assert (variant, steps) == ("fa4", ("verify",)), w
        assert "fa4 is the fastest measured" in reasons[0] and "this node, 2026-12-03" in reasons[0]
    variant, steps, reasons = fastest_plan(store, tmp_path, "decode")
    assert (variant, steps) == ("sdpa", ())
    assert reasons[0] in (F / "plan-fastest-decode-after.txt").read_text()
    assert "359 new tokens/s" in reasons[0] and "+33 % over flash_attention_4 (269)" in reasons[0]


def test_the_database_holds_both_verifications_and_the_rollout(store: Store) -> None:
    with store.session() as s:
        rows = list(s.scalars(select(Verification).order_by(Verification.recorded_at)))
    assert [(r.mode, r.passed, r.simulated, r.fa_variant) for r in rows] == [
        ("quick", False, False, None), ("full", True, False, "fa4")]
    rollout = _load("rollout1.json")
    assert rollout["status"] == "succeeded" and rollout["nodes"][0]["variant"] == "fa4"


# --- table cases on the real numbers ----------------------------------------------------------------------


def _real_full(change: Any = None) -> Any:
    raw = copy.deepcopy(_raw(FULL_JOB))
    if change is not None:
        change(raw)
    return evidence_from_result(parse_result(raw), "node", origin="vm")


def _ctx(store: Store) -> NodeContext:
    with store.session() as s:
        facts = record_of(s.scalars(select(Node)).one()).facts
    assert facts is not None
    return NodeContext.of(facts)


def test_the_second_sample_agrees_on_the_choice(store: Store) -> None:
    rerun = evidence_from_result(parse_result(_load("bench_rerun.json")), "node", origin="vm")
    for w, runner in (("prefill", "sdpa_cudnn"), ("training", "sdpa_cudnn")):
        a, b = (recommend(_ctx(store), [ev], profile(w)) for ev in (_real_full(), rerun))
        assert a.choice is not None and b.choice is not None and a.choice.impl == b.choice.impl == "fa4"
        assert b.runner_up is not None and b.runner_up.impl == runner
        assert a.choice.value is not None and b.choice.value is not None
        assert abs(a.choice.value / b.choice.value - 1) < 0.02, w  # run-to-run spread of the median


def test_fa4_within_3_percent_of_cudnn_is_a_tie_won_by_sdpa(store: Store) -> None:
    def fa4_at_cudnn_plus_2_percent(raw: dict[str, Any]) -> None:
        cudnn = {(e["dtype"], e["headdim"], e["seqlen"], e["causal"], e["direction"]): e["tflops"]
                 for e in raw["speed"] if e["impl"] == "sdpa_cudnn" and e["status"] == "ok"}
        for e in raw["speed"]:
            key = (e["dtype"], e["headdim"], e["seqlen"], e["causal"], e["direction"])
            if e["impl"] == "fa4" and key in cudnn:
                e["tflops"] = cudnn[key] * 1.02

    r = recommend(_ctx(store), [_real_full(fa4_at_cudnn_plus_2_percent)], profile("prefill"))
    assert r.choice is not None and r.choice.impl == "sdpa_cudnn"
    assert r.runner_up is not None and r.runner_up.impl == "fa4" and any("within 3 %" in n for n in r.notes)


def test_a_failed_fa4_check_excludes_it_and_cudnn_wins_on_the_real_numbers(store: Store) -> None:
    def fa4_wrong(raw: dict[str, Any]) -> None:
        for c in raw["correctness"]:
            if c["impl"] == "fa4" and c["dtype"] == "bfloat16":
                c.update(status="fail", fwd_rel_err=0.4)

    r = recommend(_ctx(store), [_real_full(fa4_wrong)], profile("prefill"))
    assert r.choice is not None and r.runner_up is not None and r.margin is not None
    assert (r.choice.impl, r.runner_up.impl) == ("sdpa_cudnn", "sdpa_flash")
    assert r.choice.value == pytest.approx(596.5, abs=0.1) and r.margin == pytest.approx(596.544 / 290.364 - 1)
    fa4 = next(c for c in r.candidates if c.impl == "fa4")
    assert fa4.excluded is not None and "failed correctness" in fa4.excluded

    def fa4_gqa_wrong(raw: dict[str, Any]) -> None:  # a wrong GQA row excludes it the same way
        for e in raw["gqa"]:
            if e["impl"] == "fa4":
                e["fwd_rel_err"] = 0.4

    gqa = recommend(_ctx(store), [_real_full(fa4_gqa_wrong)], profile("prefill"))
    assert gqa.choice is not None and gqa.choice.impl == "sdpa_cudnn"


@pytest.mark.parametrize("change", [{"torch": {"version": "2.12.0+cu130"}}, {"driver": {"version": "590.10.01"}}])
def test_a_torch_or_driver_change_makes_the_nodes_rows_stale(store: Store, tmp_path: Path,
                                                             change: dict[str, dict[str, str]]) -> None:
    with store.session() as s:
        node = s.scalars(select(Node)).one()
        facts = copy.deepcopy(node.facts)
        for part, values in change.items():
            facts[part].update(values)
        node.facts = facts
    by = {r.profile.name: r for r in recommendations(store, tmp_path)}
    prefill = by["prefill"]
    assert prefill.choice is not None and prefill.choice.source is not None
    assert prefill.choice.source.kind == "prior"  # the node's own 639 TFLOP/s no longer count
    assert any("stale" in n for n in prefill.notes)
    assert by["decode"].choice is not None and by["decode"].choice.source is not None
    assert by["decode"].choice.source.kind == "prior"
