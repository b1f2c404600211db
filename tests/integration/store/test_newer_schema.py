"""docs/operations.md, "Upgrading the controller": a controller older than the database's schema (a rollback
without restoring the backup) stops at start with a StoreError that says so, and leaves the database unchanged."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fleetctl.controller.store.db import open_store
from fleetctl.fleet.errors import StoreError


def test_an_older_controller_refuses_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "controller.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:  # as a newer fleetctl's migration would leave it
        db.execute("UPDATE alembic_version SET version_num = 'from_a_newer_fleetctl_0001'")
        db.execute("CREATE TABLE newer_things (id INTEGER PRIMARY KEY)")

    with pytest.raises(StoreError) as err:
        open_store(f"sqlite:///{path}")
    assert "migrated by a newer fleetctl" in err.value.message
    assert "from_a_newer_fleetctl_0001" in err.value.message
    assert err.value.hint and "restore the backup" in err.value.hint
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("from_a_newer_fleetctl_0001",)]
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'newer_things'").fetchall()
