"""Replays issue 16's real H200 run with FA2 in the same verification (tests/fixtures/h200_attention_fa2,
`scripts/device/e2e_fa4.sh attention-fa2`, docs/gpu-e2e.md): an offline controller holding flash-attn-4's
closure and a TRIMMED flash-attn 2.8.3 sdist (scripts/device/fa2_trim.py: FA2's own kernels for head dims
64/128 only, dropout/alibi/softcap/local compiled out, version 2.8.3+trim.hd64.hd128), a real agent; rollout #1
builds FA2 from that sdist on the node (build-from-source → upload → install → quick verification), rollout #2
installs FA4 beside it with one full verification of FA2, FA4 and every SDPA backend. That verify job carried no
``expect``, so bench.py verified FA2, not the FA4 the rollout installed; a rollout's verify job now expects what
its plan installs (``fa4`` here: tests/unit/rollout/test_verify_expect.py), and the run's own FA4 rows pass that.

Today's recommendation and resolver, fed the controller's own database, must say what the device printed; table
cases on the real numbers follow (FA2 against cuDNN without FA4, a failed FA2 check)."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
from collections.abc import Iterator
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
from fleetctl.controller.verify_store.models import Verification
from fleetctl.fleet.verification import expect_for_variant, judge, parse_result, row_problems
from tests.unit.e2e.attention_replay import fastest_plan, recommendations

F = Path(__file__).resolve().parents[2] / "fixtures" / "h200_attention_fa2"
BUILD_JOB, FA2_INSTALL_JOB, QUICK_JOB, FA4_INSTALL_JOB, FULL_JOB = (
    "5230f879aee14fd1ae95a03efbc9dd63", "ac9a4ab51dea499cb109d301035e1e46", "ed7f15c966544dba890fbb3e0fb032cb",
    "7481175d9a704423bb7d9d3fd9136820", "0f11ecb21e534e0288cca65c88181000")
TRIMMED = "2.8.3+trim.hd64.hd128"
TRIMMED_SDIST_SHA256 = "8e86a3f7eb3b09f654aa44eb5764afae3167b19be58bb54be89175746e8a402e"  # fa2_trim.py at 9c5aebd
SDPA = {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math"}


def _load(name: str) -> Any:
    return json.loads((F / name).read_text())


def _job(job_id: str) -> dict[str, Any]:
    return _load(f"jobs/{job_id}.json")  # type: ignore[no-any-return]


def _raw(job_id: str) -> dict[str, Any]:
    return _job(job_id)["result"]["verification"]  # type: ignore[no-any-return]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """The controller's database at the end of the run, opened (and migrated) by today's store."""
    db = tmp_path / "controller.db"
    with gzip.open(F / "controller.db.gz") as src, db.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    st = open_store(f"sqlite:///{db}")
    yield st
    st.close()


def _ctx(store: Store) -> NodeContext:
    with store.session() as s:
        facts = record_of(s.scalars(select(Node)).one()).facts
    assert facts is not None
    return NodeContext.of(facts)


def _real_full(change: Any = None) -> Any:
    raw = copy.deepcopy(_raw(FULL_JOB))
    if change is not None:
        change(raw)
    return evidence_from_result(parse_result(raw), "node", origin="vm")


# --- what ran ----------------------------------------------------------------------------------------------


def test_the_run_was_real_and_fa2_was_built_once_through_the_agent_from_the_trimmed_sdist() -> None:
    meta = _load("meta.json")
    assert meta["simulated"] is False and meta["rehearsal"] is False and "attention-fa2" in meta["what"]
    facts = _load("facts.json")
    assert facts["gpus"][0]["name"] == "NVIDIA H200" and facts["torch"]["version"] == "2.11.0+cu130"
    jobs = [(_job(j)["kind"], _job(j)["status"]) for j in (BUILD_JOB, FA2_INSTALL_JOB, QUICK_JOB, FA4_INSTALL_JOB,
                                                         FULL_JOB)]
    assert jobs == [("build-from-source", "successful"), ("install-wheel", "successful"), ("verify", "successful"),
                    ("install-wheel", "successful"), ("verify", "successful")]
    build = _job(BUILD_JOB)
    assert build["vars"]["sdist_sha256"] == TRIMMED_SDIST_SHA256  # the store's flash_attn-2.8.3.tar.gz: trimmed
    assert (build["vars"]["cuda_archs"], build["vars"]["max_jobs"]) == ("90", 16)
    built = build["result"]["built_wheel"]
    assert built["filename"] == f"flash_attn-{TRIMMED}-cp312-cp312-linux_x86_64.whl"
    assert built["artifact_sha256"] == built["sha256"]  # uploaded to the store, then installed from it
    events = [e["event"] for e in build["events"]]
    assert "fleet_artifact_fetch" in events and "fleet_artifact_upload" in events
    (b,) = _load("rollout1.json")["builds"]
    assert b["status"] == "succeeded" and b["artifact_sha256"] == built["sha256"]
    arts = {a["filename"]: a for a in _load("artifacts.json")["artifacts"]}
    assert arts["flash_attn-2.8.3.tar.gz"]["sha256"] == TRIMMED_SDIST_SHA256
    assert built["filename"] in arts
    timing = (F / "timing.txt").read_text()
    assert "build-from-source successful   255.1 s" in timing
    assert "rollout #2 (--fa4 beside FA2, full verification): 260.5 s" in timing


def test_fa4_installed_beside_fa2_and_both_imported() -> None:
    after1 = (F / "venv-after-rollout1.txt").read_text()
    assert f"flash-attn=={TRIMMED}" in after1 and "flash-attn-4 absent" in after1
    after2 = (F / "venv-after-rollout2.txt").read_text()
    assert f"flash-attn=={TRIMMED}" in after2 and "flash-attn-4==4.0.0b36" in after2 and "torch==2.11.0" in after2
    assert "pip check rc=0" in after2 and f"import flash_attn: ok, {TRIMMED}" in after2
    assert "import flash_attn.cute: ok" in after2 and "(FA4's, not in FA2 2.8.3): True" in after2
    (p1,) = _load("plan1.json")["nodes"]
    (p2,) = _load("plan2.json")["nodes"]
    assert (p1["variant"], p1["version"], p2["variant"]) == ("fa2-source", "2.8.3", "fa4")


def test_one_full_verification_measured_fa2_fa4_and_every_sdpa_backend() -> None:
    raw = _raw(FULL_JOB)
    result = parse_result(raw)
    judged = judge(result)
    assert judged.passed and result.mode == "full" and not result.simulated, judged.reasons
    found = {i["impl"]: (i["import_ok"], i["version"]) for i in raw["flash_attn_implementations"]}
    assert found == {"flash_attn": (True, TRIMMED), "fa4": (True, "4.0.0b36")}
    assert {e.impl for e in result.speed} == {"flash_attn", "fa4", *SDPA}
    assert all(c.status == "ok" for c in result.correctness)
    assert {c.impl for c in result.correctness} >= {"flash_attn", "flash_attn_varlen", "fa4", "sdpa_cudnn"}
    speed = {(e.impl, e.dtype, e.headdim, e.seqlen, e.causal, e.direction): e.tflops for e in result.speed}
    assert speed[("flash_attn", "bfloat16", 128, 8192, False, "fwd")] == pytest.approx(392.9, abs=0.1)
    assert speed[("fa4", "bfloat16", 128, 8192, False, "fwd")] == pytest.approx(748.6, abs=0.1)
    assert speed[("sdpa_cudnn", "bfloat16", 128, 8192, False, "fwd")] == pytest.approx(691.4, abs=0.1)
    # GQA/MQA and decode rows hold FA2 now, dense and paged (flash_attn_with_kvcache: the split-KV kernels)
    gqa = {(e.impl, e.heads_k, e.direction): e for e in result.gqa}
    assert not [p for e in result.gqa for p in row_problems(e)]
    assert all(gqa[("flash_attn", hk, d)].status == "ok" for hk in (8, 1) for d in ("fwd", "fwd_bwd"))
    dec = {(e.impl, e.paged, e.cache_len): e for e in result.decode}
    assert not [p for e in result.decode for p in row_problems(e)]
    assert dec[("flash_attn", True, 16384)].status == "ok" and dec[("flash_attn", True, 16384)].kv_gb_per_s == 3960.2
    e2e = {e.impl: e for e in result.e2e}
    assert {i: e.status for i, e in e2e.items()} == {
        "eager": "ok", "sdpa": "ok", "flash_attention_2": "ok", "flash_attention_3": "unsupported",
        "flash_attention_4": "ok"}
    assert (e2e["flash_attention_2"].decode_tokens_per_s, e2e["sdpa"].decode_tokens_per_s) == (280.3, 377.0)


# --- the recommendation and the --prefer fastest plan after --------------------------------------------------


def _printed(recs: list[Recommendation], text: str) -> None:
    """Each workload's line in `fleetctl node` ("prefill   fa4 672 TFLOP/s +15 % over sdpa_cudnn")."""
    for r in recs:
        assert r.choice is not None and r.choice.value is not None, r.profile.name
        figures = f"{r.profile.name} {r.choice.impl} {r.choice.value:.0f} {r.unit}"
        if r.runner_up is not None and r.margin is not None:
            figures += f" +{r.margin * 100:.0f} % over {r.runner_up.impl}"
        assert figures in " ".join(text.split()), (figures, text)


