"""Opening the store: engine, sessions and programmatic Alembic migrations.

``open_store(url)`` creates the engine (SQLite: WAL journal, busy timeout, foreign keys;
PostgreSQL through ``postgresql+psycopg://``), upgrades the schema to Alembic head and
returns a ``Store``. ``Store.session()`` is a context manager that commits on success and
rolls back on error; SQLAlchemy errors are translated to ``fleet.errors.StoreError`` there.

Availability (docs/security.md, "Availability and faults"):

- every statement is bounded: SQLite waits at most ``DbTimeouts.lock_ms`` for a lock,
  PostgreSQL connections carry ``lock_timeout`` and ``statement_timeout``; a blocked database
  therefore ends in a ``StoreError`` after seconds, never in a hang;
- ``await store.call(fn, ...)`` runs blocking database work on the store's own bounded thread
  pool (``DB_WORKERS`` threads), never on the event loop: a locked database then delays the
  calls that need it and nothing else (heartbeats, ``/live``);
- ``store.write(fn)`` runs ``fn(session)`` as one unit of work and retries it on a dropped
  connection or a lock timeout (``fn`` must be idempotent: look before inserting, or rely on a
  unique key);
- ``store.health`` remembers the last write failure and success; ``store.probe()`` checks that
  the database answers and accepts a write within a bound (``/ready``, ``/health``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleetctl.controller.telemetry import DB_CALL_SECONDS
from fleetctl.fleet.errors import StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
PG_CONNECT_TIMEOUT_S = 5
# Threads for blocking database work (``Store.call``). Bounded so that a blocked database queues work
# instead of growing threads without end; matches the PostgreSQL pool (10 + overflow) with room to spare.
DB_WORKERS = 8
WRITE_RETRIES = 4
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DbTimeouts:
    """How long one statement may wait (``ControllerSettings.db_timeouts``, docs/operations.md).

    ``lock_ms``: for a lock before it fails (and is retried by its caller): long enough to ride out an ordinary
    write burst, short enough that a stuck lock shows up as an error within seconds (SQLite's busy timeout,
    PostgreSQL's lock_timeout). ``statement_ms``: PostgreSQL's statement_timeout, and the wait for a pooled
    connection."""

    lock_ms: int = 5000
    statement_ms: int = 15000


def _transient(exc: BaseException) -> bool:
    """A failure a retry can fix: a dropped connection, a lock or statement timeout, a busy SQLite file."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        msg = str(exc.orig or exc).lower()
        # a full disk or a read-only database is not transient: retrying only delays the clear error
        return not any(word in msg for word in ("readonly", "read-only", "read only", "disk is full",
                                                "no space left", "disk full"))
    return False


@dataclass
class StoreHealth:
    """What the last writes did (any thread): ``/health`` reports a failure newer than the last success."""

    last_ok: float = 0.0
    last_error: str | None = None
    last_error_at: float = 0.0
    errors: int = 0

    def ok(self) -> None:
        self.last_ok = time.time()

    def failed(self, reason: str) -> None:
        self.last_error, self.last_error_at = reason, time.time()
        self.errors += 1

    @property
    def failing(self) -> bool:
        return self.last_error is not None and self.last_error_at >= self.last_ok


def utcnow() -> dt.datetime:
    """Timezone-aware now, in UTC: the only clock the store accepts."""
    return dt.datetime.now(dt.UTC)


class Store:
    """An engine plus a session factory. Thread-safe; one per controller process."""

    def __init__(self, engine: Engine, timeouts: DbTimeouts = DbTimeouts()) -> None:
        self.engine = engine
        self.timeouts = timeouts
        self.url = engine.url.render_as_string(hide_password=True)
        self._factory = sessionmaker(engine, expire_on_commit=False)
        self.health = StoreHealth()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits when the block ends, rolls back if it raises."""
        session = self._factory()
        try:
            yield session
            dirty = bool(session.new or session.dirty or session.deleted) or session.in_transaction()
            session.commit()
            if dirty:
                self.health.ok()
        except SQLAlchemyError as exc:
            with contextlib.suppress(SQLAlchemyError):  # the connection may be gone: rolling back is best effort
                session.rollback()
            message = f"database error: {exc.__class__.__name__}: {exc}".splitlines()[0]
            self.health.failed(message)
            err = StoreError(message, hint=f"check the database at {self.url}")
            err.transient = _transient(exc)
            raise err from exc
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):
                session.rollback()
            raise
        finally:
            session.close()

    def write(self, fn: Callable[[Session], T], *, retries: int = WRITE_RETRIES, what: str = "write") -> T:
        """``fn(session)`` as one unit of work, retried with backoff when the failure is transient (a dropped
        connection, a lock or statement timeout). ``fn`` must be idempotent. Blocking: call it in a worker
        thread (``await store.call(store.write, fn)``) from async code."""
        delay = 0.1
        for attempt in range(retries + 1):
            try:
                with self.session() as s:
                    return fn(s)
            except StoreError as exc:
                if attempt >= retries or not exc.transient:
                    raise
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc.message, attempt + 1, retries, delay)
                time.sleep(delay)
                delay = min(delay * 3, 2.0)
        raise AssertionError("unreachable")

    @property
    def executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=DB_WORKERS, thread_name_prefix="fleet-db")
            return self._executor

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run blocking ``fn(*args, **kwargs)`` (database work) on the store's bounded thread pool."""
        loop = asyncio.get_running_loop()
        with DB_CALL_SECONDS.time():
            return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
        """Check that the database answers and takes a write within ``timeout_s`` (blocking; use ``call``).

        The write is real but changes nothing: the schema version row is rewritten with its own value
        (a read-only database or a full disk fails it) and the ``nodes`` table, which heartbeats and
        rollouts write, is locked for writing (an outside lock on it shows up here)."""
        started = time.monotonic()
        ms = max(1, int(timeout_s * 1000))
        try:
            with self.engine.connect() as conn:
                if self.is_sqlite:
                    conn.exec_driver_sql(f"PRAGMA busy_timeout={ms}")
                    try:
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                        conn.exec_driver_sql("UPDATE alembic_version SET version_num = version_num")
                        conn.exec_driver_sql("UPDATE nodes SET id = id WHERE id < 0")
                        conn.exec_driver_sql("COMMIT")
                    finally:
                        with contextlib.suppress(SQLAlchemyError):
                            conn.exec_driver_sql("ROLLBACK")
                        conn.exec_driver_sql(f"PRAGMA busy_timeout={self.timeouts.lock_ms}")
                else:
                    with conn.begin():
                        conn.execute(text(f"SET LOCAL lock_timeout = {ms}"))
                        conn.execute(text(f"SET LOCAL statement_timeout = {ms}"))
                        conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
                        conn.execute(text("UPDATE nodes SET id = id WHERE id < 0"))
        except SQLAlchemyError as exc:
            took = time.monotonic() - started
            msg = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            low = msg.lower()
            if "lock" in low or "timeout" in low or "timed out" in low:
                reason = f"database blocked: no write lock within {timeout_s:g}s ({msg})"
            elif "read" in low and "only" in low:
                reason = f"database is read-only ({msg})"
            else:
                reason = f"database write failed: {exc.__class__.__name__}: {msg}"
            return {"ok": False, "reason": reason, "ms": round(took * 1000, 1)}
        took = time.monotonic() - started
        self.health.ok()
        return {"ok": True, "ms": round(took * 1000, 1)}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()


def _sqlite_pragmas(timeouts: DbTimeouts, dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={timeouts.lock_ms}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _pg_timeouts(timeouts: DbTimeouts, dbapi_conn: Any, _record: Any) -> None:
    # Set per connection, not in the URL: a URL's ``options`` (the tests' search_path) must stay as given.
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    with dbapi_conn.cursor() as cur:
        cur.execute(f"SET lock_timeout = {timeouts.lock_ms}")
        cur.execute(f"SET statement_timeout = {timeouts.statement_ms}")
    dbapi_conn.autocommit = autocommit


def make_engine(url: str, timeouts: DbTimeouts = DbTimeouts()) -> Engine:
    """An engine for ``url`` with the project's connection settings (no migration)."""
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False,
                                                      "timeout": timeouts.lock_ms / 1000})
            event.listen(engine, "connect", functools.partial(_sqlite_pragmas, timeouts))
        else:
            # bounded waits on every connection (a lock held outside, a runaway query); pre-ping replaces
            # connections the server dropped (restart, pg_terminate_backend) before a unit of work uses them
            engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True,
                                   connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
                                   pool_timeout=timeouts.statement_ms / 1000)
            event.listen(engine, "connect", functools.partial(_pg_timeouts, timeouts))
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open database {url!r}: {exc}",
                         hint="use sqlite:///PATH or postgresql+psycopg://user@host/db") from exc
    return engine


