"""Two controllers on one SQLite database: the second is refused at start with who holds it and what to do
(controller/sqlite_lock.py), the first keeps running untouched; after the first is killed with SIGKILL the lock it
held is gone with it, and the second starts."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.integration.rollout.controller_proc import ControllerProc, api

pytestmark = pytest.mark.timeout(120)


async def test_second_controller_on_one_sqlite_refused_until_the_first_is_gone(tmp_path: Path) -> None:
    first = ControllerProc(tmp_path / "a" / "controller")
    db = first.state / "controller.db"
    second = ControllerProc(tmp_path / "b" / "controller", db=f"sqlite:///{db}")
    first.start()
    try:
        await first.ready()
        await api(first, "POST", "/tokens", {"ttl_seconds": 600})

        second.start()
        assert second.proc is not None and first.proc is not None
        try:
            rc = second.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the second controller started on the first one's SQLite database")
        out = (second.state.parent / "controller-1.log").read_text()
        assert rc == 5, out
        assert f"controller PID {first.proc.pid} on host" in out and str(db) in out, out
        assert "PostgreSQL" in out and "docs/ha.md" in out, out
        # the first is untouched: still serving, and what it stored is there
        assert (await api(first, "GET", "/health"))["ok"]
        assert _tokens(db) == 1

        first.kill9()  # the kernel drops its lock with it; the lock file stays behind
        assert (first.state / "controller.db.lock").exists()
        second.start()
        await second.ready()
        assert _tokens(db) == 1
    finally:
        second.stop()
        first.stop()


def _tokens(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        (count,) = conn.execute("SELECT count(*) FROM enrollment_tokens").fetchone()
    return int(count)
