"""Login abuse limits (issue 13): throttled per source address and overall — a new user name per attempt no
longer gets around it — and scrypt (with the login's database work) runs on the password workers, never on
the event loop."""

from __future__ import annotations

import re
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleetctl.controller.ratelimit import LOGIN_PER_SOURCE
from fleetctl.controller.store.db import Store, open_store
from fleetctl.controller.web import app as web_app
from fleetctl.controller.web import create_standalone_app
from fleetctl.controller.web.auth import add_user

PASSWORD = "correct horse battery"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    st: Store = open_store(f"sqlite:///{tmp_path / 'controller.db'}")
    add_user(st, "olga", "operator", PASSWORD)
    ctx = types.SimpleNamespace(store=st, state_dir=tmp_path, admin_token="admintoken123")
    with TestClient(create_standalone_app(ctx)) as c:
        yield c
    st.close()


def login(c: TestClient, user: str, password: str = PASSWORD) -> Any:
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text)
    assert token is not None
    return c.post("/login", data={"username": user, "password": password, "csrf_token": token.group(1)},
                  follow_redirects=False)


def test_random_user_names_do_not_bypass_the_throttle(client: TestClient) -> None:
    codes = [login(client, f"guess-{i}", "wrong password").status_code for i in range(int(LOGIN_PER_SOURCE.burst) + 5)]
    assert codes[: int(LOGIN_PER_SOURCE.burst)] == [401] * int(LOGIN_PER_SOURCE.burst)
    assert set(codes[int(LOGIN_PER_SOURCE.burst):]) == {429}
    r = login(client, "olga")  # the right password from the same address waits too
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "Too many login attempts" in r.text


def test_scrypt_and_the_login_database_work_run_off_the_event_loop(client: TestClient,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = web_app.authenticate  # type: ignore[attr-defined]

    def spy(*a: Any, **k: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(web_app, "authenticate", spy)
    assert login(client, "nobody", "wrong password").status_code == 401
    assert login(client, "olga").status_code == 303
    assert len(threads) == 2 and all(t.startswith("fleet-scrypt") for t in threads), threads


def test_over_long_inputs_are_cut_before_any_work(client: TestClient) -> None:
    r = login(client, "x" * 70_000, "y" * 1_000_000)
    assert r.status_code == 401
