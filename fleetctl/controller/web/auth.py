"""Dashboard authentication: scrypt password hashes, the login's checks, CSRF tokens.

- Passwords: ``hashlib.scrypt`` (n=2**14, r=8, p=1), stored as ``scrypt$n$r$p$salt$hash``.
- Sessions: rows in the database, shared by every controller (controller/dashboard_sessions.py); a new password
  (``add_user`` on an existing user) ends the user's sessions, deleting the user ends them too.
- CSRF: every state-changing request carries the session's CSRF token (derived from the session's secret), in a
  form field ``csrf_token`` or the ``X-CSRF-Token`` header. The login form uses a double-submit cookie.
- Cost: one scrypt is ~50 ms of CPU and 16 MiB. It never runs on the event loop: ``run_password_work``
  runs it on ``PASSWORD_WORKERS`` threads of its own (so logins can neither stall ``/health`` nor take the
  database's threads), and the login route admits attempts through per-source and global token buckets
  (controller/ratelimit.py) before any of it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleetctl.controller.dashboard_sessions import end_user_sessions
from fleetctl.controller.store.db import Store, utcnow
from fleetctl.controller.users import METRICS_ROLE, User, validate_name, validate_role
from fleetctl.fleet.errors import ConflictError, NotFoundError, UsageError

LOGIN_CSRF_COOKIE = "fleet_login_csrf"

_N, _R, _P, _DKLEN = 2**14, 8, 1, 32
MAX_PASSWORD_CHARS = 1024  # scrypt's cost does not grow with the input, but the request body should not either
PASSWORD_WORKERS = 2  # concurrent scrypt runs: bounded CPU and memory however many logins arrive
_password_pool: ThreadPoolExecutor | None = None
T = TypeVar("T")


async def run_password_work(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` (password hashing or a login's check, with its database work) off the event loop."""
    global _password_pool
    if _password_pool is None:
        _password_pool = ThreadPoolExecutor(max_workers=PASSWORD_WORKERS, thread_name_prefix="fleet-scrypt")
    return await asyncio.get_running_loop().run_in_executor(_password_pool, fn, *args)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(hash_hex)
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


_DUMMY_HASH = hash_password(secrets.token_hex(8))


def add_user(store: Store, name: str, role: str, password: str, *, replace: bool = False) -> User:
    """Create (or with ``replace``, update) a user; returns the stored row. Replacing ends the user's dashboard
    sessions on every controller: they were opened with the old password."""
    validate_name(name)
    validate_role(role)
    if len(password) < 8:
        raise UsageError("password too short", hint="use at least 8 characters")
    with store.session() as s:
        user = s.scalars(select(User).where(User.name == name)).first()
        if user is not None and not replace:
            raise ConflictError(f"user {name!r} already exists",
                                hint="pass --replace to change its role and password, or pick another name")
        if user is None:
            user = User(name=name, created_at=utcnow(), disabled=False)
            s.add(user)
        else:
            end_user_sessions(s, user.id)
        user.role = role
        user.password_hash = hash_password(password)
        user.disabled = False
        s.flush()
        s.expunge(user)
        return user


def list_users(store: Store) -> list[User]:
    with store.session() as s:
        users = list(s.scalars(select(User).order_by(User.name)))
        for u in users:
            s.expunge(u)
        return users


def remove_user(store: Store, name: str) -> None:
    with store.session() as s:
        user = s.scalars(select(User).where(User.name == name)).first()
        if user is None:
            raise NotFoundError(f"no user {name!r}", hint="list users with `fleet-controller user list`")
        s.delete(user)


def authenticate(session: Session, name: str, password: str) -> User | None:
    user = session.scalars(select(User).where(User.name == name)).first()
    # a metrics account is a scrape credential (an API token for /metrics), never a dashboard login
    if user is None or user.disabled or user.role == METRICS_ROLE:
        verify_password(password, _DUMMY_HASH)  # same work either way: no user-name oracle by timing
        return None
    if not verify_password(password, user.password_hash):
        return None
    user.last_login_at = utcnow()
    return user


class LoginThrottle:
    """Refuses a (user name, client address) pair after ``limit`` failed logins within ``window``
    seconds, until the window has passed (in memory, per controller process)."""

    def __init__(self, limit: int = 5, window: float = 300.0) -> None:
        import threading
        self.limit, self.window = limit, window
        self._fails: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        times = [t for t in self._fails.get(key, []) if now - t < self.window]
        if times:
            self._fails[key] = times
        else:
            self._fails.pop(key, None)
        return times

    def retry_after(self, name: str, addr: str, now: float) -> int:
        """Seconds until this pair may try again (0: now)."""
        with self._lock:
            times = self._recent((name.lower(), addr), now)
            return int(self.window - (now - times[0])) + 1 if len(times) >= self.limit else 0

    def failed(self, name: str, addr: str, now: float) -> None:
        with self._lock:
            if len(self._fails) > 10_000:
                self._fails.clear()
            self._recent((name.lower(), addr), now)
            self._fails.setdefault((name.lower(), addr), []).append(now)

    def succeeded(self, name: str, addr: str) -> None:
        with self._lock:
            self._fails.pop((name.lower(), addr), None)


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(expected) and given is not None and hmac.compare_digest(expected.encode(), given.encode())
