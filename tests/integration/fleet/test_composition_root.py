"""The composition root (controller/app.py) starts every part in order, stops them in reverse, and a loop that
fails brings the whole controller down cleanly with one clear log line. Real controller, real asyncio tasks."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from fleetctl.controller.api import create_app
from fleetctl.controller.app import RunningController, run_until_stopped, start_controller
from fleetctl.controller.context import ControllerContext
from tests.integration.fleet_support import controller_settings

pytestmark = pytest.mark.timeout(60)

ORDER = ["loop-lag", "housekeeping", "job-watchdog", "verification", "verify-scheduler", "drift-checks", "cleanup",
         "webhooks", "rollout-engine", "grpc", "http"]


def loops_running(rc: RunningController) -> list[str]:
    return [p.name for p in rc.parts if p.task is not None and not p.task.done()]


async def test_parts_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    rc = await start_controller(controller_settings(tmp_path / "controller"))
    try:
        assert rc.started == ORDER
        assert loops_running(rc) == [n for n in ORDER if n != "verification"]  # verification is hooks, no loop
        assert json.loads(rc.discovery_file.read_text())["http"] == rc.ctx.http_url
    finally:
        await rc.stop(grace=0.2)
    assert rc.stopped == list(reversed(ORDER))
    assert all(p.task.done() for p in rc.parts if p.task is not None)


async def test_scheduler_off_is_not_started(tmp_path: Path) -> None:
    rc = await start_controller(controller_settings(tmp_path / "controller", scheduler=False))
    try:
        assert "verify-scheduler" not in rc.started
    finally:
        await rc.stop(grace=0.2)


async def test_a_failing_loop_stops_the_controller_with_a_clear_line(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    rc = await start_controller(controller_settings(tmp_path / "controller"))

    async def disk_on_fire() -> None:
        await asyncio.sleep(0.2)
        raise OSError("disk on fire")

    rc.run("doomed", disk_on_fire())
    with caplog.at_level(logging.INFO, logger="fleetctl.controller.app"):
        status = await asyncio.wait_for(run_until_stopped(rc, asyncio.Event()), 30)
    assert status == 1
    assert "background loop 'doomed' failed: OSError: disk on fire; stopping the controller" in caplog.text
    assert rc.stopped == ["doomed", *reversed(ORDER)]
    assert all(p.task.done() for p in rc.parts if p.task is not None)


async def test_a_loop_that_returns_counts_as_a_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rc = await start_controller(controller_settings(tmp_path / "controller"))
    assert rc.http_server is not None
    rc.http_server.should_exit = True  # the HTTP server ends by itself, not through stop()
    with caplog.at_level(logging.ERROR, logger="fleetctl.controller.app"):
        status = await asyncio.wait_for(run_until_stopped(rc, asyncio.Event()), 30)
    assert status == 1 and "background loop 'http' ended unexpectedly" in caplog.text
    assert rc.stopped == list(reversed(ORDER))


async def test_a_signal_stops_cleanly_with_status_0(tmp_path: Path) -> None:
    rc = await start_controller(controller_settings(tmp_path / "controller"))
    signalled = asyncio.Event()
    signalled.set()
    assert await asyncio.wait_for(run_until_stopped(rc, signalled), 30) == 0
    assert rc.stopped == list(reversed(ORDER))


async def test_a_part_that_fails_to_start_stops_the_ones_before_it(tmp_path: Path) -> None:
    blocker = await start_controller(controller_settings(tmp_path / "first"))
    try:
        taken = blocker.ctx.http_url.rpartition(":")[2] if blocker.ctx.http_url else "0"
        with pytest.raises(Exception, match="cannot listen on"):
            await start_controller(controller_settings(tmp_path / "second", http_listen=f"127.0.0.1:{taken}"))
        # the second controller's loops are gone: only the first one's tasks are left on the loop
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert sum(1 for n in names if n == "rollout-engine") <= 1
    finally:
        await blocker.stop(grace=0.2)


async def test_no_fastapi_lifespan_starts_a_loop(tmp_path: Path) -> None:
    ctx = ControllerContext(controller_settings(tmp_path / "controller"))
    try:
        app = create_app(ctx)
        before = set(asyncio.all_tasks())
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.1)
            assert set(asyncio.all_tasks()) - before == set()
    finally:
        ctx.close()
