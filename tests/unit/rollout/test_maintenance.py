"""Table tests of the rollout's maintenance policy (pure core): --max-unavailable counting offline and degraded
nodes, maintenance windows (time zones, across midnight, DST), bake time, approval after the canary batch, and the
notification payload."""

from __future__ import annotations

import datetime as dt

import pytest

from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.rollout.core import (
    ACTIVE_ROLLOUT,
    Hold,
    HoldKind,
    Maintenance,
    MaxUnavailable,
    NodeSnapshot,
    RolloutEvent,
    RolloutStatus,
    Snapshot,
    State,
    next_actions,
    notification_event,
    notification_payload,
    parse_budget,
    parse_duration,
    parse_max_unavailable,
    parse_window,
    progress,
    window_state,
)
from fleetctl.fleet.errors import UsageError

UTC = dt.UTC
P, D, F, INS = State.PLANNED, State.DONE, State.FAILED, State.INSTALL
# Thursday 3 December 2026, 12:00 UTC
THU_NOON = dt.datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def at(day: int, hh: int, mm: int = 0, month: int = 12) -> dt.datetime:
    return dt.datetime(2026, month, day, hh, mm, tzinfo=UTC)


# ---- --max-unavailable ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("", None), ("2", MaxUnavailable(count=2)), ("25%", MaxUnavailable(percent=25)),
    ("100%", MaxUnavailable(percent=100)),
])
def test_parse_max_unavailable(text: str | None, expected: MaxUnavailable | None) -> None:
    assert parse_max_unavailable(text) == expected


@pytest.mark.parametrize("text", ["150%", "0", "0%", "-1", "two", "5%%"])
def test_bad_max_unavailable_is_a_usage_error_that_says_what_to_write(text: str) -> None:
    with pytest.raises(UsageError, match="bad --max-unavailable") as err:
        parse_max_unavailable(text)
    assert "percentage in (0, 100]" in (err.value.hint or "")


def test_a_percentage_is_of_the_rollouts_nodes_rounded_down_but_at_least_one() -> None:
    assert MaxUnavailable(percent=25).allowed(10) == 2
    assert MaxUnavailable(percent=10).allowed(5) == 1


def snap(nodes: list[NodeSnapshot], *, m: Maintenance | None = None, now: dt.datetime = THU_NOON,
         canary: bool = False, approved: bool = False, finished: dict[int, dt.datetime] | None = None,
         parallel: int = 50) -> Snapshot:
    return Snapshot(RolloutStatus.RUNNING, nodes, {}, sum(n.state == F for n in nodes), len(nodes), parse_budget("50%"),
                    parallel, canary, maintenance=m or Maintenance(), now=now, approved=approved,
                    batch_finished_at=finished or {})


def N(host: str, state: State, batch: int = 0, health: NodeStatus = NodeStatus.ONLINE, *,
      busy: bool = False) -> NodeSnapshot:
    return NodeSnapshot(host, state, batch, busy=busy, health=health)


def test_offline_and_degraded_nodes_use_up_max_unavailable() -> None:
    m = Maintenance(max_unavailable=MaxUnavailable(count=2))
    nodes = [N("off", State.SKIPPED, -1, NodeStatus.OFFLINE), N("deg", P, 0, NodeStatus.DEGRADED), N("a", P),
             N("b", P), N("c", P)]
    acts = next_actions(snap(nodes, m=m))
    # the degraded node is already unavailable: working on it costs nothing; the healthy ones would add one each
    assert acts.start == ("deg",)
    assert acts.hold is not None and acts.hold.kind == HoldKind.MAX_UNAVAILABLE
    assert "2 of 5 nodes unavailable (1 offline, 1 degraded, 0 in a step)" in acts.hold.detail
    assert "--max-unavailable 2 allows 2" in acts.hold.detail


def test_nodes_in_a_step_count_and_the_rest_waits() -> None:
    m = Maintenance(max_unavailable=MaxUnavailable(count=2))
    nodes = [N("a", INS, busy=True), N("b", P), N("c", P), N("d", P)]
    acts = next_actions(snap(nodes, m=m))
    assert acts.start == ("b",)  # one in a step + one more = 2
    full = next_actions(snap([N("a", INS, busy=True), N("b", INS, busy=True), N("c", P)], m=m))
    assert full.start == () and full.hold is not None
    assert full.hold.describe(THU_NOON).startswith("waiting: 2 of 3 nodes unavailable (0 offline, 0 degraded, 2 in")


