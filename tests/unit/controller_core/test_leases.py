"""Leader leases' rules (controller/leases.py): ``next_term``, the pure rule of how long a holder may act on what
``acquire`` answered; ``holder_gone``; and on SQLite the fence a leader's unit of work opens with (``hold_lease``)
and ``acquire``'s takeover from a holder known to be dead. PostgreSQL, two controllers: tests/integration/ha."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from fleetctl.controller.leases import Held, Lease, LeaseLost, Term, acquire, hold_lease, holder_gone, next_term
from fleetctl.controller.store import Store, open_store

EXPIRY = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
TTL = 3.0


def held(token: int = 7) -> Held:
    return Held("rollout:r-1", "ctl-a:1:a", token, EXPIRY)


TERM = Term(held(), valid_until=10.0)  # renewed last at 7.0, TTL 3 s


@pytest.mark.parametrize(("term", "got", "asked", "answered", "expected"), [
    # a first term: from the asking, not the answer (the database's expiry counts from a later now)
    (None, held(), 20.0, 20.4, Term(held(), 23.0)),
    (None, None, 20.0, 20.4, None),  # refused: another holder's lease runs
    (None, held(), 20.0, 23.0, None),  # answered when it would already have ended
    # a renewal
    (TERM, held(), 8.0, 8.1, Term(held(), 11.0)),  # in time, same token: goes on
    (TERM, held(), 9.5, 9.99, Term(held(), 12.5)),
    (TERM, None, 8.0, 8.1, None),  # refused, or the call failed: stop at once
    (TERM, held(8), 8.0, 8.1, None),  # the token changed: another holder had it in between
    (TERM, held(), 9.0, 10.0, None),  # the answer came at the term's end: stopped already, start over
    (TERM, held(), 9.0, 10.5, None),  # ... or after it
])
def test_next_term(term: Term | None, got: Held | None, asked: float, answered: float,
                   expected: Term | None) -> None:
    assert next_term(term, got, asked, answered, TTL) == expected


def test_a_term_ended_for_a_late_answer_starts_again_at_the_next_acquire() -> None:
    assert next_term(TERM, held(), 9.0, 10.5, TTL) is None
    assert next_term(None, held(), 10.6, 10.7, TTL) == Term(held(), 13.6)


def test_holder_gone_only_for_a_dead_process_of_this_host() -> None:
    host = socket.gethostname()[:64]
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(done.stdout)
    assert holder_gone(f"{host}:{dead_pid}:nonce")
    assert not holder_gone(f"{host}:{os.getpid()}:nonce")  # alive (this process)
    assert not holder_gone(f"another-host-{host}:{dead_pid}:nonce")  # another host: its lease's expiry decides
    assert not holder_gone(f"{host}:not-a-pid:nonce")
    assert not holder_gone("")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path / 'controller.db'}")
    try:
        yield st
    finally:
        st.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def take(store: Store, holder: str, clock: Clock, gone: str | None = None) -> Held | None:
    with store.session() as s:
        return acquire(s, "rollout:r-1", holder, TTL, clock, gone=gone)


def fenced(store: Store, lease: Held, clock: Clock) -> None:
    with store.session() as s:
        hold_lease(s, lease, clock)


def test_hold_lease_counts_the_lease_row_and_refuses_once_another_holder_has_it(store: Store) -> None:
    clock = Clock()
    a = take(store, "ctl-a:1:a", clock)
    assert a is not None
    fenced(store, a, clock)  # held: one row
    clock.now += TTL / 2
    assert take(store, "ctl-a:1:a", clock) == Held(a.name, a.holder, a.token, a.expires_at + dt.timedelta(
        seconds=TTL / 2))  # renewed, same token
    fenced(store, a, clock)  # the renewal's expiry counts, the token is the same
    clock.now += TTL + 0.1  # expired: nobody else took it, still the fence refuses (A may not act past its lease)
    with pytest.raises(LeaseLost, match="no longer held by ctl-a:1:a"):
        fenced(store, a, clock)
    b = take(store, "ctl-b:2:b", clock)
    assert b is not None and b.token == a.token + 1
    with pytest.raises(LeaseLost):
        fenced(store, a, clock)
    fenced(store, b, clock)
    with store.session() as s:  # a refused fence wrote nothing: the row is B's as acquire left it
        row = s.scalar(select(Lease).where(Lease.name == "rollout:r-1"))
        assert row is not None and (row.holder, row.token) == ("ctl-b:2:b", b.token)


def test_acquire_takes_a_live_lease_only_from_the_holder_named_gone(store: Store) -> None:
    clock = Clock()
    a = take(store, "ctl-a:1:a", clock)
    assert a is not None
    assert take(store, "ctl-b:2:b", clock) is None  # A's lease runs
    assert take(store, "ctl-b:2:b", clock, gone="ctl-c:3:c") is None  # not A: A's lease is left alone
    b = take(store, "ctl-b:2:b", clock, gone="ctl-a:1:a")  # A is known dead: taken before its expiry
    assert b is not None and b.token == a.token + 1
    assert take(store, "ctl-c:3:c", clock, gone="ctl-a:1:a") is None  # it moved meanwhile: the condition fails
