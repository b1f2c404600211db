"""fleetctl.controller.verify_store.store: storage and retrieval, fleet baselines and regression, degraded state."""

from __future__ import annotations

import datetime as dt

from fleetctl.agent.verify.simulated import SimFaults, simulate_verification
from fleetctl.controller.store import Store
from fleetctl.controller.verification import RegressionPolicy
from fleetctl.controller.verify_store import store as vs
from fleetctl.controller.verify_store.models import Verification
from fleetctl.fleet.jobs import JobStatus
from fleetctl.fleet.verification import VerificationResult
from tests.unit.verify_store.conftest import AT, add_node, h100_facts

H100 = "NVIDIA H100 80GB HBM3"


def sim(host: str, *, minutes: int = 0, faults: SimFaults | None = None) -> VerificationResult:
    return simulate_verification(H100, node=host, mode="quick", at=AT + dt.timedelta(minutes=minutes),
                                 faults=faults, flash_attn_version="2.8.3.post1")


def test_record_stores_everything_and_reads_back(store: Store) -> None:
    add_node(store, "n1")
    with store.session() as s:
        row = vs.record(s, "n1", sim("n1"), job_id="job-1", trigger="manual")
        rid = row.id
    with store.session() as s:
        got = vs.get_result(s, "job-1")
        assert vs.get_result(s, str(rid))["job_id"] == "job-1"
        listed = vs.list_results(s, hostname="n1")
    assert got["status"] == "pass" and got["passed"] and got["simulated"]
    assert got["gpu_model"] == H100  # the facts' GPU name (what the dashboard groups by)
    assert got["facts"]["driver"]["version"] == "580.159.04"  # the snapshot it ran on
    assert got["flash_attn"]["version"] == "2.8.3.post1"
    assert got["mode"] == "quick" and got["trigger"] == "manual"
    assert got["tflops"] and got["sdpa_tflops"] and got["peak_mem_mib"]
    assert got["result"]["schema_version"] == 1 and got["result"]["status"] == "pass"
    assert [v["job_id"] for v in listed] == ["job-1"]
    # regression check could not be made: no other H100 node yet
    assert got["regression"]["judged"] is False


def test_record_on_unreadable_facts_files_the_result_under_its_own_device(store: Store) -> None:
    add_node(store, "n1", facts={"hostname": "n1", "gpus": "not a list"})
    with store.session() as s:
        vs.record(s, "n1", sim("n1"), job_id="job-1")
    with store.session() as s:
        got = vs.get_result(s, "job-1")
    assert got["gpu_model"] == H100  # the result's device, the snapshot vouching for nothing
    assert got["facts"] == {} and got["flash_attn"]["version"] == "2.8.3.post1"
    assert got["status"] == "pass"


def test_record_is_idempotent_per_job(store: Store) -> None:
    add_node(store, "n1")
    with store.session() as s:
        vs.record(s, "n1", sim("n1"), job_id="j")
        vs.record(s, "n1", sim("n1"), job_id="j")
    with store.session() as s:
        assert s.query(Verification).count() == 1


def test_job_without_result_is_an_error_row(store: Store) -> None:
    add_node(store, "n1")
    with store.session() as s:
        row = vs.record(s, "n1", None, job_id="j", job_status=JobStatus.TIMEOUT,
                        job_error="no result before the timeout")
        assert row.status == "timeout" and not row.passed and row.reasons == ["no result before the timeout"]


def _fleet(store: Store, n: int = 4) -> None:
    for i in range(n):
        add_node(store, f"n{i}")
        with store.session() as s:
            vs.record(s, f"n{i}", sim(f"n{i}"), job_id=f"base-{i}")


def test_slow_node_is_flagged_regression_against_the_fleet_median(store: Store) -> None:
    _fleet(store)
    add_node(store, "slow")
    with store.session() as s:
        row = vs.record(s, "slow", sim("slow", minutes=5, faults=SimFaults(slowdown=0.3)), job_id="slow-1")
        assert row.bench_status == "pass"  # fine on its own …
        assert row.status == "regression" and not row.passed  # … but 30 % below its model's median
        assert row.regression and row.regression["regressed"] and row.regression["score"] < 0.85
        assert "below the nvidia h100 80gb hbm3 (simulated) fleet median" in row.reasons[0]
        # a normal node of the same model still passes
        ok = vs.record(s, "n0", sim("n0", minutes=6), job_id="n0-2")
        assert ok.status == "pass" and ok.regression and ok.regression["judged"]


def test_threshold_is_configurable(store: Store) -> None:
    _fleet(store)
    add_node(store, "slow")
    with store.session() as s:
        row = vs.record(s, "slow", sim("slow", faults=SimFaults(slowdown=0.3)), job_id="s",
                        policy=RegressionPolicy(threshold=0.5))
        assert row.status == "pass"


def test_failed_nodes_do_not_drag_the_baseline(store: Store) -> None:
    _fleet(store, 3)
    add_node(store, "broken")
    with store.session() as s:
        vs.record(s, "broken", sim("broken", faults=SimFaults(nan=True)), job_id="b")
        base = vs.fleet_baselines(s)
    (model, shapes), = base.by_model.items()
    assert model == ("nvidia h100 80gb hbm3", True)
    assert all(b.samples == 3 for b in shapes.values())


def test_failure_marks_degraded_with_diagnosis_and_replan_then_pass_clears(store: Store) -> None:
    add_node(store, "vm", h100_facts("vm"))
    bad = sim("vm", faults=SimFaults.from_mapping({"import_error": True}))
    with store.session() as s:
        row = vs.record(s, "vm", bad, job_id="bad")
        assert row.status == "fail"
        change, state = vs.apply_health(s, row)
        assert change == "degraded" and state.degraded
        assert any("undefined symbol" in (d.get("excerpt") or "") for d in state.diagnosis)
        assert state.replan and state.replan["variant"] == "fa2-source"  # the fix on the node's current facts
        assert "diagnosis:" in state.reason and "re-plan: fa2-source" in state.reason
    with store.session() as s:
        health = vs.health_json(s, "vm")
        assert health["degraded"] and health["latest"][0]["status"] == "fail"
        ok = vs.record(s, "vm", sim("vm", minutes=10), job_id="ok")
        change, state = vs.apply_health(s, ok)
        assert change == "cleared" and not state.degraded and state.replan is None
        assert vs.health_json(s, "vm")["degraded"] is False


def test_dashboard_reads_the_view_of_the_stored_rows(store: Store) -> None:
    from fleetctl.controller.verify_store import views

    add_node(store, "n1")
    with store.session() as s:
        vs.record(s, "n1", sim("n1"), job_id="j1")
    with store.session() as s:
        hist = views.history(s, "n1")
        assert [h.job_id for h in hist] == ["j1"] and hist[0].passed and hist[0].tflops
        # the agent's clock is kept as measured_at; the controller's (now) orders and is what pages show
        assert hist[0].measured_at == sim("n1").finished_at and hist[0].at == hist[0].recorded_at
