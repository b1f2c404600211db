"""An agent that knows several controllers (issue 17): the --controller list, the order it dials them in and the
waits between dials (``Failover``, pure), and the run loop moving to another controller when its session ends."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.client import (
    Agent,
    AgentConfig,
    Backoff,
    Credentials,
    Failover,
    controller_targets,
    enroll_targets,
    failover_spread,
    first_controller,
)
from fleetctl.fleet.errors import ControllerUnavailable, InputError
from tests.unit.agent.conftest import self_signed_pem


def test_controller_list_is_parsed_in_order_without_repeats() -> None:
    assert controller_targets("ctl-a:7443") == ("ctl-a:7443",)
    assert controller_targets(" ctl-a:7443, 10.0.0.2:7443 ,[::1]:7443,ctl-a:7443") == (
        "ctl-a:7443", "10.0.0.2:7443", "[::1]:7443")


@pytest.mark.parametrize("bad", ["ctl-a", "ctl-a:", ":7443", "ctl-a:99999", "ctl-a:x", "ctl-a:7443,,ctl-b:7443",
                                 "::1:7443", "", "ctl a:7443"])
def test_a_bad_entry_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(InputError) as err:
        controller_targets(bad)
    assert "is not HOST:PORT" in err.value.message and "--controller ctl-a:7443,ctl-b:7443" in (err.value.hint or "")


def test_enrollment_ports_default_to_each_controller_plus_one() -> None:
    assert enroll_targets(("a:7443", "b:9000"), None) == ("a:7444", "b:9001")
    assert enroll_targets(("a:7443", "b:9000"), "e1:1,e2:2") == ("e1:1", "e2:2")


def test_a_fleet_spreads_over_its_controllers_and_a_node_always_starts_at_the_same() -> None:
    counts = Counter(first_controller(3, f"gpu-node-{i}") for i in range(300))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 70, counts
    assert first_controller(3, "gpu-node-7") == first_controller(3, "gpu-node-7")
    assert first_controller(1, "anything") == 0


def test_failed_dials_try_every_controller_at_once_then_back_off() -> None:
    targets = ("a:1", "b:1", "c:1")
    failover = Failover(Backoff(1.0, 8.0), start=1)
    dialled, waits = [], []
    for _ in range(7):
        dialled.append(failover.pick(targets))
        waits.append(failover.after_attempt(len(targets), established=False))
    assert dialled == ["b:1", "c:1", "a:1", "b:1", "c:1", "a:1", "b:1"]
    # each full round of failures waits the growing delay (jittered into [d/2, d]); within a round: none
    assert waits[0] == waits[1] == 0 and 0.5 <= waits[2] <= 1.0
    assert waits[3] == waits[4] == 0 and 1.0 <= waits[5] <= 2.0


def test_a_lost_session_moves_on_to_the_next_controller_after_the_initial_delay() -> None:
    targets = ("a:1", "b:1")
    failover = Failover(Backoff(0.5, 30.0), start=0)
    for _ in range(6):  # a while of failures grew the delay...
        failover.after_attempt(2, established=False)
    assert failover.pick(targets) == "a:1"
    wait = failover.after_attempt(2, established=True)  # ...then a session on a:1 came up and ended
    assert failover.pick(targets) == "b:1" and 0.25 <= wait <= 0.5
    assert failover.after_attempt(2, established=False) == 0  # b refused: a is tried at once


def test_one_controller_keeps_the_plain_reconnect_backoff() -> None:
    failover = Failover(Backoff(1.0, 4.0))
    waits = [failover.after_attempt(1, established=False) for _ in range(4)]
    assert [failover.pick(("only:1",))] == ["only:1"]
    assert 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2 and 2 <= waits[2] <= 4 and 2 <= waits[3] <= 4


def test_after_a_lost_session_the_first_rounds_stay_quick_then_the_backoff_grows() -> None:
    """A controller restart takes seconds: the agent keeps trying at the initial delay for QUICK_ROUNDS rounds after
    its session ended, instead of waiting out a grown delay long after the controller is back (issue 13)."""
    failover = Failover(Backoff(1.0, 30.0))
    failover.after_attempt(1, established=True)
    quick = [failover.after_attempt(1, established=False) for _ in range(Failover.QUICK_ROUNDS)]
    assert all(0.5 <= w <= 1.0 for w in quick), quick
    growing = [failover.after_attempt(1, established=False) for _ in range(4)]
    assert 2 <= growing[1] <= 4 and 8 <= growing[3] <= 16, growing  # initial, twice, …: the plain backoff again


def _agent(tmp_path: Path, controllers: str, **kw: Any) -> Agent:
    cfg = AgentConfig(controller=controllers, state_dir=tmp_path, facts=lambda: None,  # type: ignore[arg-type,return-value]
                      ca_file=tmp_path / "ca.pem", backoff_initial=0.05, backoff_max=0.4, **kw)
    agent = Agent(cfg)

    async def enrolled(_stop: asyncio.Event | None = None) -> Credentials:
        return Credentials("a" * 32, "node-1", b"", self_signed_pem(), b"")

    agent.ensure_enrolled = enrolled  # type: ignore[method-assign,assignment]
    return agent


async def test_the_run_loop_fails_over_to_the_next_controller(tmp_path: Path) -> None:
    """Controller b (the first for node-1) serves a session and dies; the agent dials c at once-ish, which is down
    too, then a, which serves; the jobs it holds are named on each new session (``_held``, sent with ``Jobs``)."""
    agent = _agent(tmp_path, "b:2,c:3,a:1")
    up = {"b:2": 1, "a:1": 1}  # how many sessions each controller serves; c is down
    dials: list[tuple[str, float]] = []
    stop = asyncio.Event()
    start = first_controller(3, "node-1")
    assert ("b:2", "c:3", "a:1")[start] == "b:2", "the test's order assumes node-1 starts at b"

    async def session(_creds: Any, _stop: asyncio.Event) -> None:
        dials.append((agent.controller, time.monotonic()))
        if len(dials) == 4:
            stop.set()
            await asyncio.sleep(0.2)
            return
        if up.get(agent.controller, 0) > 0:
            up[agent.controller] -= 1
            agent._session_up = True
            await asyncio.sleep(0.05)
        raise ControllerUnavailable(f"{agent.controller} gone", hint="")

    agent._session = session  # type: ignore[method-assign,assignment]
    await asyncio.wait_for(agent.run(stop), 10)
    assert [d for d, _ in dials] == ["b:2", "c:3", "a:1", "b:2"]
    after_b = dials[1][1] - (dials[0][1] + 0.05)
    assert after_b < 0.15  # the initial delay (0.05) with jitter, not a grown backoff
    assert dials[2][1] - dials[1][1] < 0.05  # c refused: a at once


async def test_no_controller_reachable_names_them_all(tmp_path: Path) -> None:
    agent = _agent(tmp_path, "a:1,b:2", connect_timeout=0.3)

    async def session(_creds: Any, _stop: asyncio.Event) -> None:
        raise ControllerUnavailable(f"connection refused by {agent.controller}", hint="")

    agent._session = session  # type: ignore[method-assign,assignment]
    with pytest.raises(ControllerUnavailable) as err:
        await asyncio.wait_for(agent.run(asyncio.Event()), 10)
    assert "none of the controllers a:1, b:2 was reachable" in err.value.message


def test_going_home_dials_the_first_controller_at_once() -> None:
    failover = Failover(Backoff(1.0, 8.0), start=0)
    for _ in range(3):
        failover.after_attempt(3, established=False)
    failover.go_to(2)
    assert failover.pick(("a:1", "b:1", "c:1")) == "c:1" and failover.failed_in_row == 0
    assert failover.after_attempt(3, established=False) == 0  # a fresh round


async def test_an_agent_on_another_controller_returns_to_its_first_when_it_is_back(tmp_path: Path) -> None:
    """node-1's first controller is b; it is down at the start, so the agent works with c, and goes back to b (a real
    TLS listener here would be needed for the probe: the session ends with ``_returning`` set, as the probe does)."""
    agent = _agent(tmp_path, "b:2,c:3,a:1", return_home_after=0.05)
    dials: list[str] = []
    stop = asyncio.Event()

    async def session(_creds: Any, _stop: asyncio.Event) -> None:
        dials.append(agent.controller)
        if len(dials) == 1:
            raise ControllerUnavailable("b down", hint="")
        if len(dials) == 2:
            assert agent._home == "b:2"
            agent._session_up = True
            agent._returning = True  # what _return_home_when_back does once b answers
            return
        stop.set()
        await asyncio.sleep(0.2)

    agent._session = session  # type: ignore[method-assign,assignment]
    await asyncio.wait_for(agent.run(stop), 10)
    assert dials == ["b:2", "c:3", "b:2"]


def test_the_agents_of_a_dead_controller_spread_over_the_survivors() -> None:
    """Three controllers; the agents that started on a:1 lose it: about half go to b, half to c (not all to b)."""
    targets = ("a:1", "b:1", "c:1")
    nodes = [n for n in (f"gpu-node-{i}" for i in range(600)) if first_controller(3, n) == 0]
    moved: Counter[str] = Counter()
    for node in nodes:
        failover = Failover(Backoff(0.5, 30.0), first_controller(3, node), spread=failover_spread(node))
        failover.after_attempt(3, established=True)
        moved[failover.pick(targets)] += 1
    assert set(moved) == {"b:1", "c:1"} and min(moved.values()) > len(nodes) * 0.35, moved
    # and a node that then finds its new controller dead too tries the remaining ones in turn
    failover = Failover(Backoff(0.5, 30.0), 0, spread=1)
    failover.after_attempt(3, established=True)
    assert failover.pick(targets) == "c:1"
    failover.after_attempt(3, established=False)
    assert failover.pick(targets) == "a:1"
    failover.after_attempt(3, established=False)
    assert failover.pick(targets) == "b:1"
