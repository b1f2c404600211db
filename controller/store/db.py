"""Opening the store: engine, sessions and programmatic Alembic migrations.

``open_store(url)`` creates the engine (SQLite: WAL journal, busy timeout, foreign keys;
PostgreSQL through ``postgresql+psycopg://``), upgrades the schema to Alembic head and
returns a ``Store``. ``Store.session()`` is a context manager that commits on success and
rolls back on error; SQLAlchemy errors are translated to ``fleet.errors.StoreError`` there.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleet.errors import StoreError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def utcnow() -> dt.datetime:
    """Timezone-aware now, in UTC: the only clock the store accepts."""
    return dt.datetime.now(dt.UTC)


class Store:
    """An engine plus a session factory. Thread-safe; one per controller process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=True)
        self._factory = sessionmaker(engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits when the block ends, rolls back if it raises."""
        session = self._factory()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise StoreError(f"database error: {exc.__class__.__name__}: {exc}".splitlines()[0],
                             hint=f"check the database at {self.url}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the project's connection settings (no migration)."""
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open database {url!r}: {exc}",
                         hint="use sqlite:///PATH or postgresql+psycopg://user@host/db") from exc
    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` with Alembic, on ``engine``."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StoreError(f"database migration failed: {exc}".splitlines()[0],
                         hint="check that the database is reachable and writable") from exc


def open_store(url: str, *, migrate_schema: bool = True) -> Store:
    """Open the store at ``url`` and bring its schema to Alembic head."""
    engine = make_engine(url)
    if migrate_schema:
        migrate(engine)
    log.info("store opened: %s", engine.url.render_as_string(hide_password=True))
    return Store(engine)
