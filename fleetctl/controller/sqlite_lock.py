"""One controller per SQLite database: an OS file lock held while the controller runs (issue 17).

SQLite is the embedded store of one controller. A second controller on the same file would judge the same nodes,
drive the same rollouts and hand out the same jobs from its own memory — so it is refused at start, saying who
holds the database and what to do instead: several controllers share one PostgreSQL database (docs/ha.md).

The lock is ``fcntl.flock`` (exclusive, non-blocking) on ``DB.lock`` beside the database file, held through an open
descriptor (close-on-exec: the programs a controller runs do not inherit it). The kernel drops it when the process
ends, however it ends — ``kill -9`` included — so a lock file left behind never blocks a start. The file's content
(pid, host, since when) only names the holder in the refusal; the lock is what counts.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import weakref
from pathlib import Path

from fleetctl.fleet.errors import ConflictError, StateDirError


class SQLiteInUse(ConflictError):
    """Another controller holds the SQLite database this one was asked to use."""

    code = "sqlite-in-use"


class SQLiteLock:
    """The held lock on ``path``; ``release()`` (or the process's end) lets the next controller in."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        # a controller whose start failed half-way releases the lock when it is collected, not at process end
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        if self._fd is not None:
            self._finalizer()  # closes the descriptor, which drops the lock
            self._fd = None


def lock_path(db_file: Path) -> Path:
    return db_file.with_name(db_file.name + ".lock")


def _holder(fd: int) -> str:
    """Who holds the lock, in words, from what the holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"controller PID {info['pid']} on host {info['host']} holds it since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another controller holds it (it has not said who yet)"


def lock_sqlite(db_file: Path) -> SQLiteLock:
    """Take the lock of ``db_file`` for this process, or raise ``SQLiteInUse`` naming its holder."""
    path = lock_path(db_file)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirError(f"cannot open the SQLite lock file {path}: {exc.strerror}",
                            hint="the controller must be able to write beside its database; check the directory's "
                                 "owner and mode") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise SQLiteInUse(
            f"the SQLite database {db_file} is in use: {holder}; a SQLite database serves one controller",
            hint="stop that controller first, or run several controllers on one PostgreSQL database "
                 "(--db postgresql+psycopg://USER@HOST/DB, docs/ha.md)") from None
    since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return SQLiteLock(path, fd)
