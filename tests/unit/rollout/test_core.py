"""Table tests of the pure rollout core."""

from __future__ import annotations

import pytest

from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.rollout.core import (
    ACTIVE_ROLLOUT,
    Actions,
    BatchSize,
    BatchStatus,
    Budget,
    BuildSnapshot,
    BuildStatus,
    NodeInfo,
    NodePlan,
    NodeSnapshot,
    RolloutStatus,
    Snapshot,
    State,
    budget_exceeded,
    check_transition,
    choose_canaries,
    group_builds,
    next_actions,
    next_state,
    parse_batches,
    parse_budget,
    parse_selector,
    pick_previous_wheel,
    progress,
    schedule_batches,
    select_nodes,
    work_states,
)
from fleetctl.fleet.errors import ConflictError, UsageError

NODES = [
    NodeInfo("h100-a", "NVIDIA H100 80GB HBM3", "h100", NodeStatus.ONLINE),
    NodeInfo("h100-b", "NVIDIA H100 80GB HBM3", "h100", NodeStatus.OFFLINE),
    NodeInfo("a100-a", "NVIDIA A100-SXM4-80GB", "a100", NodeStatus.ONLINE),
    NodeInfo("t4-a", "Tesla T4", "t4", NodeStatus.DEGRADED),
    NodeInfo("rtx-a", "NVIDIA GeForce RTX 4090", None, NodeStatus.ONLINE),
]


@pytest.mark.parametrize(("selector", "expected"), [
    (None, ["a100-a", "h100-a", "h100-b", "rtx-a", "t4-a"]),
    ("all", ["a100-a", "h100-a", "h100-b", "rtx-a", "t4-a"]),
    ("h100-*", ["h100-a", "h100-b"]),
    ("h100-a,t4-a", ["h100-a", "t4-a"]),
    ("gpu=H100", ["h100-a", "h100-b"]),
    ("gpu=h100", ["h100-a", "h100-b"]),
    ("gpu=A100", ["a100-a"]),  # whole word: "A100" does not match "H100"
    ("gpu=*4090", ["rtx-a"]),
    ("gpu=H100,gpu=T4", ["h100-a", "h100-b", "t4-a"]),
    ("gpu=H100,status=online", ["h100-a"]),
    ("profile=t4", ["t4-a"]),
    ("status=degraded", ["t4-a"]),
    ("*-a,gpu=H100", ["h100-a"]),
    ("host=rtx-?", ["rtx-a"]),
])
def test_selection(selector: str | None, expected: list[str]) -> None:
    assert [n.hostname for n in select_nodes(parse_selector(selector), NODES)] == expected


@pytest.mark.parametrize(("selector", "message"), [
    ("colour=red", "unknown selector key 'colour'"),
    ("gpu=", "bad value"),
    ("a,,b", "empty term"),
    ("status=sleepy", "unknown status"),
    ("node;rm -rf /", "bad value"),
])
def test_selection_bad(selector: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_selector(selector)


def test_empty_selection_is_an_error() -> None:
    with pytest.raises(UsageError, match="matches no node") as exc:
        select_nodes(parse_selector("gpu=B200"), NODES)
    assert exc.value.hint is not None and "h100-a" in exc.value.hint


def plan(host: str, gpu: str = "H100", variant: str = "fa2-wheel", key: str | None = None,
         steps: tuple[str, ...] = ("install-wheel", "verify")) -> NodePlan:
    if key is not None and steps == ("install-wheel", "verify"):
        steps = ("build-from-source", "verify")
    return NodePlan(host, variant, steps, gpu=gpu, build_key=key)


PLANS = [plan("n1"), plan("n2"), plan("n3", variant="fa2-source", key="k1"), plan("n4", gpu="A100"),
         plan("n5", gpu="T4", variant="fa1-source", key="k2"), plan("n6", gpu="K80", variant="sdpa", steps=())]


@pytest.mark.parametrize(("count", "expected"), [
    (None, ["n1", "n3", "n4", "n5"]),  # one per (gpu, variant); skipped n6 never a canary
    (0, []),
    (1, ["n4"]),
    (2, ["n3", "n4"]),
    (5, ["n1", "n2", "n3", "n4", "n5"]),
    (50, ["n1", "n2", "n3", "n4", "n5"]),
])
def test_canaries(count: int | None, expected: list[str]) -> None:
    assert choose_canaries(PLANS, count) == expected


@pytest.mark.parametrize(("text", "expected"), [
    (None, [BatchSize(1), BatchSize(5), BatchSize(percent=25)]),
    ("1,5,25%", [BatchSize(1), BatchSize(5), BatchSize(percent=25)]),
    ("10", [BatchSize(10)]),
    ("100%", [BatchSize(percent=100)]),
])
def test_parse_batches(text: str | None, expected: list[BatchSize]) -> None:
    assert parse_batches(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "x", "0%", "101%", "1,,2", "5%%"])