def test_the_nodes_own_measurements_rank_fa2_behind_fa4_and_cudnn(store: Store, tmp_path: Path) -> None:
    recs = recommendations(store, tmp_path)
    by = {r.profile.name: r for r in recs}
    expected = {  # workload: (choice, runner-up, value, margin, FA2's value) — what `fleetctl node vm` printed
        "training": ("fa4", "sdpa_cudnn", 544.9, 0.142, 280.6),
        "prefill": ("fa4", "sdpa_cudnn", 671.5, 0.150, 312.5),
        "decode-kernel": ("sdpa_cudnn", "fa2", 3333.2, 0.142, 2918.9),
    }
    for w, (choice, runner, value, margin, fa2) in expected.items():
        r = by[w]
        assert r.choice is not None and r.runner_up is not None and r.margin is not None, w
        assert (r.choice.impl, r.runner_up.impl) == (choice, runner), w
        assert r.choice.value == pytest.approx(value, abs=0.1) and r.margin == pytest.approx(margin, abs=0.001), w
        assert r.choice.source is not None and r.choice.source.kind == "node", w
        assert next(c.value for c in r.candidates if c.impl == "fa2") == pytest.approx(fa2, abs=0.1), w
        assert not [c for c in r.candidates if c.excluded], w
    decode = {c.impl: c.value for c in by["decode"].candidates}
    assert decode == {"sdpa": 377.0, "eager": 281.6, "flash_attention_2": 280.3, "flash_attention_4": 182.8}
    _printed(recs, (F / "node-after.txt").read_text())