def test_without_max_unavailable_only_max_parallel_limits() -> None:
    acts = next_actions(snap([N("a", P, health=NodeStatus.OFFLINE), N("b", P), N("c", P)], parallel=2))
    assert acts.start == ("a", "b") and acts.hold is None


# ---- maintenance windows -------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "now", "open_", "change"), [
    # Saturday 5 Dec 02:00-06:00 UTC
    ("Sat 02:00-06:00", THU_NOON, False, at(5, 2)),
    ("Sat 02:00-06:00", at(5, 3), True, at(5, 6)),
    ("Sat 02:00-06:00", at(5, 6), False, at(12, 2)),  # the end is exclusive
    # across midnight: opens Friday 22:00, closes Saturday 04:00
    ("Fri 22:00-04:00", at(5, 1), True, at(5, 4)),
    ("Fri 22:00-04:00", at(4, 21, 59), False, at(4, 22)),
    ("Fri 22:00-04:00", at(5, 4), False, at(11, 22)),
    # a range of days, a list, every day
    ("Mon-Fri 09:00-17:00", THU_NOON, True, at(3, 17)),
    ("Fri-Mon 00:00-24:00", at(6, 23), True, at(7, 0)),  # Sunday, wrapping over the weekend
    ("sat,sun 10:00-11:00", THU_NOON, False, at(5, 10)),
    ("daily 13:00-14:00", THU_NOON, False, at(3, 13)),
    # a named zone: Berlin is UTC+1 in December, New York UTC-5
    ("Thu 12:30-14:00 Europe/Berlin", THU_NOON, True, at(3, 13)),
    ("Thu 06:00-07:30 America/New_York", THU_NOON, True, at(3, 12, 30)),
    ("Thu 06:00-07:00 America/New_York", THU_NOON, False, at(10, 11)),
])
def test_window_state(text: str, now: dt.datetime, open_: bool, change: dt.datetime) -> None:
    state = window_state([parse_window(text)], now)
    assert (state.open, state.change_at) == (open_, change)


def test_the_default_zone_applies_to_windows_without_one() -> None:
    w = parse_window("Thu 12:30-14:00", "Europe/Berlin")
    assert w.zone == "Europe/Berlin" and window_state([w], THU_NOON).open


def test_a_window_across_a_dst_change_keeps_its_local_times() -> None:
    # Europe/Berlin leaves summer time on Sunday 25 October 2026 at 03:00 local (01:00 UTC)
    w = parse_window("Sat 22:00-06:00 Europe/Berlin")
    state = window_state([w], dt.datetime(2026, 10, 24, 21, 0, tzinfo=UTC))  # 23:00 local, summer time
    assert state.open and state.change_at == dt.datetime(2026, 10, 25, 5, 0, tzinfo=UTC)  # 06:00 local, winter
    assert window_state([w], dt.datetime(2026, 10, 24, 19, 59, tzinfo=UTC)).change_at == \
        dt.datetime(2026, 10, 24, 20, 0, tzinfo=UTC)  # opens 22:00 local = 20:00 UTC in summer time


def test_several_windows_the_next_opening_is_the_earliest() -> None:
    ws = [parse_window("Sat 02:00-06:00"), parse_window("Fri 20:00-21:00")]
    assert window_state(ws, THU_NOON).change_at == at(4, 20)
    assert window_state([], THU_NOON).open