def test_parse_batches_bad(text: str) -> None:
    with pytest.raises(UsageError):
        parse_batches(text)


HOSTS = [f"n{i:02d}" for i in range(20)]


@pytest.mark.parametrize(("sizes", "canaries", "expected"), [
    ("1,5,25%", (), [1, 5, 5, 5, 4]),
    ("1,5,25%", ("n00", "n07"), [2, 1, 5, 5, 5, 2]),
    ("50%", (), [10, 10]),
    ("3", (), [3] * 6 + [2]),
    ("100", (), [20]),
])
def test_schedule(sizes: str, canaries: tuple[str, ...], expected: list[int]) -> None:
    batches = schedule_batches(HOSTS, parse_batches(sizes), canaries)
    assert [len(b) for b in batches] == expected
    assert sorted(h for b in batches for h in b) == HOSTS  # every node exactly once
    if canaries:
        assert batches[0] == sorted(canaries)


@pytest.mark.parametrize(("text", "total", "allowed"), [
    (None, 100, 10), ("10%", 5, 0), ("0", 50, 0), ("3", 50, 3), ("50%", 7, 3), ("100%", 4, 4),
])
def test_budget(text: str | None, total: int, allowed: int) -> None:
    b = parse_budget(text)
    assert b.allowed(total) == allowed
    assert not budget_exceeded(allowed, total, b)
    assert budget_exceeded(allowed + 1, total, b)


@pytest.mark.parametrize("text", ["-1", "x", "101%", "1.5"])
def test_budget_bad(text: str) -> None:
    with pytest.raises(UsageError):
        parse_budget(text)


@pytest.mark.parametrize(("old", "new", "ok"), [
    ("planned", "keyring", True), ("planned", "install", True), ("planned", "skipped", True),
    ("keyring", "toolkit", True), ("toolkit", "build", True), ("build", "verify", True),
    ("waiting", "install", True), ("waiting", "build", True), ("install", "verify", True),
    ("verify", "done", True), ("verify", "failed", True), ("done", "rolling-back", True),
    ("rolling-back", "rolled-back", True), ("failed", "planned", True), ("failed", "verify", True),
    ("done", "planned", False), ("done", "failed", False), ("planned", "done", False),
    ("install", "build", False), ("verify", "install", False), ("rolled-back", "planned", False),
    ("skipped", "done", False), ("toolkit", "keyring", False),
])
def test_transitions(old: str, new: str, ok: bool) -> None:
    if ok:
        check_transition(old, new)
    else:
        with pytest.raises(ConflictError, match="not allowed"):
            check_transition(old, new)


@pytest.mark.parametrize(("steps", "builder", "expected"), [
    (("install-wheel", "verify"), False, ["install", "verify"]),
    (("apt-keyring-fix", "cuda-toolkit", "build-from-source", "verify"), True,
     ["keyring", "toolkit", "build", "install", "verify"]),
    (("apt-keyring-fix", "cuda-toolkit", "build-from-source", "verify"), False,
     ["keyring", "toolkit", "waiting", "install", "verify"]),
    (("verify",), False, ["verify"]),
])
def test_work_states(steps: tuple[str, ...], builder: bool, expected: list[str]) -> None:
    p = NodePlan("x", "fa2-source", steps, build_key="k")
    assert [str(s) for s in work_states(p, builder)] == expected
    seq = [State.PLANNED, *work_states(p, builder)]
    for a, b in zip(seq, [*seq[1:], State.DONE], strict=True):
        assert next_state(p, builder, a) == b
        check_transition(a, b)


def test_group_builds_one_builder_per_key_earliest_batch() -> None:
    plans = [plan("a", key="k1"), plan("b", key="k1"), plan("c", key="k2"), plan("d"), plan("e", key="k2")]
    batches = [["b", "c"], ["a", "d", "e"]]
    assert group_builds(plans, batches) == {"k1": "b", "k2": "c"}
    assert group_builds(plans, batches, {"k2": "e"}) == {"k1": "b", "k2": "e"}


