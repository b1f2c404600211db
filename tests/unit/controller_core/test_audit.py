"""The audit log has one owner (controller/audit.py): every writer records through it, every reader (the API,
a rollout's audit, the dashboard) reads its typed entries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fleetctl.controller import audit
from fleetctl.controller.store.db import open_store


def test_records_in_the_callers_transaction_and_reads_back_typed(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    audit.audit(store, "admin", "token.create", "t-1", ttl=3600)
    with caplog.at_level(logging.INFO, logger="fleet.audit"), store.session() as s:
        audit.record(s, "user:ann", "rollout.pause", "r-1", {"reason": "canary\nlooks slow"})
        audit.record(s, "user:ann", "rollout.resume", "r-1")
    with pytest.raises(RuntimeError), store.session() as s:  # rolled back with the change it describes
        audit.record(s, "user:bob", "rollout.abort", "r-1")
        raise RuntimeError("the action failed")
    with store.session() as s:
        every = audit.entries(s)
        r1 = audit.entries(s, target="r-1")
        newest = audit.entries(s, limit=1, newest_first=True)
    assert [(e.actor, e.action, e.target) for e in every] == [
        ("admin", "token.create", "t-1"), ("user:ann", "rollout.pause", "r-1"), ("user:ann", "rollout.resume", "r-1")]
    assert [e.action for e in r1] == ["rollout.pause", "rollout.resume"]
    assert newest[0].action == "rollout.resume" and newest[0].detail == {}
    assert every[0].detail == {"ttl": 3600} and every[0].to_json()["at"] == every[0].at.isoformat()
    assert "canary\\nlooks slow" in caplog.text  # the log line carries no raw newline from a caller
