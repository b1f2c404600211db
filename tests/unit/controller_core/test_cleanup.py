"""The cleanup duty's rules (controller/cleanup.py) on a real SQLite store: what is expired — at the edge of each
retention, 0 days keeps forever —, that a removal whose fence no longer holds removes nothing, and one round:
exactly the expired rows removed, the removals counted on /metrics and said in the log."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import false, select, true, update

from fleetctl.controller import cleanup
from fleetctl.controller.cleanup import Cleanup, CleanupPolicy, cutoff
from fleetctl.controller.leases import Lease, acquire
from fleetctl.controller.store import Store, open_store, utcnow
from fleetctl.controller.store.models import EnrollmentToken, JobEvent
from fleetctl.controller.telemetry import REGISTRY
from tests.unit.controller_core import cleanup_rows

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
POLICY = CleanupPolicy()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        yield s
    finally:
        s.close()


def test_cutoff_and_keep_forever() -> None:
    assert cutoff(NOW, 30) == NOW - dt.timedelta(days=30)
    assert cutoff(NOW, 0) is None


def _tokens(store: Store, *rows: tuple[str, dt.timedelta, int, int, dt.timedelta | None]) -> None:
    with store.session() as s:
        for prefix, expires, uses, max_uses, used in rows:
            s.add(EnrollmentToken(token_hash=prefix.ljust(64, "0"), prefix=prefix, created_at=NOW - dt.timedelta(60),
                                  expires_at=NOW + expires, used_at=NOW + used if used is not None else None,
                                  revoked=False, max_uses=max_uses, uses=uses))


def _left_tokens(store: Store) -> set[str]:
    with store.session() as s:
        return set(s.scalars(select(EnrollmentToken.prefix)))


def test_tokens_at_the_edge_of_their_retention(store: Store) -> None:
    second, week = dt.timedelta(seconds=1), dt.timedelta(days=7)
    _tokens(store, ("exp-just-past", -week - second, 0, 1, None), ("exp-just-short", -week + second, 0, 1, None),
            ("used-just-past", week, 1, 1, -week - second), ("used-just-short", week, 1, 1, -week + second))
    with store.session() as s:
        assert cleanup.remove_enrollment_tokens(s, POLICY, NOW, true(), 100) == 2
    assert _left_tokens(store) == {"exp-just-short", "used-just-short"}
    with store.session() as s:  # 0 days: kept forever
        assert cleanup.remove_enrollment_tokens(s, CleanupPolicy(enrollment_token_retention_days=0),
                                                NOW + 100 * week, true(), 100) == 0
    assert len(_left_tokens(store)) == 2


def test_job_events_kept_forever_with_0_days_and_removed_in_batches(store: Store) -> None:
    cleanup_rows.seed(store)
    later = NOW + dt.timedelta(days=400)  # every finished job is old by then; the running one never is
    with store.session() as s:
        assert cleanup.remove_job_events(s, CleanupPolicy(job_event_retention_days=0), later, true(), 100) == 0
        assert cleanup.remove_job_events(s, POLICY, later, true(), 2) == 2  # one batch
        assert cleanup.remove_job_events(s, POLICY, later, true(), 100) == 3
        assert set(s.scalars(select(JobEvent.job_id))) == {"job-running-40d"}


def test_a_removal_whose_fence_fails_removes_nothing(store: Store) -> None:
    cleanup_rows.seed(store)
    before = cleanup_rows.Left.read(store)
    later = NOW + dt.timedelta(days=400)
    with store.session() as s:
        assert [rule.remove(s, POLICY, later, false(), 100) for rule in cleanup.RULES] == [0] * len(cleanup.RULES)
    assert cleanup_rows.Left.read(store) == before


def _metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


async def test_one_round_removes_exactly_the_expired_rows_counts_and_says_it(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    cleanup_rows.seed(store)
    with store.session() as s:
        held = acquire(s, "cleanup", "ctl-test", 60)
    assert held is not None
    before = {t: _metric("fleet_controller_cleanup_removed_rows_total", table=t) for t in cleanup_rows.REMOVED}
    rounds = _metric("fleet_controller_cleanup_rounds_total", outcome="done")
    with caplog.at_level(logging.INFO, logger="fleetctl.controller.cleanup"):
        removed = await Cleanup(store, POLICY).round(held)
    assert removed == cleanup_rows.REMOVED
    cleanup_rows.check_removed_exactly_the_expired(cleanup_rows.Left.read(store), {"cleanup"})
    assert {t: _metric("fleet_controller_cleanup_removed_rows_total", table=t) - before[t]
            for t in cleanup_rows.REMOVED} == cleanup_rows.REMOVED
    assert _metric("fleet_controller_cleanup_rounds_total", outcome="done") == rounds + 1
    assert ("cleanup round: removed 2 enrollment_tokens (tokens expired or used up more than 7 days ago), "
            "1 agent_sessions (of nodes no longer registered), 2 leases (expired or released more than 1 day(s) "
            "ago), 3 job_events (events of jobs finished more than 30 days ago)") in caplog.text

    with store.session() as s:  # another controller took the lease over: this one's next round removes nothing
        s.execute(update(Lease).where(Lease.name == "cleanup")
                  .values(holder="ctl-other", token=Lease.token + 1))
    with store.session() as s:
        s.add(EnrollmentToken(token_hash="e" * 64, prefix="exp-30d", created_at=utcnow() - dt.timedelta(days=60),
                              expires_at=utcnow() - dt.timedelta(days=30), revoked=False, max_uses=1, uses=0))
    assert await Cleanup(store, POLICY).round(held) == dict.fromkeys(cleanup_rows.REMOVED, 0)
    assert "exp-30d" in _left_tokens(store)