def snap(nodes: list[NodeSnapshot], *, status: RolloutStatus = RolloutStatus.RUNNING,
         builds: dict[str, BuildSnapshot] | None = None, budget: str = "1", parallel: int = 10,
         canary: bool = True, ack: bool = False) -> Snapshot:
    return Snapshot(status, nodes, builds or {}, sum(n.state == State.FAILED for n in nodes), len(nodes),
                    parse_budget(budget), parallel, canary, ack)


N = NodeSnapshot
P, D, F, W = State.PLANNED, State.DONE, State.FAILED, State.WAITING


@pytest.mark.parametrize(("s", "expected"), [
    # canaries first, nothing from batch 1 while batch 0 is open
    (snap([N("c", P, 0), N("x", P, 1)]), Actions(start=("c",), current_batch=0)),
    # batch 0 done → batch 1 starts, limited by max-parallel
    (snap([N("c", D, 0), N("x", P, 1), N("y", P, 1)], parallel=1), Actions(start=("x",), current_batch=1)),
    # busy nodes count against max-parallel
    (snap([N("c", D, 0), N("x", State.INSTALL, 1, busy=True), N("y", P, 1)], parallel=1),
     Actions(current_batch=1)),
    # a failed canary pauses before batch 1
    (snap([N("c", F, 0), N("x", P, 1)], budget="5"), Actions(pause="canary failed: c", current_batch=1)),
    # ... unless the operator resumed past it
    (snap([N("c", F, 0), N("x", P, 1)], budget="5", ack=True), Actions(start=("x",), current_batch=1)),
    # budget exceeded → pause with reason
    (snap([N("a", F, 0), N("b", F, 1), N("c", P, 1)], budget="1", canary=False),
     Actions(pause="failure budget exceeded: 2 failed, --max-failures 1 allows 1 of 3")),
    # waiting on a running build: not started; builder waiting node is started
    (snap([N("a", State.BUILD, 0, "k", busy=True, builder=True), N("b", W, 0, "k")], canary=False,
          builds={"k": BuildSnapshot("k", BuildStatus.BUILDING, "a")}), Actions(current_batch=0)),
    (snap([N("b", W, 0, "k", builder=True)], canary=False, builds={"k": BuildSnapshot("k", BuildStatus.PENDING, "b")}),
     Actions(start=("b",), current_batch=0)),
    # build succeeded → waiting nodes start (install)
    (snap([N("a", D, 0, "k"), N("b", W, 0, "k")], canary=False,
          builds={"k": BuildSnapshot("k", BuildStatus.SUCCEEDED, "a")}),
     Actions(start=("b",), current_batch=0)),
    # build failed → only the nodes waiting on it fail
    (snap([N("a", F, 0, "k"), N("b", W, 0, "k"), N("c", P, 0, "j")], canary=False, budget="5",
          builds={"k": BuildSnapshot("k", BuildStatus.FAILED, "a")}),
     Actions(start=("c",), fail_waiting=(("b", "k"),), current_batch=0)),
    # all terminal → finish
    (snap([N("a", D, 0), N("b", State.SKIPPED, 1)]), Actions(finish=RolloutStatus.SUCCEEDED)),
    (snap([N("a", D, 0), N("b", F, 1)]), Actions(finish=RolloutStatus.PARTIAL)),
    # paused: nothing starts
    (snap([N("a", P, 0)], status=RolloutStatus.PAUSED), Actions()),
    # rolling back
    (snap([N("a", State.ROLLING_BACK, 0), N("b", State.ROLLED_BACK, 0)], status=RolloutStatus.ROLLING_BACK),
     Actions(start=("a",))),
    (snap([N("a", State.ROLLED_BACK, 0)], status=RolloutStatus.ROLLING_BACK),
     Actions(finish=RolloutStatus.ROLLED_BACK)),
    # a node whose rollback failed: never rolled-back (untouched skipped nodes don't count)
    (snap([N("a", State.ROLLED_BACK, 0), N("b", F, 0), N("c", State.SKIPPED, 0)], status=RolloutStatus.ROLLING_BACK),
     Actions(finish=RolloutStatus.ROLLBACK_FAILED)),
    (snap([N("a", State.ROLLED_BACK, 0), N("c", State.SKIPPED, 0)], status=RolloutStatus.ROLLING_BACK),
     Actions(finish=RolloutStatus.ROLLED_BACK)),
])
def test_next_actions(s: Snapshot, expected: Actions) -> None:
    assert next_actions(s) == expected


def test_budget_str() -> None:
    assert str(Budget(percent=12.5)) == "12.5%" and str(Budget(count=3)) == "3"