@pytest.mark.parametrize(("text", "why"), [
    ("Saturday", "bad --window"), ("Sat 2-6", "bad --window"), ("Sat 02:00-06:00 Mars/Olympus", "unknown time zone"),
    ("Sut 02:00-06:00", "unknown day or time"), ("Sat 25:00-26:00", "unknown day or time"),
    ("Sat 02:61-03:00", "unknown day or time"), ("Sat 02:00-02:00", "opens and closes at the same time"),
])
def test_bad_window_strings_say_what_to_write(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as err:
        parse_window(text)
    assert "DAYS HH:MM-HH:MM" in (err.value.hint or "") or "IANA" in (err.value.hint or "")


def test_outside_the_window_nothing_new_starts_running_steps_go_on() -> None:
    m = Maintenance(windows=(parse_window("Sat 02:00-06:00"),))
    acts = next_actions(snap([N("a", INS), N("b", P)], m=m))
    assert acts.start == ("a",)  # a node already in a step is driven on; b waits
    assert acts.hold == Hold(HoldKind.WINDOW, at(5, 2), "Sat 02:00-06:00")
    assert acts.hold.describe(THU_NOON) == "waiting for window (opens in 1d14h): Sat 02:00-06:00"
    assert acts.hold.describe(at(4, 22, 48)) == "waiting for window (opens in 3h12m): Sat 02:00-06:00"
    inside = next_actions(snap([N("a", INS), N("b", P)], m=m, now=at(5, 3)))
    assert inside.start == ("a", "b") and inside.hold is None


# ---- bake time and approval ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2d", 172800)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "-5m", "1h 30m"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(UsageError, match="bad --bake-time"):
        parse_duration(text)


def test_bake_time_holds_the_next_batch_after_a_batch_finishes() -> None:
    m = Maintenance(bake_seconds=1800)
    nodes = [N("a", D, 0), N("b", P, 1), N("c", P, 2)]
    finished = {0: THU_NOON - dt.timedelta(minutes=10)}
    acts = next_actions(snap(nodes, m=m, finished=finished))
    assert acts.start == () and acts.hold is not None and acts.hold.kind == HoldKind.BAKE
    assert acts.hold.until == THU_NOON + dt.timedelta(minutes=20)
    assert acts.hold.describe(THU_NOON) == "baking: next batch starts in 20m00s (--bake-time 30m00s after batch 0 " \
                                           "finished)"
    later = next_actions(snap(nodes, m=m, finished=finished, now=THU_NOON + dt.timedelta(minutes=20)))
    assert later.start == ("b",) and later.hold is None


def test_pause_after_canary_awaits_approval_then_goes_on() -> None:
    m = Maintenance(pause_after_canary=True)
    nodes = [N("c", D, 0), N("x", P, 1)]
    acts = next_actions(snap(nodes, m=m, canary=True))
    assert acts.start == () and acts.await_approval is not None
    assert "canary batch finished: 1 done, 0 failed" in acts.await_approval
    assert next_actions(snap(nodes, m=m, canary=True, approved=True)).start == ("x",)
    # while the canaries run nothing is asked
    assert next_actions(snap([N("c", INS, 0), N("x", P, 1)], m=m, canary=True)).await_approval is None


def test_a_failed_canary_pauses_before_approval_is_asked() -> None:
    m = Maintenance(pause_after_canary=True)
    acts = next_actions(snap([N("c", F, 0), N("x", P, 1)], m=m, canary=True))
    assert acts.pause == "canary failed: c" and acts.await_approval is None


def test_awaiting_approval_is_an_active_status() -> None:
    assert str(RolloutStatus.AWAITING_APPROVAL) == "awaiting-approval"
    assert RolloutStatus.AWAITING_APPROVAL in ACTIVE_ROLLOUT


# ---- notifications ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "event"), [
    (RolloutStatus.PAUSED, RolloutEvent.PAUSED), (RolloutStatus.AWAITING_APPROVAL, RolloutEvent.AWAITING_APPROVAL),
    (RolloutStatus.PARTIAL, RolloutEvent.FAILED), (RolloutStatus.ROLLBACK_FAILED, RolloutEvent.FAILED),
    (RolloutStatus.SUCCEEDED, RolloutEvent.COMPLETED), (RolloutStatus.ROLLED_BACK, RolloutEvent.COMPLETED),
    (RolloutStatus.ABORTED, RolloutEvent.ABORTED), (RolloutStatus.RUNNING, None), (RolloutStatus.ABORTING, None),
])
def test_which_status_notifies(status: RolloutStatus, event: RolloutEvent | None) -> None:
    assert notification_event(status) == event


def test_notification_payload_is_schema_1() -> None:
    p = notification_payload(RolloutEvent.FAILED, rollout_id="r-1", status=RolloutStatus.PARTIAL, reason="1 failed",
                             version="2.8.3", progress=progress({"done": 2, "failed": 1}),
                             failed=[("h1", "install-wheel failed: no space")], at=THU_NOON)
    assert p == {"schema": 1, "event": "failed", "rollout_id": "r-1", "status": "partial", "reason": "1 failed",
                 "version": "2.8.3", "counts": {"total": 3, "done": 2, "failed": 1, "skipped": 0, "active": 0},
                 "failed_nodes": [{"hostname": "h1", "reason": "install-wheel failed: no space"}],
                 "time": "2026-12-03T12:00:00+00:00"}