def test_fastest_plans_fa4_for_prefill_and_training_and_nothing_for_decode(store: Store, tmp_path: Path) -> None:
    for w in ("training", "prefill"):
        variant, steps, reasons = fastest_plan(store, tmp_path, w)
        # the node's facts carry one flash_attn, FA2's (the import package FA4 installs into): FA4 looks absent,
        # so the plan installs it again (install-wheel finds it installed and leaves it) and says it replaces FA2
        assert (variant, steps) == ("fa4", ("install-wheel", "verify")), w
        assert "this node, 2026-12-03" in reasons[0] and f"replaces the installed flash-attn {TRIMMED}" in reasons[-1]
        row = (F / f"plan-fastest-{w}-after.txt").read_text().splitlines()[1].split()
        assert row[:6] == ["vm", "NVIDIA", "H200", "fa4", "4.0.0b36", "install-wheel,verify"], w
    variant, steps, reasons = fastest_plan(store, tmp_path, "decode")
    assert (variant, steps) == ("sdpa", ())
    assert reasons[0] in (F / "plan-fastest-decode-after.txt").read_text()
    assert "377 new tokens/s" in reasons[0] and "+34 % over flash_attention_2 (280)" in reasons[0]


def test_the_database_holds_both_verifications_and_both_rollouts(store: Store) -> None:
    with store.session() as s:
        rows = list(s.scalars(select(Verification).order_by(Verification.recorded_at)))
    assert [(r.mode, r.passed, r.simulated) for r in rows] == [("quick", True, False), ("full", True, False)]
    assert [_load(f"rollout{n}.json")["status"] for n in (1, 2)] == ["succeeded", "succeeded"]