SHA = {name: f"{i:064x}" for i, name in enumerate([
    "flash_attn-2.6.3+cu123torch2.4cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
    "flash_attn-2.6.3-cp311-cp311-linux_x86_64.whl",
    "flash_attn-2.6.3-py3-none-any.whl",
    "flash_attn-2.6.3-cp310-cp310-linux_x86_64.whl",
    "flash_attn-2.6.3-cp311-cp311-linux_aarch64.whl",
    "flash_attn-2.6.30-cp311-cp311-linux_x86_64.whl",
    "flash_attn_3-2.6.3-cp311-cp311-linux_x86_64.whl",
    "flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl",
    "not-a-wheel.tar.gz",
], start=1)}


@pytest.mark.parametrize(("version", "py", "arch", "only", "expected"), [
    # the node's own CPython tag first, then a pure-Python wheel; other Pythons/arches/versions never
    ("2.6.3", "cp311", "x86_64", None, "flash_attn-2.6.3-cp311-cp311-linux_x86_64.whl"),
    ("2.6.3", "cp312", "x86_64", None, "flash_attn-2.6.3-py3-none-any.whl"),
    ("2.6.3", "cp310", "aarch64", None, "flash_attn-2.6.3-py3-none-any.whl"),
    ("2.6.3", "cp310", "aarch64", "flash_attn-2.6.3-cp310-cp310-linux_x86_64.whl", None),
    # a local label the node reports must match exactly; without one, a labelled release wheel serves too
    ("2.6.3+cu123torch2.4cxx11abiFALSE", "cp311", "x86_64", None,
     "flash_attn-2.6.3+cu123torch2.4cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"),
    ("2.6.3+cu124torch2.5cxx11abiFALSE", "cp311", "x86_64", None, None),
    ("2.6.3", "cp311", "x86_64", "flash_attn-2.6.3+cu123torch2.4cxx11abiFALSE-cp311-cp311-linux_x86_64.whl",
     "flash_attn-2.6.3+cu123torch2.4cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"),
    ("2.6.3", "cp311", "x86_64", "flash_attn-2.6.30-cp311-cp311-linux_x86_64.whl", None),
    ("2.6.3", "cp311", "x86_64", "flash_attn_3-2.6.3-cp311-cp311-linux_x86_64.whl", None),
    ("2.5.0", "cp311", "x86_64", None, None),
])
def test_pick_previous_wheel(version: str, py: str, arch: str, only: str | None, expected: str | None) -> None:
    wheels = [(n, h) for n, h in SHA.items() if only is None or n == only]
    assert pick_previous_wheel(wheels, "flash-attn", version, py, arch) == (SHA[expected] if expected else None)


@pytest.mark.parametrize(("status", "active"), [
    (RolloutStatus.RUNNING, True), (RolloutStatus.PAUSED, True),
    (RolloutStatus.ABORTING, True),  # its running steps still hold their nodes until they finish
    (RolloutStatus.ROLLING_BACK, True),
    (RolloutStatus.SUCCEEDED, False), (RolloutStatus.PARTIAL, False), (RolloutStatus.ABORTED, False),
    (RolloutStatus.ROLLED_BACK, False), (RolloutStatus.ROLLBACK_FAILED, False),
])
def test_active_rollout_statuses(status: RolloutStatus, active: bool) -> None:
    assert (status in ACTIVE_ROLLOUT) is active
    assert (str(status) in ACTIVE_ROLLOUT) is active  # the column's plain string, as read back from the DB


@pytest.mark.parametrize(("counts", "expected"), [
    ({}, (0, 0, 0, 0, 0, BatchStatus.DONE)),
    ({"planned": 3}, (3, 0, 0, 0, 3, BatchStatus.PENDING)),
    ({"done": 1, "install": 1, "planned": 1}, (3, 1, 0, 1, 2, BatchStatus.RUNNING)),
    ({"done": 2, "skipped": 1, "rolled-back": 1}, (4, 2, 0, 4, 0, BatchStatus.DONE)),
    ({"done": 1, "failed": 1}, (2, 1, 1, 2, 0, BatchStatus.FAILED)),
    ({"rolling-back": 1, "rolled-back": 1}, (2, 0, 0, 1, 1, BatchStatus.RUNNING)),
])
def test_progress(counts: dict[str, int], expected: tuple[int, int, int, int, int, BatchStatus]) -> None:
    p = progress(counts)
    assert (p.total, p.done, p.failed, p.finished, p.active, p.status) == expected
