"""EventPump (bounded, non-blocking event hand-off) and the executor's refusals."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from fleetctl.agent.executor import AnsibleJobRunner, EventPump
from fleetctl.fleet.jobs import JobSpec


async def test_slow_consumer_never_blocks_producer_and_drops_oldest_unimportant() -> None:
    loop = asyncio.get_running_loop()
    pump = EventPump(loop, maxsize=5, job_id="j")
    got: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def slow(ev: dict[str, Any]) -> None:
        await gate.wait()
        got.append(ev)

    consumer = asyncio.create_task(pump.consume(slow))

    def produce() -> float:
        t = time.monotonic()
        pump.put({"event": "playbook_on_start"})
        for i in range(50):
            pump.put({"event": "runner_on_ok", "i": i})
        pump.put({"event": "runner_on_failed", "i": 99})
        pump.put({"event": "playbook_on_stats"})
        return time.monotonic() - t

    elapsed = await asyncio.to_thread(produce)
    assert elapsed < 1.0
    gate.set()
    pump.close()
    await asyncio.wait_for(consumer, 5)
    kinds = [e["event"] for e in got]
    assert "playbook_on_start" in kinds and "runner_on_failed" in kinds and kinds[-1] == "playbook_on_stats"
    assert any(e["event"] == "fleet_events_dropped" for e in got)
    assert pump.dropped > 0
    dropped_reported = sum(e["count"] for e in got if e["event"] == "fleet_events_dropped")
    assert dropped_reported == pump.dropped
    assert len([k for k in kinds if k != "fleet_events_dropped"]) + pump.dropped == 53


async def test_consumer_errors_do_not_stop_delivery() -> None:
    pump = EventPump(asyncio.get_running_loop(), maxsize=10)
    seen: list[int] = []

    def flaky(ev: dict[str, Any]) -> None:
        seen.append(ev["i"])
        if ev["i"] == 1:
            raise RuntimeError("controller hiccup")

    task = asyncio.create_task(pump.consume(flaky))
    def produce() -> None:
        for i in range(3):
            pump.put({"event": "x", "i": i})

    threading.Thread(target=produce).start()
    await asyncio.sleep(0.1)
    pump.close()
    await asyncio.wait_for(task, 5)
    assert seen == [0, 1, 2]


def test_oversized_event_trimmed() -> None:
    from fleetctl.agent.executor import MAX_EVENT_BYTES, _bounded

    ev = {"event": "runner_on_ok", "stdout": "x" * 200_000, "event_data": {"res": {"content": "y" * 200_000}}}
    out = _bounded(ev)
    assert out["truncated"] is True and out["event_data"]["res"] == {"truncated": True}
    assert len(out["stdout"]) < MAX_EVENT_BYTES


async def test_refusals(tmp_path: Path) -> None:
    runner = AnsibleJobRunner(tmp_path)
    cases = [
        (JobSpec("a/../b", "install-wheel", {}), "refused job id"),
        (JobSpec("j1", "rm -rf", {}), "unknown job kind"),
        (JobSpec("j2", "install-wheel", {"ansible_connection": "local"}), "ansible_*"),
        (JobSpec("j3", "install-wheel", {"fleet_artifact_dir": "/"}), "fleet_*"),
        (JobSpec("j4", "install-wheel", {"Bad-Name": 1}), "refused variable name"),
        (JobSpec("j5", "install-wheel", {}, timeout_s=0), "timeout must be positive"),
    ]
    for spec, msg in cases:
        out = await runner.run(spec, lambda ev: None)
        assert out.status == "error" and out.error and msg in out.error, (spec, out)
    assert not (tmp_path / "jobs").exists()
