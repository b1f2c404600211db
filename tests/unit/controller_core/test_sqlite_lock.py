"""The SQLite lock (controller/sqlite_lock.py): a second holder is refused with who holds it and what to do; a lock
file left behind by a process that is gone blocks nothing. (With real processes and kill -9:
tests/integration/ha/test_sqlite_lock.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fleetctl.controller.sqlite_lock import SQLiteInUse, lock_path, lock_sqlite


def test_second_holder_refused_with_the_holder_and_the_way_out(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    held = lock_sqlite(db)
    with pytest.raises(SQLiteInUse) as err:
        lock_sqlite(db)  # another open file description: flock refuses it even in the same process
    assert f"controller PID {os.getpid()} on host" in err.value.message and str(db) in err.value.message
    assert err.value.hint is not None and "PostgreSQL" in err.value.hint and "docs/ha.md" in err.value.hint
    assert err.value.exit_code == 5
    held.release()
    lock_sqlite(db).release()  # free again once released


def test_a_lock_file_left_behind_blocks_nothing(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    lock_path(db).write_text('{"pid": 999999, "host": "gone", "since": "2026-01-01T00:00:00+00:00"}')
    held = lock_sqlite(db)
    assert f'"pid": {os.getpid()}' in lock_path(db).read_text()  # the new holder says who it is
    held.release()