MIGRATION_LOCK_KEY = 0x666C656574  # "fleet": the PostgreSQL advisory lock that serialises migrations
MIGRATION_LOCK_WAIT_MS = 120_000  # another controller's migration may take this long


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` with Alembic, on ``engine``."""
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # batch migrations recreate a table on SQLite (copy, drop, rename): with foreign keys enforced the
                # drop fails, or cascade-deletes the rows referencing it (Alembic docs, "batch mode with foreign
                # keys"). The pragma does nothing inside a transaction: set before the migration's begins.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            try:
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        # controllers starting together on one database migrate one after the other, not into
                        # each other's half-made tables (docs/ha.md); the lock goes with the transaction
                        conn.execute(text(f"SET LOCAL lock_timeout = {MIGRATION_LOCK_WAIT_MS}"))
                        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, revision)
                    if sqlite:
                        _check_foreign_keys(conn)
            finally:
                if sqlite:  # the connection goes back to the pool: enforced again, as _sqlite_pragmas set it
                    conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                    conn.commit()
    except SQLAlchemyError as exc:
        raise StoreError(f"database migration failed: {exc}".splitlines()[0],
                         hint="check that the database is reachable and writable") from exc
    except CommandError as exc:
        # the schema revision stored in the database is not one of ours: a newer fleetctl migrated it (this is an
        # older one: a rollback without the backup) — the transaction rolled back, nothing was changed
        if "Can't locate revision" in str(exc):
            raise StoreError(f"the database was migrated by a newer fleetctl ({exc}); this version cannot use it and "
                             "left it unchanged",
                             hint="run the fleetctl version that migrated it, or restore the backup taken before "
                                  "the upgrade (docs/operations.md, Upgrading the controller)") from exc
        raise StoreError(f"database migration failed: {exc}", hint="report this as a bug") from exc


def _check_foreign_keys(conn: Connection) -> None:
    """Refuse (roll back) a SQLite migration that left a row referencing one that is not there."""
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise StoreError(f"database migration failed: it would leave {len(broken)} row(s) referencing missing rows "
                         f"(first: table {broken[0][0]}, rowid {broken[0][1]}, references {broken[0][2]}); nothing "
                         "was changed", hint="report this as a bug, with the database's schema revision")


def open_store(url: str, *, migrate_schema: bool = True, timeouts: DbTimeouts = DbTimeouts()) -> Store:
    """Open the store at ``url`` and bring its schema to Alembic head."""
    engine = make_engine(url, timeouts)
    if migrate_schema:
        migrate(engine)
    log.info("store opened: %s", engine.url.render_as_string(hide_password=True))
    return Store(engine, timeouts)
