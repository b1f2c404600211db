"""Statuses keep their stored strings (DB and wire), and a rollout's progress is the same number everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from fleetctl.agent import wire as agent_wire
from fleetctl.controller import wire as controller_wire
from fleetctl.controller.rollout import service
from fleetctl.controller.rollout.core import BuildStatus, RolloutStatus, State
from fleetctl.controller.rollout.models import Build, Rollout, RolloutNode
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import Job, Node
from fleetctl.controller.web import sources
from fleetctl.fleet.jobs import FINISHED, JobOutcome, JobStatus


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'controller.db'}")


def test_job_statuses_round_trip_through_the_db_unchanged(store: Store) -> None:
    now = utcnow()
    with store.session() as s:
        s.add(Node(hostname="n1", facts={}, registered_at=now, facts_updated_at=now))
        for status in JobStatus:
            s.add(Job(id=f"j-{status}", node="n1", kind="install-wheel", vars={}, timeout_seconds=60,
                      status=status, created_at=now))
        s.add(Rollout(id="r1", version="2.8.3", status=RolloutStatus.ROLLING_BACK, created_by="t", created_at=now,
                      updated_at=now, finished_at=None))
        s.add(RolloutNode(rollout_id="r1", hostname="n1", batch=0, plan={}, state=State.ROLLED_BACK, updated_at=now))
        s.add(Build(build_key="k", status=BuildStatus.SUCCEEDED, created_at=now, attempts=0))
    with store.session() as s:
        # the plain strings the columns held before the enums: old rows read as before, new rows stay readable
        stored = {j: st for j, st in s.execute(select(Job.id, Job.status))}
        assert stored == {f"j-{st.value}": st.value for st in JobStatus}
        assert all(type(v) is str for v in stored.values())
        assert s.scalar(select(Rollout.status)) == "rolling-back"
        assert s.scalar(select(RolloutNode.state)) == "rolled-back"
        assert s.scalar(select(Build.status)) == "succeeded"


@pytest.mark.parametrize("status", sorted(FINISHED))
def test_job_results_cross_the_wire_unchanged(status: JobStatus) -> None:
    msg = agent_wire.result_to_proto("j1", JobOutcome("j1", status, 0, {"k": 1}, None))
    assert msg.status == status.value
    assert controller_wire.outcome_from_proto(msg).status == status


def _rollout_with_nodes(store: Store, status: RolloutStatus) -> str:
    now = utcnow()
    states = {"a": (0, State.DONE), "b": (0, State.FAILED), "c": (1, State.INSTALL), "d": (1, State.SKIPPED),
              "e": (1, State.PLANNED), "f": (-1, State.SKIPPED), "g": (2, State.ROLLED_BACK)}
    with store.session() as s:
        s.add(Rollout(id="r1", version="2.8.3", status=status, created_by="t", created_at=now, updated_at=now,
                      finished_at=None, batches=3))
        for host, (batch, state) in states.items():
            s.add(Node(hostname=host, facts={}, registered_at=now, facts_updated_at=now))
            s.add(RolloutNode(rollout_id="r1", hostname=host, batch=batch, plan={}, state=state, updated_at=now))
    return "r1"


@pytest.mark.parametrize("status", [RolloutStatus.ABORTING, RolloutStatus.RUNNING, RolloutStatus.PARTIAL])
def test_dashboard_and_status_show_the_same_progress(store: Store, status: RolloutStatus) -> None:
    rid = _rollout_with_nodes(store, status)
    st = service.get_status(store, rid)
    with store.session() as s:
        row = next(r for r in sources.rollouts(s) if r["id"] == rid)
        detail = sources.rollout_detail(s, rid)
    assert detail is not None
    p = st["progress"]
    assert (row["total"], row["done"], row["failed"]) == (p["total"], p["finished"], p["failed"]) == (7, 5, 1)
    assert (detail["total"], detail["done"], detail["failed"]) == (7, 5, 1)
    assert st["active"] is (status != RolloutStatus.PARTIAL)  # aborting still holds its nodes
    # per batch: the CLI's counts and the dashboard's batch status come from the same Progress
    cli = {b["batch"]: b for b in st["batch_progress"]}
    assert {k: (b["done"], b["failed"], b["skipped"], b["active"]) for k, b in cli.items()} == {
        0: (1, 1, 0, 0), 1: (0, 0, 1, 2), 2: (0, 0, 1, 0)}
    web = {b["index"]: b["status"] for b in detail["batches"]}
    assert web == {-1: "done", 0: "failed", 1: "running", 2: "done"}
    assert all(web[k] == b["status"] for k, b in cli.items())
