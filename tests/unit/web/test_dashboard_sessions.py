"""Dashboard sessions as rows (controller/dashboard_sessions.py): the expiry rules on typed values, then the rows on
a real SQLite store — what a cookie resolves to, when its use is written, what ends a session, what is purged."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fleetctl.controller.dashboard_sessions import (
    DashboardSession,
    SessionPolicy,
    SessionState,
    SessionTimes,
    close_session,
    csrf_token,
    live_sessions_by_user,
    open_session,
    opened,
    purge_expired,
    resolve,
    secret_hash,
    state_at,
    touched,
)
from fleetctl.controller.store.db import Store, open_store
from fleetctl.controller.users import User
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user, remove_user
from fleetctl.fleet.errors import UsageError

T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
POLICY = SessionPolicy.of_seconds(8 * 3600, 3600)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# ---- the rules -------------------------------------------------------------------------------------------------

def test_a_new_session_is_active_until_its_idle_end_then_idle() -> None:
    times = opened(POLICY, T0)
    assert times == SessionTimes(created_at=T0, last_seen_at=T0, idle_expires_at=at(3600), expires_at=at(8 * 3600))
    assert state_at(times, at(3599)) is SessionState.ACTIVE
    assert state_at(times, at(3600)) is SessionState.IDLE


def test_use_moves_the_idle_end_but_never_past_the_lifetime() -> None:
    times = opened(POLICY, T0)
    for minute in range(1, 8 * 60 + 1):  # used every minute for the whole day
        later = touched(times, POLICY, at(minute * 60))
        assert later is not None
        times = later
        assert times.idle_expires_at <= times.expires_at == at(8 * 3600)
    assert state_at(times, at(8 * 3600 - 1)) is SessionState.ACTIVE
    assert state_at(times, at(8 * 3600)) is SessionState.EXPIRED  # busy or not, the lifetime ends it


def test_a_use_is_written_at_most_once_a_minute() -> None:
    times = opened(POLICY, T0)
    assert touched(times, POLICY, at(59)) is None  # the stored times will do: no write for this request
    later = touched(times, POLICY, at(60))
    assert later is not None and (later.last_seen_at, later.idle_expires_at) == (at(60), at(3660))
    assert touched(times, POLICY, at(-5)) is None  # a clock stepping back writes nothing


def test_a_short_idle_window_is_written_more_often() -> None:
    short = SessionPolicy.of_seconds(600, 20)
    assert short.touch_every == dt.timedelta(seconds=5)  # a quarter of it: the idle end stays within 5 s
    assert touched(opened(short, T0), short, at(5)) is not None


@pytest.mark.parametrize(("lifetime", "idle"), [(0, 60), (60, 0), (-1, 60)])
def test_a_policy_without_positive_windows_is_refused(lifetime: int, idle: int) -> None:
    with pytest.raises(UsageError) as err:
        SessionPolicy.of_seconds(lifetime, idle)
    assert "dashboard_session_seconds" in (err.value.hint or "")


def test_the_csrf_token_is_the_sessions_own_and_gives_nothing_away() -> None:
    a, b = "a" * 43, "b" * 43
    assert csrf_token(a) == csrf_token(a) != csrf_token(b)  # the same on every controller, one per session
    assert a not in csrf_token(a) and csrf_token(a) != secret_hash(a)[:32]


# ---- the rows --------------------------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = open_store(f"sqlite:///{tmp_path / 'controller.db'}")
    add_user(st, "olga", "operator", "correct horse battery")
    add_user(st, "vic", "viewer", "correct horse battery")
    yield st
    st.close()


def user_named(store: Store, name: str) -> User:
    with store.session() as s:
        user = s.scalars(select(User).where(User.name == name)).one()
        s.expunge(user)
        return user


def login(store: Store, name: str, now: dt.datetime = T0, policy: SessionPolicy = POLICY) -> str:
    with store.session() as s:
        return open_session(s, user_named(store, name), policy, now)


def who(store: Store, secret: str | None, now: dt.datetime) -> str | None:
    with store.session() as s:
        user = resolve(s, secret, POLICY, now)
    return user.name if user is not None else None


def rows(store: Store) -> list[DashboardSession]:
    with store.session() as s:
        return list(s.scalars(select(DashboardSession).order_by(DashboardSession.id)))


def test_the_cookie_resolves_to_its_user_with_the_sessions_csrf(store: Store) -> None:
    secret = login(store, "olga")
    with store.session() as s:
        user = resolve(s, secret, POLICY, at(1))
    assert user is not None and (user.name, user.role, user.can_act) == ("olga", "operator", True)
    assert user.csrf == csrf_token(secret)
    [row] = rows(store)
    assert row.token_hash == secret_hash(secret) and secret not in (row.token_hash,)
    for wrong in (None, "", secret[:-1] + ("A" if secret[-1] != "A" else "B"), secret * 4):
        assert who(store, wrong, at(1)) is None


def test_a_use_moves_the_stored_idle_end_once_a_minute(store: Store) -> None:
    secret = login(store, "olga")
    assert who(store, secret, at(30)) == "olga"
    assert (rows(store)[0].last_seen_at, rows(store)[0].idle_expires_at) == (T0, at(3600))  # read only
    assert who(store, secret, at(90)) == "olga"
    assert (rows(store)[0].last_seen_at, rows(store)[0].idle_expires_at) == (at(90), at(3690))
    assert who(store, secret, at(3689)) == "olga"  # kept alive by that use
    assert who(store, secret, at(3689 + 3600)) is None  # then unused for an hour


def test_logout_ends_only_that_session(store: Store) -> None:
    first, second = login(store, "olga"), login(store, "olga")
    with store.session() as s:
        close_session(s, first)
    assert who(store, first, at(1)) is None and who(store, second, at(1)) == "olga"


def test_a_new_password_or_removal_ends_the_users_sessions(store: Store) -> None:
    olga, vic = login(store, "olga"), login(store, "vic")
    add_user(store, "olga", "operator", "another password", replace=True)
    assert who(store, olga, at(1)) is None and who(store, vic, at(1)) == "vic"
    remove_user(store, "vic")
    assert who(store, vic, at(1)) is None
    assert rows(store) == []  # the foreign key took vic's row with the user


def test_a_disabled_users_session_is_refused(store: Store) -> None:
    secret = login(store, "olga")
    with store.session() as s:
        s.execute(update(User).where(User.name == "olga").values(disabled=True))
    assert who(store, secret, at(1)) is None


def test_a_login_purges_ended_rows_and_live_ones_are_counted_per_user(store: Store) -> None:
    login(store, "olga", now=T0)  # idle since: ended an hour later
    kept = login(store, "olga", now=at(3000))
    login(store, "vic", now=at(3000))
    assert who(store, kept, at(3500)) == "olga"
    with store.session() as s:
        live = live_sessions_by_user(s, at(3700))
    olga, vic = user_named(store, "olga"), user_named(store, "vic")
    assert {u: (v.count, v.last_seen_at) for u, v in live.items()} == {olga.id: (1, at(3500)), vic.id: (1, at(3000))}
    assert live[olga.id].last_seen_at.tzinfo is not None
    assert len(rows(store)) == 3  # nothing deleted the ended row yet
    login(store, "vic", now=at(3700))  # a login purges on the way
    assert {r.token_hash for r in rows(store)} >= {secret_hash(kept)} and len(rows(store)) == 3
    with store.session() as s:
        assert purge_expired(s, at(3000 + 3600)) == 1  # vic's first: idle an hour; olga's was used at 3500


def test_the_dashboard_removes_an_older_versions_session_key(store: Store, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "dashboard.key").write_text("0" * 64)
    (state / "admin.token").write_text("t")
    with TestClient(create_standalone_app(SimpleNamespace(store=store, state_dir=state))) as c:
        assert c.get("/login").status_code == 200
    assert not (state / "dashboard.key").exists() and (state / "admin.token").exists()
