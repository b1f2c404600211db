"""Dashboard logins are shared through the database (issue 17; controller/dashboard_sessions.py): two controller
processes on one PostgreSQL database of this test's own, the user added with the real `fleet-controller user add`.

A login made on A works on B (the JSON and the pages the dashboard loads, the same CSRF token); a logout on B
ends it on A; removing the user ends a session made on A at B. The database holds only the secret's hash, and
neither state dir holds a session key.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.ha.test_shared_state import query, shared_database
from tests.integration.rollout.controller_proc import ControllerProc

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[3]
PASSWORD = "correct horse battery"


def user_command(db: str, state: Path, *args: str, stdin: str = "") -> str:
    """`fleet-controller user …` on the shared database, as an operator runs it on a controller host."""
    done = subprocess.run([sys.executable, "-m", "fleetctl.controller.main", "user", "--state-dir", str(state),
                           "--db", db, *args], input=stdin, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def login(cp: ControllerProc, name: str) -> str:
    """Log in through ``cp``'s login form, as a browser does; the session cookie's value."""
    with httpx.Client(base_url=cp.url, timeout=10) as c:
        form = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        r = c.post("/login", data={"username": name, "password": PASSWORD, "csrf_token": token.group(1),
                                   "next": "/"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/", r.text
        return str(r.cookies["fleet_session"])


def with_cookie(cp: ControllerProc, cookie: str) -> httpx.Client:
    """A client of ``cp`` presenting ``cookie``, as a browser sends it to whichever controller it reaches."""
    return httpx.Client(base_url=cp.url, timeout=10, headers={"Cookie": f"fleet_session={cookie}"})


def csrf_of(c: httpx.Client) -> str:
    page = c.get("/", follow_redirects=False)
    assert page.status_code == 200, page.status_code
    m = re.search(r'data-csrf="([^"]+)"', page.text)
    assert m is not None
    return m.group(1)


async def test_a_login_on_a_works_on_b_and_a_logout_on_b_ends_it_on_a(tmp_path: Path) -> None:
    with shared_database() as db:
        a = ControllerProc(tmp_path / "a" / "controller", db=db)
        b = ControllerProc(tmp_path / "b" / "controller", db=db)
        try:
            a.start()
            await a.ready()
            b.start()
            await b.ready()
            user_command(db, a.state, "add", "olga", "--role", "operator", "--password-stdin", stdin=PASSWORD + "\n")

            cookie = login(a, "olga")
            [(token_hash,)] = query(db, "SELECT token_hash FROM dashboard_sessions")
            assert token_hash != cookie and cookie not in str(query(db, "SELECT * FROM dashboard_sessions"))
            [listed] = json.loads(user_command(db, b.state, "list", "--json"))["users"]
            assert (listed["name"], listed["sessions"]) == ("olga", 1) and listed["session_last_used_at"]

            with with_cookie(a, cookie) as on_a, with_cookie(b, cookie) as on_b:
                assert on_a.get("/ui/api/overview").status_code == 200
                # B never saw the login: the row in the database is what it reads
                overview = on_b.get("/ui/api/overview")
                assert overview.status_code == 200 and "total" in overview.text, overview.text
                nodes = on_b.get("/nodes", follow_redirects=False)
                assert nodes.status_code == 200 and "olga" in nodes.text
                assert csrf_of(on_b) == csrf_of(on_a)  # one CSRF token per session, on every controller

                out = on_b.post("/logout", data={"csrf_token": csrf_of(on_b)}, follow_redirects=False)
                assert out.status_code == 303 and out.headers["location"] == "/login"
                refused = on_a.get("/ui/api/overview")
                assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"
                assert on_a.get("/", follow_redirects=False).headers["location"].startswith("/login")
                assert on_b.get("/ui/api/overview").status_code == 401
            assert query(db, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
            actions = [row[0] for row in query(db, "SELECT action FROM audit_log WHERE actor = 'user:olga' "
                                                   "ORDER BY id")]
            assert actions == ["dashboard.login", "dashboard.logout"]

            # removing the user (on any host, through the database) ends a session made on A, at B
            cookie = login(a, "olga")
            with with_cookie(b, cookie) as on_b:
                assert on_b.get("/ui/api/overview").status_code == 200
                user_command(db, b.state, "remove", "olga")
                assert on_b.get("/ui/api/overview").status_code == 401
            assert query(db, "SELECT count(*) FROM dashboard_sessions") == [(0,)]
            assert not (a.state / "dashboard.key").exists() and not (b.state / "dashboard.key").exists()
        finally:
            b.stop()
            a.stop()