def test_the_fa4_rollout_was_judged_on_fa2_and_its_fa4_rows_pass_as_an_fa4_verification() -> None:
    """The gap the run found: rollout #2's verify job had no ``expect`` (bench.py's default, flash_attn: FA2 when
    installed). Today's engine sends what plan2 installs, ``fa4``; judged so, the run's own FA4 rows pass."""
    job = _job(FULL_JOB)
    raw = copy.deepcopy(_raw(FULL_JOB))
    (p2,) = _load("plan2.json")["nodes"]
    assert "expect" not in job["vars"] and raw["expect"] == "flash_attn" and raw["flash_attn"]["impl"] == "flash_attn"
    assert expect_for_variant(p2["variant"]) == "fa4"  # what RolloutEngine._job_vars sends for it now
    raw["expect"] = "fa4"
    raw["flash_attn"] = next(i for i in raw["flash_attn_implementations"] if i["impl"] == "fa4")
    as_fa4 = parse_result(raw)
    judged = judge(as_fa4)
    assert judged.passed and as_fa4.verified_impl == "fa4", judged.reasons


# --- table cases on the real numbers ----------------------------------------------------------------------


def _without(impl: str) -> Any:
    def drop(raw: dict[str, Any]) -> None:
        for part in ("speed", "correctness", "gqa", "decode"):
            raw[part] = [e for e in raw[part] if e["impl"] != impl]
    return drop


def test_without_fa4_cudnn_beats_the_fa2_build_for_prefill_and_training(store: Store) -> None:
    """A node with FA2 and SDPA only (the issue's 'FA2 because it installs'): cuDNN, which ships with torch, is
    87 % faster than FA2 for prefill on the same GPU, so the answer is nothing to build."""
    for w, margin in (("prefill", 0.869), ("training", 0.701)):
        r = recommend(_ctx(store), [_real_full(_without("fa4"))], profile(w))
        assert r.choice is not None and r.runner_up is not None and r.margin is not None
        assert (r.choice.impl, r.runner_up.impl) == ("sdpa_cudnn", "fa2"), w
        assert r.margin == pytest.approx(margin, abs=0.001), w


def test_a_failed_fa2_check_excludes_it(store: Store) -> None:
    def fa2_wrong(raw: dict[str, Any]) -> None:
        for e in raw["decode"]:
            if e["impl"] == "flash_attn":
                e["fwd_rel_err"] = 0.4

    r = recommend(_ctx(store), [_real_full(fa2_wrong)], profile("decode-kernel"))
    assert r.choice is not None and r.runner_up is not None
    assert (r.choice.impl, r.runner_up.impl) == ("sdpa_cudnn", "sdpa_flash")  # FA2's wrong rows do not count
    assert "fa2" not in {c.impl for c in r.candidates}

    def fa2_grid_wrong(raw: dict[str, Any]) -> None:
        for c in raw["correctness"]:
            if c["impl"] == "flash_attn" and c["dtype"] == "bfloat16":
                c.update(status="fail", fwd_rel_err=0.4)

    r = recommend(_ctx(store), [_real_full(fa2_grid_wrong)], profile("prefill"))
    fa2 = next(c for c in r.candidates if c.impl == "fa2")
    assert fa2.excluded is not None and "failed correctness" in fa2.excluded
