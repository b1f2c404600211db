"""GcMonitor: times collections; tuning freezes after start-up and after registration bursts."""

from __future__ import annotations

import gc

import pytest

from fleetctl.controller.loop_monitors import GC_FREEZE_GROWTH, GC_GEN0_THRESHOLD, GcMonitor


def test_collections_are_timed_per_generation() -> None:
    mon = GcMonitor()
    mon.install()
    try:
        gc.collect()
        summary = mon.summary()
    finally:
        mon.uninstall()
    assert mon._callback not in gc.callbacks
    assert summary["gen2"]["n"] >= 1 and summary["gen2"]["max_ms"] >= 0
    mon.reset()
    assert mon.summary()["gen2"]["n"] == 0


def test_untuned_monitor_never_freezes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    mon = GcMonitor()
    assert not mon.after_tick(10_000) and not mon.after_tick(10_000)
    assert calls == []


def test_tune_freezes_at_start_and_once_a_burst_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # gc.freeze / set_threshold are process-wide: record the calls instead of making them
    calls: list[object] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "set_threshold", lambda *a: calls.append(a))
    _, t1, t2 = gc.get_threshold()
    mon = GcMonitor()
    mon.tune(nodes=10)
    assert calls == ["freeze", (GC_GEN0_THRESHOLD, t1, t2)] and mon.tuned
    calls.clear()
    assert not mon.after_tick(10 + GC_FREEZE_GROWTH - 1)  # growing
    assert not mon.after_tick(10 + GC_FREEZE_GROWTH - 1)  # quiet, but too few new nodes
    assert not mon.after_tick(10 + GC_FREEZE_GROWTH)  # still growing
    assert mon.after_tick(10 + GC_FREEZE_GROWTH)  # quiet for a tick: freeze
    assert not mon.after_tick(10 + GC_FREEZE_GROWTH)  # nothing new since
    assert calls == ["freeze"] and mon.summary()["freezes"] == 2
