"""Rollout core (controller/rollout/core.py) for busy GPUs and shared envs: the ``skipped-busy`` state, and a
shared target env installed once, its other nodes verifying after the installer."""

from __future__ import annotations

import pytest

from fleetctl.controller.rollout.core import (
    TERMINAL,
    Budget,
    NodeSnapshot,
    RolloutStatus,
    Snapshot,
    State,
    check_transition,
    next_actions,
    progress,
    shared_env_installers,
)
from fleetctl.fleet.errors import ConflictError


def snap(*nodes: NodeSnapshot) -> Snapshot:
    return Snapshot(RolloutStatus.RUNNING, list(nodes), {}, sum(n.state == State.FAILED for n in nodes), len(nodes),
                    Budget(count=1), 10, canary_batch=False)


@pytest.mark.parametrize("step", [State.BUILD, State.INSTALL, State.VERIFY])
def test_a_disturbing_step_may_end_skipped_busy(step: State) -> None:
    check_transition(step, State.SKIPPED_BUSY)
    check_transition(State.SKIPPED_BUSY, State.PLANNED)  # resume --retry-failed
    check_transition(State.SKIPPED_BUSY, State.ROLLING_BACK)
    with pytest.raises(ConflictError):
        check_transition(State.SKIPPED_BUSY, State.DONE)
    assert State.SKIPPED_BUSY in TERMINAL


def test_skipped_busy_is_not_a_failure_but_leaves_the_rollout_partial() -> None:
    p = progress({"done": 2, "skipped-busy": 1})
    assert (p.failed, p.skipped, p.finished, p.active) == (0, 1, 3, 0)
    acts = next_actions(snap(NodeSnapshot("a", State.DONE, 0), NodeSnapshot("b", State.SKIPPED_BUSY, 0)))
    assert acts.pause is None and acts.finish == RolloutStatus.PARTIAL  # not succeeded: b is left to do


def test_shared_env_nodes_start_after_their_installer() -> None:
    leader, follower = NodeSnapshot("a", State.INSTALL, 0, busy=True), NodeSnapshot("b", State.PLANNED, 0, after="a")
    assert next_actions(snap(leader, follower)).start == ()
    for end in (State.DONE, State.FAILED):
        assert next_actions(snap(NodeSnapshot("a", end, 0), follower)).start == ("b",)


def test_the_earliest_scheduled_node_of_a_shared_env_installs_it() -> None:
    keys = {"n1": "nfs4:srv:/export/venv", "n2": "nfs4:srv:/export/venv", "n3": "nfs4:srv:/export/venv",
            "own": "local:m1:8:1", "other": "local:m2:8:1", "unknown": None}
    batches = [["n3"], ["n1", "n2", "own"], ["other", "unknown"]]
    assert shared_env_installers(keys, list(keys), batches) == {"n1": "n3", "n2": "n3"}
    assert shared_env_installers(keys, ["n1", "own"], batches) == {}  # only nodes that install are grouped
