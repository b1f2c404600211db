"""Registry logic over a real SQLite store, with a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.enrollment import AgentIdentity
from fleetctl.controller.node_status import NodeStatus
from fleetctl.controller.registry import HostnameMismatch, Registry, diff_facts
from fleetctl.controller.store import Store, open_store
from fleetctl.fleet.errors import ConflictError, NotFoundError, StoreError
from fleetctl.fleet.facts import DriverFacts, NodeFacts, ToolkitFacts
from tests.unit.controller_core.util import add_identity, facts


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'c.db'}")


def test_diff_facts_paths() -> None:
    old = {"driver": {"version": "1.0", "cuda_max": "12.4"}, "gpus": [{"name": "A"}, {"name": "B"}],
           "toolkit": None, "torch": {"arch_list": ["sm_80"]}}
    new = {"driver": {"version": "1.1", "cuda_max": "12.4"}, "gpus": [{"name": "A"}, {"name": "C"}],
           "toolkit": {"nvcc": "12.4"}, "torch": {"arch_list": ["sm_80", "sm_90"]}}
    d = diff_facts(old, new)
    assert sorted(d) == ["driver.version", "gpus[1].name", "toolkit", "torch.arch_list"]
    assert d["toolkit"] == (None, {"nvcc": "12.4"})
    assert diff_facts(old, old) == {}
    assert sorted(diff_facts({"gpus": [{"a": 1}]}, {"gpus": []})) == ["gpus"]


def test_register_update_history(store: Store) -> None:
    ident = add_identity(store, "n1")
    reg = Registry(store, clock=Clock())
    assert reg.report_facts(ident, facts("n1")) == ["*"]
    f2: NodeFacts = dataclasses.replace(facts("n1"), toolkit=ToolkitFacts("12.6", "/usr/local/cuda-12.6/bin/nvcc"))
    assert reg.report_facts(ident, f2) == ["toolkit.nvcc", "toolkit.path"]
    assert reg.report_facts(ident, f2) == []
    assert [h["changed"] for h in reg.history("n1")["history"]] == [["toolkit.nvcc", "toolkit.path"], ["*"]]
    assert reg.record("n1").facts == f2
    [only] = reg.records()
    assert only.facts is not None and only.facts.toolkit is not None and only.facts.toolkit.nvcc == "12.6"


def test_hostname_mismatch_and_duplicates_leave_registry_unchanged(store: Store) -> None:
    a = add_identity(store, "n1")
    reg = Registry(store)
    reg.report_facts(a, facts("n1"))
    with pytest.raises(HostnameMismatch):
        reg.report_facts(a, facts("n2"))
    b = add_identity(store, "n1", agent_id="b" * 32)
    with pytest.raises(ConflictError):
        reg.report_facts(b, dataclasses.replace(facts("n1"), driver=DriverFacts("999.1", "13.0")))
    assert reg.record("n1").facts == facts("n1")
    assert [n.hostname for n in reg.records()] == ["n1"]


def test_offline_after_missed_heartbeats_and_back(store: Store) -> None:
    clock = Clock()
    ident = add_identity(store, "n1")
    reg = Registry(store, heartbeat_interval=10, missed_heartbeats=3, clock=clock)
    reg.report_facts(ident, facts("n1"))
    clock.t += 25
    assert reg.sweep() == []
    reg.heartbeat(ident)
    clock.t += 29
    assert reg.sweep() == []
    clock.t += 2
    [tr] = reg.sweep()
    assert (tr.hostname, tr.old, tr.new) == ("n1", "online", "offline")
    assert reg.sweep() == []  # recorded once
    interval, wanted = reg.heartbeat(ident)
    assert interval == 10 and wanted is False
    assert reg.status_of("n1") == "online"
    hist = [(e["old"], e["new"]) for e in reversed(reg.history("n1")["status_history"])]
    assert hist == [(None, "online"), ("online", "offline"), ("offline", "online")]


def test_heartbeats_touch_memory_until_flushed(store: Store) -> None:
    clock = Clock()
    ident = add_identity(store, "n1")
    reg = Registry(store, clock=clock)
    reg.report_facts(ident, facts("n1"))
    for _ in range(5):
        clock.t += 1
        reg.heartbeat(ident)
    assert reg.db_writes == 0
    assert reg.flush_last_seen() == 1 and reg.db_writes == 1
    assert reg.flush_last_seen() == 0
    reg.request_facts("n1")
    assert reg.heartbeat(ident)[1] is True and reg.heartbeat(ident)[1] is False


def test_flush_batch_holds_each_heartbeating_node_once(store: Store) -> None:
    clock = Clock()
    a, b = add_identity(store, "n1"), add_identity(store, "n2")
    reg = Registry(store, clock=clock)
    reg.report_facts(a, facts("n1"))
    reg.report_facts(b, facts("n2"))
    assert reg.take_dirty() == []  # registration wrote last_seen already
    for _ in range(3):
        clock.t += 1
        reg.heartbeat(a)
    reg.heartbeat(b)
    reg.report_facts(b, facts("n2"))  # a facts report writes last_seen itself: n2 leaves the batch
    assert reg.take_dirty() == [(reg._live["n1"].node_id, clock.t, reg._live["n1"].session_id)]
    assert reg.take_dirty() == []


def test_heartbeat_unknown_node_and_set_status(store: Store) -> None:
    reg = Registry(store)
    with pytest.raises(NotFoundError):
        reg.heartbeat(AgentIdentity("x", "ghost", "1", False))
    ident = add_identity(store, "n1")
    reg.report_facts(ident, facts("n1"))
    assert reg.set_status("n1", NodeStatus.DEGRADED, "verification failed") is not None
    assert reg.set_status("n1", NodeStatus.DEGRADED, "again") is None
    # liveness state survives a restart
    again = Registry(store)
    assert again.status_of("n1") == "degraded"


async def test_set_status_async_writes_off_the_loop_in_order_and_keeps_a_failed_write(store: Store) -> None:
    """A verification's status change is in memory at once and written on the store's threads, never on the event
    loop (heartbeats); two changes of one node land in the order they were made; a failed write is kept for the
    next flush."""
    ident = add_identity(store, "n1")
    reg = Registry(store)
    reg.report_facts(ident, facts("n1"))
    writers: list[int] = []
    write = reg.write_transitions

    def recording(batch: list[Any]) -> int:
        writers.append(threading.get_ident())
        return write(batch)

    reg.write_transitions = recording  # type: ignore[method-assign]
    first = asyncio.ensure_future(reg.set_status_async("n1", NodeStatus.DEGRADED, "verification failed"))
    await asyncio.sleep(0)
    assert reg.status_of("n1") == "degraded"  # in memory before it is written
    second = reg.set_status_async("n1", NodeStatus.ONLINE, "verification passed")
    assert (await first) is not None and (await second) is not None
    assert writers and threading.get_ident() not in writers
    hist = [(e["old"], e["new"]) for e in reversed(reg.history("n1")["status_history"])]
    assert hist == [(None, "online"), ("online", "degraded"), ("degraded", "online")]
    assert Registry(store).status_of("n1") == "online"

    def failing(batch: list[Any]) -> int:
        raise StoreError("database error: gone", hint="test")

    reg.write_transitions = failing  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await reg.set_status_async("n1", NodeStatus.DEGRADED, "verification failed")
    assert reg.status_of("n1") == "degraded"
    reg.write_transitions = write  # type: ignore[method-assign]
    assert reg.flush() >= 1 and Registry(store).status_of("n1") == "degraded"
